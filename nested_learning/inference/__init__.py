"""Using trained adapters: ``generate`` (load a checkpoint for inference, sample text) and ``merge`` (fold an
adapter into its base weights, refusing non-finite results)."""
