"""Task formats: the embedded synthetic tasks, the requirements (personalization) family,
and answer extraction."""
