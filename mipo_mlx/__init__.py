"""mipo_mlx: Mutual Information Preference Optimization on MLX.

The model answers each training prompt (chosen); the rejected side is its answer
to a different, random prompt, scored under the right prompt; training is DPO
against the frozen base with LoRA adapters. See README.md.

The package's folders are its layers, from the bottom; a module imports only from its own
layer or the layers below (tests/test_layers.py checks it; an indented line goes on with the
layer above):
core       __init__ core embedded
data       data
engine     engine
stages     stages
publish    publish
jobs       pipeline
commands   train evaluate export embedded.build
"""

from .core.errors import quiet_start_up

# First, and only in a command's own process (`python -m mipo_mlx.train`): Ctrl-C while it
# starts ends it with one line, not a traceback. A library user's signal handling is left alone.
quiet_start_up()

from .core.backend import prefer_system_blas  # noqa: E402  (after the line above)

__version__ = "0.1.0"

# Must run before anything imports mlx.core: the system BLAS only wins the
# symbol lookup if it is loaded first. Cheap, idempotent, opt-out via MIPO_MLX_BLAS=off.
prefer_system_blas()
