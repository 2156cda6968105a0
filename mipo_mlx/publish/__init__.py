"""What leaves a run: the fused model, its card, GGUF files and the Hub upload."""
