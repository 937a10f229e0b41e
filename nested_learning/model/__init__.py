"""The model layer: load a causal LM and its tokenizer (``loading``), wrap it with LoRA (``lora``), and the
embedded default that needs no download (``embedded``, torch-free until a model is built).

Nothing is imported here, so ``nested_learning.model.embedded`` stays cheap for the service."""
