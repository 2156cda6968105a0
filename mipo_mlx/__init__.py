"""mipo_mlx: Mutual Information Preference Optimization on MLX.

The model answers each training prompt (chosen); the rejected side is its answer
to a different, random prompt, scored under the right prompt; training is DPO
against the frozen base with LoRA adapters. See README.md.
"""

from ._backend import prefer_system_blas

__version__ = "0.1.0"

# Must run before anything imports mlx.core: the system BLAS only wins the
# symbol lookup if it is loaded first. Cheap, idempotent, opt-out via MIPO_MLX_BLAS=off.
prefer_system_blas()
