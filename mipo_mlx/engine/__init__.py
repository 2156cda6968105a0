"""The compute: models and LoRA, generation, batching, log-probs, losses, the trainer."""
