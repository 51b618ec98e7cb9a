import os
import pathlib
import sys

import pytest

# The allocator setting that makes training 1.3-2x faster here must be in the environment before Python starts
# (cpu-performance.md); the mtk CLI re-executes itself with it, and so does a pytest run started without it.
def pytest_configure(config):
    if (sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("MTK_NO_REEXEC") != "1" and os.path.basename(sys.argv[0]) in ("__main__.py", "pytest")):
        from cli.main import _GLIBC_TUNABLES

        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()  # give the new process the real stdout/stderr
        os.environ.update(GLIBC_TUNABLES=_GLIBC_TUNABLES, MTK_NO_REEXEC="1")
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]])


os.environ.setdefault("MTK_PROGRESS", "0")
REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_ROOT = pathlib.Path(os.environ.get("MTK_DATA") or REPO.parent / "shared" / "data").resolve()
os.environ["MTK_DATA"] = str(DATA_ROOT)  # absolute: several tests chdir into a temporary folder

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


@pytest.fixture(scope="session")
def mnist_victim(data_root, tmp_path_factory):
    """A small but real MNIST LeNet5 victim (~93 % test accuracy, ~30 s), shared by the attack tests."""
    import os

    from toolkit.training.target import train_target

    os.environ["MTK_DATA"] = str(data_root)
    folder = tmp_path_factory.mktemp("victim") / "lenet5"
    card = train_target({"kind": "target", "name": "v", "dataset": {"name": "mnist", "val_size": 2000, "limit": 12000},
                         "model": {"architecture": "lenet5"},
                         "train": {"epochs": 2, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}}},
                        out=folder, data_root=data_root)
    assert card["metrics"]["test_acc"] > 0.9
    return folder
