"""Task formats: the embedded synthetic tasks and answer extraction."""
