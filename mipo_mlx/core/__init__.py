"""The foundation: errors, files, settings and the command line; no mlx."""
