"""Training: data scanning and manifests, configuration, the trainer and LoRA."""
