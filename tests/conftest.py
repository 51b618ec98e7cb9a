import os
import pathlib

import pytest

os.environ.setdefault("MTK_PROGRESS", "0")
REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_ROOT = pathlib.Path(os.environ.get("MTK_DATA") or REPO.parent / "shared" / "data")

import toolkit  # noqa: E402,F401  (pins the torch backend before any test imports keras)


@pytest.fixture(scope="session")
def data_root():
    if not (DATA_ROOT / "MNIST" / "raw").exists():
        pytest.fail(f"test data not found at {DATA_ROOT} (set MTK_DATA)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def mnist(data_root):
    from toolkit.data import load_dataset

    return load_dataset({"name": "mnist"}, data_root)


@pytest.fixture
def cli_env(data_root, monkeypatch):
    monkeypatch.setenv("MTK_DATA", str(data_root))
    monkeypatch.setenv("MTK_PROGRESS", "0")
    return {"MTK_DATA": str(data_root)}
