"""Prompt sources, row formats, templates, tasks and the pair-file schema."""
