"""Run a mipo_mlx command (train, evaluate, export) on a stand-in slow machine.

  python tests/slow_stages.py DELAY COMMAND ARGS

Every forward pass of the model sleeps DELAY seconds first, and loading a model sleeps
5 * DELAY: each stage then takes as long as it would with a model hundreds of times larger,
while the program stays the same. The sleep releases the interpreter lock, as MLX's compute
does, so what the stages print is what they would print on a slow machine.
"""

import runpy  # noqa: I001  (mipo_mlx before mlx_lm: it loads the BLAS first)
import sys
import time

import mipo_mlx  # noqa: F401
import mlx_lm

DELAY = float(sys.argv[1])
real_load = mlx_lm.load
slowed: set[type] = set()


def slow_load(*args, **kwargs):
    time.sleep(5 * DELAY)
    loaded = real_load(*args, **kwargs)
    kind = type(loaded[0])
    if kind not in slowed:
        call = kind.__call__

        def slow_call(self, *a, **k):
            time.sleep(DELAY)
            return call(self, *a, **k)

        kind.__call__ = slow_call
        slowed.add(kind)
    return loaded


mlx_lm.load = slow_load
sys.argv = [f"mipo_mlx.{sys.argv[2]}", *sys.argv[3:]]
runpy.run_module(f"mipo_mlx.{sys.argv[0].split('.')[1]}", run_name="__main__")
