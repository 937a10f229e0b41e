"""Bridges to the tools people already train and track with.

- :mod:`nested_learning.integrations.hf_trainer`: ``NestedAdamW`` and its tier plan inside a
  ``transformers.Trainer`` (or TRL's ``SFTTrainer``), with a callback for tier logging and the final flush.
- :mod:`nested_learning.integrations.tracking`: ``output.report_to`` trackers (MLflow, Weights & Biases) fed
  from the rows of ``metrics.jsonl``.

Nothing is imported here: each module pulls in its own (optional) dependencies when it is imported.
"""
