"""Run `python -m mipo_mlx.train ARGS` and SIGKILL the process itself at a chosen point.

  python tests/killer.py after-step K -- ARGS       killed right after step K is logged
  python tests/killer.py round-2-after-step K -- ARGS  the same, for step K of round 2
  python tests/killer.py after-responses N -- ARGS  killed after N generated responses are saved
  python tests/killer.py in-checkpoint K -- ARGS    killed between the renames of the step-K
                                                    checkpoint
  python tests/killer.py in-adapters-write K -- ARGS  killed while the step-K adapters file is
                                                      being written
  python tests/killer.py rank-1-after-step K -- ARGS  (under mlx.launch) rank 1 killed right
                                                      after step K
  python tests/killer.py wait-after-step K -- ARGS  after step K, waits (holding everything it
                                                    holds) until the file $KILLER_GO exists,
                                                    then is killed

A real SIGKILL: no handler, no cleanup, exactly what a kill -9 or the OOM killer does.
"""

import os
import signal
import sys
import time

import mipo_mlx  # noqa: F401  (BLAS first)
from mipo_mlx import train
from mipo_mlx.core import files
from mipo_mlx.engine import train_state as checkpoint
from mipo_mlx.engine import trainer
from mipo_mlx.stages import run_folder


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, value = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    if point == "rank-1-after-step":
        real_memory, steps = trainer.memory_metrics, [0]

        def memory_metrics():  # called once per step, on every rank
            steps[0] += 1
            if steps[0] == value:
                from mipo_mlx.engine import distributed

                if distributed.rank() == 1:
                    die()
            return real_memory()

        trainer.memory_metrics = memory_metrics
    elif point in ("after-step", "round-2-after-step", "wait-after-step"):
        real = run_folder.append_jsonl
        folder = "round-2" if point.startswith("round-2") else None

        def log(path, row):
            real(path, row)
            if row.get("step") == value and (folder is None or folder in str(path)):
                if point == "wait-after-step":  # at most 5 minutes, should the test die
                    deadline = time.time() + 300
                    while not os.path.exists(os.environ["KILLER_GO"]) and time.time() < deadline:
                        time.sleep(0.02)
                die()

        run_folder.append_jsonl = log
    elif point == "after-responses":
        real_record, count = run_folder.ResponseFile.record, [0]

        def record(*a):
            real_record(*a)
            count[0] += 1
            if count[0] == value:
                die()

        run_folder.ResponseFile.record = record
    elif point == "in-checkpoint":
        real_save = checkpoint.save

        def save(out, state, *rest):
            if state.step == value:
                real_rename = type(out).rename

                def rename(self, target):
                    real_rename(self, target)
                    if str(target).endswith(".old"):
                        die()  # the old checkpoint moved aside, the new one not yet in place

                type(out).rename = rename
            return real_save(out, state, *rest)

        checkpoint.save = save
    elif point == "in-adapters-write":
        real_replace, seen = os.replace, [0]

        def replace(src, dst):
            if str(dst).endswith("/adapters.safetensors"):
                seen[0] += 1
                if seen[0] == value:
                    with open(src, "r+b") as fh:  # half-written temporary file, then the kill
                        fh.truncate(os.path.getsize(src) // 2)
                    die()
            return real_replace(src, dst)

        files.os.replace = replace
    sys.exit(train.main(args))


if __name__ == "__main__":
    main()
