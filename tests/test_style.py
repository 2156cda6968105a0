"""The code is formatted (`ruff format`, 100 columns) and lint-clean (`ruff check`, line length
included): CI fails on a line that drifts."""

import shutil
import subprocess

import pytest

from .test_docs import ROOT

PATHS = ["mipo_mlx", "tests", "benchmarks", "examples"]
ruff = shutil.which("ruff")


@pytest.mark.skipif(ruff is None, reason="ruff is not installed (it is in the dev extra)")
@pytest.mark.parametrize("check", [["check"], ["format", "--check"]])
def test_ruff(check):
    done = subprocess.run(
        [ruff, *check, "--no-cache", *PATHS], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
