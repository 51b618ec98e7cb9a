import pickle
import shutil
import stat

import numpy as np
import pytest

from toolkit.data import BatchStream, load_dataset
from toolkit.data.augment import RandomCropPad, RandomHorizontalFlip
from toolkit.errors import UserError


def test_mnist_from_shared_root_is_32x32_with_val_split(mnist):
    assert mnist.input_shape == (1, 32, 32)
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55_000, 5_000, 10_000)
    assert mnist.train.x.dtype == np.uint8 and mnist.num_classes == 10
    # Label counts of the official training file (SOURCES.md) survive the split.
    counts = np.bincount(np.concatenate([mnist.train.y, mnist.val.y]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)


def test_native_size_on_request(data_root):
    d = load_dataset({"name": "mnist", "image_size": 28, "val_size": 100}, data_root)
    assert d.input_shape == (1, 28, 28)


def test_split_is_seeded_disjoint_and_sized(data_root):
    cfg = {"name": "fashion_mnist", "val_size": 0.1, "holdout_size": 2000, "split_seed": 3, "image_size": 28}
    a, b = load_dataset(cfg, data_root), load_dataset(cfg, data_root)
    c = load_dataset({**cfg, "split_seed": 4}, data_root)
    assert (len(a.val), len(a.holdout), len(a.train)) == (6000, 2000, 52_000)
    assert np.array_equal(a.val.x, b.val.x) and not np.array_equal(a.val.x, c.val.x)
    rows = lambda s: {r.tobytes() for r in s.x.reshape(len(s), -1)}  # noqa: E731
    assert not rows(a.val) & rows(a.holdout)
    assert len(rows(a.train) & rows(a.val)) < 10  # only exact duplicate images in the source data


def test_cifar10_npz_layout(data_root):
    d = load_dataset({"name": "cifar10", "val_size": 5000}, data_root)
    assert d.input_shape == (3, 32, 32) and len(d.test) == 10_000 and d.classes[3] == "cat"
    assert d.test.y[0] == 3 and np.bincount(d.test.y).tolist() == [1000] * 10


def test_read_only_root_is_never_written(data_root, tmp_path):
    root = tmp_path / "ro"
    shutil.copytree(data_root / "MNIST", root / "MNIST")
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = sorted(p.name for p in root.rglob("*"))
    try:
        d = load_dataset({"name": "mnist", "download": False}, root)
        assert len(d.test) == 10_000
        assert sorted(p.name for p in root.rglob("*")) == before
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_missing_files_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="MNIST IDX files not found"):
        load_dataset({"name": "mnist", "download": False}, tmp_path)


