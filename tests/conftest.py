"""Fixtures shared by the tests: one small model folder built in-process per session."""

import pytest

import mipo_mlx  # noqa: F401  (first: it loads the system BLAS before anything imports mlx)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    from mipo_mlx.engine.toy import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture(scope="session")
def toy_model(toy_model_dir):
    from mlx_lm import load

    return load(str(toy_model_dir))
