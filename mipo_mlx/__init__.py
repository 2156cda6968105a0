"""mipo_mlx: Mutual Information Preference Optimization on MLX.

The model answers each training prompt (chosen); the rejected side is its answer
to a different, random prompt, scored under the right prompt; training is DPO
against the frozen base with LoRA adapters. See README.md.

The modules, layer by layer from the bottom; a module imports only from its own
layer or the layers below (tests/test_layers.py checks it; an indented line goes on with the
layer above):
foundation __init__ errors reading progress files written embedded config settings cli _backend
           blas_governor plots hub loss_settings
data       formats tasks prompts
compute    distributed model generate prefix score selection losses memory checkpoint
           gguf_check gguf_file toy
stages     pair_file pairs batching loop run_record run_folder trackers training measure
           guard judge fuse card
pipeline   pipeline
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