def test_data_root_resolution_order(tmp_path, monkeypatch):
    from toolkit.data.sources import resolve_data_root

    monkeypatch.setenv("MTK_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("MTK_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_root() == tmp_path / "cache" / "mtk" / "data"


def _write_cifar_pickles(folder, files, label_key, classes, meta_name, meta_key, n=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in files:
        labels = (np.arange(n) % len(classes)).tolist()
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: labels,
                 "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: classes}, f)


@pytest.fixture
def tiny_cifar100(tmp_path):
    classes = [f"class{i:02d}" for i in range(100)]
    _write_cifar_pickles(tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", classes, "meta",
                         "fine_label_names", n=300)
    return tmp_path


def test_cifar100_through_torchvision_reader(tiny_cifar100):
    d = load_dataset({"name": "cifar100", "verify_checksums": False, "download": False, "val_size": 50},
                     tiny_cifar100)
    assert d.num_classes == 100 and d.classes[7] == "class07"
    assert (len(d.train), len(d.val), len(d.test)) == (250, 50, 300)
    assert d.input_shape == (3, 32, 32)
    # CIFAR-100's own statistics, not CIFAR-10's (the released code's bug).
    assert d.mean == (0.5071, 0.4865, 0.4409)
    # The first pickle row is image 0: its red plane is the first 1024 bytes.
    with open(tiny_cifar100 / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f)["data"]
    assert np.array_equal(d.test.x[0].reshape(-1), raw[0])


def test_cifar100_checksums_are_verified_by_default(tiny_cifar100):
    with pytest.raises(UserError, match="verify_checksums"):
        load_dataset({"name": "cifar100", "download": False, "val_size": 50}, tiny_cifar100)


def test_cifar10_torchvision_layout(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_cifar_pickles(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                         "labels", classes, "batches.meta", "label_names")
    d = load_dataset({"name": "cifar10", "verify_checksums": False, "download": False, "val_size": 10}, tmp_path)
    assert (len(d.train) + len(d.val), len(d.test)) == (100, 20) and d.classes == classes


def test_npz_user_dataset_hwc_and_stats(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "mine.npz"
    np.savez(path, train_x=rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8), train_y=np.arange(60) % 4,
             test_x=rng.random((20, 16, 16, 3), dtype=np.float32), test_y=np.arange(20) % 4,
             classes=np.array(["a", "b", "c", "d"]))
    d = load_dataset({"name": "npz", "path": str(path), "val_size": 10}, tmp_path)
    assert d.input_shape == (3, 16, 16) and d.classes == ["a", "b", "c", "d"] and len(d.train) == 50
    assert d.test.x.dtype == np.float32 and len(d.mean) == 3 and 0.4 < d.mean[0] < 0.6


@pytest.mark.parametrize("arrays,message", [
    ({"train_x": np.zeros((4, 8, 8)), "train_y": np.zeros(4, int)}, "missing arrays test_x, test_y"),
    ({"train_x": np.zeros((4, 8, 8)), "train_y": np.zeros(3, int), "test_x": np.zeros((2, 8, 8)),
      "test_y": np.zeros(2, int)}, "train_y: expected 4 integer labels"),
    ({"train_x": np.full((4, 8, 8), 3.0), "train_y": np.zeros(4, int), "test_x": np.zeros((2, 8, 8)),
      "test_y": np.zeros(2, int)}, r"float images must lie in \[0, 1\]"),
])
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        load_dataset({"name": "npz", "path": str(path), "val_size": 1}, tmp_path)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'mnits'.*did you mean 'mnist'"):
        load_dataset("mnits")


def test_batch_stream_is_seeded_per_epoch(mnist):
    s = BatchStream(mnist.val, 100, shuffle=True, seed=1)
    a, b, c = (next(s.epoch(e))[1] for e in (0, 0, 1))
    assert a.equal(b) and not a.equal(c)
    x, _ = next(s.epoch(0))
    assert x.dtype.is_floating_point and 0 <= float(x.min()) and float(x.max()) <= 1


def test_augmentation_is_per_sample():
    import torch

    x = torch.rand(64, 3, 32, 32)
    cropped = RandomCropPad(4)(x, training=True)
    offsets = {int((cropped[i] != 0).sum()) for i in range(64)}
    assert cropped.shape == x.shape and len(offsets) > 5
    flipped = RandomHorizontalFlip(0.5)(x, training=True)
    was_flipped = torch.tensor([torch.equal(flipped[i], x[i].flip(2)) for i in range(64)])
    assert 10 < int(was_flipped.sum()) < 54
    assert torch.equal(RandomCropPad(4)(x, training=False), x)


def test_shapes_proxy_dataset_is_deterministic_and_varied():
    from toolkit.data import load_dataset

    a = load_dataset({"name": "shapes", "count": 300, "val_size": 0})
    b = load_dataset({"name": "shapes", "count": 300, "val_size": 0})
    assert a.input_shape == (3, 32, 32) and len(a.train) == 300 and len(a.test) == 30
    assert np.array_equal(a.train.x, b.train.x)
    flat = a.train.x.reshape(300, -1).astype(np.float32)
    assert len(np.unique(a.train.y)) == 4 and flat.std(0).mean() > 40  # images differ from one another
    grey = load_dataset({"name": "shapes", "count": 50, "val_size": 0, "channels": 1})
    assert grey.input_shape == (1, 32, 32) and len(grey.mean) == 1


def test_channel_conversion_for_proxy_sets(data_root):
    from toolkit.data import load_dataset

    rgb = load_dataset({"name": "mnist", "channels": 3, "limit": 100, "val_size": 10}, data_root)
    assert rgb.input_shape == (3, 32, 32)
    assert np.array_equal(rgb.train.x[:, 0], rgb.train.x[:, 2])
