"""Run a command's `main(argv)` in the test's own process, reported as `python -m` would be.

The result is a `subprocess.CompletedProcess`: the return code `main` gives (the exit status
`python -m mipo_mlx.<command>` would have), and what went to stdout and stderr, at the file
descriptors as well (`capfd`: what MLX's C++ writes too). What a fresh process would also
have printed on stderr is added to stderr: each warning that Python's default filters show,
and each log record of WARNING or above (logging's last-resort handler). So a test asserts
"one line, no traceback, exit status 2" as it would on a child process, without starting one.

State one run could leave to the next is put back or checked after each run: the working
directory and the environment (export sets MLX_ENABLE_TF32) are put back; the SIGINT/SIGTERM
handlers must be the ones before (a command that left its own installed fails the test).
What only a fresh process shows (what the package prints while it imports, a missing MLX
backend) stays with the few tests that start one.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import subprocess
import warnings
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def python_default_warning_filters() -> None:
    """The filters a `python -m` process starts with (no -W, no PYTHONWARNINGS)."""
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


def run_main(
    command: str,
    argv: list,
    capfd,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`mipo_mlx.<command>.main(argv)` run here, in `cwd` with `env` added to the environment
    (both put back after)."""
    main = importlib.import_module(f"mipo_mlx.{command}").main
    argv = [str(a) for a in argv]
    handlers = [signal.getsignal(s) for s in SIGNALS]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    logged = io.StringIO()
    last_resort = logging.StreamHandler(logged)
    last_resort.setLevel(logging.WARNING)
    capfd.readouterr()  # what came before is not the command's
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        logging.getLogger().addHandler(last_resort)
        with warnings.catch_warnings(record=True) as caught:
            python_default_warning_filters()
            code = main(argv)
    finally:
        logging.getLogger().removeHandler(last_resort)
        os.chdir(saved_cwd)
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
    out, err = capfd.readouterr()
    err += logged.getvalue()
    err += "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught
    )
    assert [signal.getsignal(s) for s in SIGNALS] == handlers, f"{command} left its handlers"
    return subprocess.CompletedProcess(
        ["python", "-m", f"mipo_mlx.{command}", *argv], code, out, err
    )
