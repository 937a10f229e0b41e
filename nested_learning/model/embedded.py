"""The embedded default: a byte-level tokenizer and a tiny Llama-style model built from a config.

Nothing here downloads anything. ``nested-learning demo`` and the tests use these, and
``model.name_or_path: embedded:tiny-llama`` selects them in any config.
"""

from __future__ import annotations

from typing import Any

EMBEDDED_PREFIX = "embedded:"

# ChatML-style template; `{% generation %}` marks the tokens that carry loss under prompt masking.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

# name -> LlamaConfig overrides. `tiny-llama` is the demo model (~1.6M params); `micro-llama` is for unit tests.
EMBEDDED_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512),
    "micro-llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256),
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 5 specials, ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", vocab["<|bos|>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(EMBEDDED_PREFIX)


def embedded_model_config(name: str, vocab_size: int, **overrides: Any):
    from transformers import LlamaConfig

    key = name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ValueError(f"model.name_or_path: unknown embedded model {name!r} (known: {known})")
    kwargs = dict(EMBEDDED_MODELS[key], vocab_size=vocab_size, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_embedded(name: str, seed: int = 0, **config_overrides: Any):
    """(model, tokenizer) for an embedded name; weights drawn from ``seed`` so every run starts equal."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = embedded_model_config(name, vocab_size=len(tokenizer), **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer
