"""The one dataset registry: a name (or an npz path) in a spec becomes train / val / holdout / test splits.

Images stay uint8 NCHW in memory (MNIST is resized to 32x32 once, like the released ``Resize(32)`` on PIL images) and
become float [0, 1] per batch; normalisation is done by the model's ``Standardize`` layer with the stats kept here.
"""

import dataclasses
import difflib
import hashlib

import numpy as np

from toolkit.data import sources
from toolkit.errors import UserError
from toolkit.data.shapes import load_shapes


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: callable  # loader(root, download, options) -> (train, test, classes)
    num_classes: int | None
    mean: tuple | None  # per-channel stats of the training images; None = computed from the training split
    std: tuple | None
    image_size: int | None  # default resize (MNIST-family: 32, as the paper feeds LeNet)


_DATASETS = {}


def register_dataset(name, loader, num_classes=None, mean=None, std=None, image_size=None):
    _DATASETS[name] = DatasetInfo(name, loader, num_classes, mean, std, image_size)


def available_datasets():
    return sorted(_DATASETS)


def dataset_info(name):
    """The registered facts of dataset ``name`` (class count, statistics), or None for an unknown name."""
    return _DATASETS.get(name)


register_dataset("mnist", lambda root, dl, o: sources.load_idx_dataset(root, "MNIST", "MNIST", dl), 10,
                 (0.1307,), (0.3081,), image_size=32)
register_dataset("fashion_mnist",
                 lambda root, dl, o: sources.load_idx_dataset(root, "FashionMNIST", "FashionMNIST", dl), 10,
                 (0.2860,), (0.3530,), image_size=32)
register_dataset("cifar10", lambda root, dl, o: sources.load_cifar10(root, dl, o.get("verify_checksums", True)), 10,
                 (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# CIFAR-100's own statistics (the released MISLEADER code reused CIFAR-10's: a bug not copied here).
register_dataset("cifar100", lambda root, dl, o: sources.load_cifar100(root, dl, o.get("verify_checksums", True)),
                 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
register_dataset("npz", lambda root, dl, o: sources.load_npz(_npz_path(root, o)))
register_dataset("shapes", lambda root, dl, o: load_shapes(o), 4)


def _npz_path(root, options):
    path = options.get("path")
    if not path:
        raise UserError("dataset 'npz' needs a \"path\" to the .npz file")
    import pathlib

    path = pathlib.Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else root / path


@dataclasses.dataclass
class Split:
    """Images (uint8 0-255 or float32 0-1, NCHW) and int64 labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self):
        return len(self.y)

    def take(self, index):
        return Split(self.x[index], self.y[index])


@dataclasses.dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    holdout: Split  # disjoint from train/val: what a realistic in-distribution attacker may hold
    classes: list
    mean: tuple
    std: tuple
    config: dict  # the dataset spec, with defaults filled in

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def input_shape(self):
        return tuple(self.train.x.shape[1:])

    def split(self, name):
        if name not in ("train", "val", "test", "holdout"):
            raise UserError(f"unknown split '{name}' (train, val, holdout, test)")
        return getattr(self, name)

    def fingerprint(self):
        """A short hash of the split contents: cards record it so a later run can tell the data changed."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            h.update(np.ascontiguousarray(split.y).tobytes())
            h.update(np.ascontiguousarray(split.x[:: max(1, len(split) // 64)]).tobytes())
        return h.hexdigest()[:16]


DEFAULTS = {"channels": None, "count": None, "val_size": 5000, "holdout_size": 0, "split_seed": 0, "image_size": None, "download": True,
            "verify_checksums": True, "normalization": "dataset", "limit": None}


def load_dataset(config, data_root=None):
    """Loads a dataset from a spec block (``{"name": "mnist", "val_size": 5000, ...}``) or a bare name."""
    if isinstance(config, str):
        config = {"name": config}
    config = {**DEFAULTS, **config}
    name = config["name"]
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown dataset '{name}'{hint}; known: {', '.join(available_datasets())}")
    info = _DATASETS[name]
    root = sources.resolve_data_root(data_root)
    (train_x, train_y), (test_x, test_y), classes = info.loader(root, config["download"], config)
    num_classes = info.num_classes or int(max(train_y.max(), test_y.max())) + 1
    classes = list(classes) if classes else [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise UserError(f"dataset '{name}': {len(classes)} class names for {num_classes} classes")
    for split, y in (("train", train_y), ("test", test_y)):
        if y.min() < 0 or y.max() >= num_classes:
            raise UserError(f"dataset '{name}': {split} labels outside 0..{num_classes - 1}")

    converted = bool(config["channels"]) and train_x.shape[1] != config["channels"]
    if converted:
        train_x, test_x = to_channels(train_x, config["channels"]), to_channels(test_x, config["channels"])
    size = config["image_size"] or info.image_size
    if size and (train_x.shape[2], train_x.shape[3]) != (size, size):
        train_x, test_x = resize(train_x, size), resize(test_x, size)

    if config["limit"]:
        train_x, train_y = train_x[: config["limit"]], train_y[: config["limit"]]
    train, val, holdout = _split_train(Split(train_x, train_y), config)
    test = Split(test_x, test_y)

    if config["normalization"] == "dataset" and info.mean is not None and not converted:
        mean, std = info.mean, info.std
    elif config["normalization"] in ("dataset", "computed"):
        mean, std = channel_stats(train.x)
    elif config["normalization"] == "none":
        mean, std = (0.0,) * train.x.shape[1], (1.0,) * train.x.shape[1]
    else:  # {"mean": [...], "std": [...]}
        mean, std = tuple(config["normalization"]["mean"]), tuple(config["normalization"]["std"])
    if len(mean) != train.x.shape[1]:
        raise UserError(f"dataset '{name}': normalization has {len(mean)} channels, images have {train.x.shape[1]}")
    return Dataset(name, train, val, test, holdout, classes, tuple(mean), tuple(std), config)


def _split_train(full, config):
    n = len(full)
    val_n, hold_n = _count(config["val_size"], n), _count(config["holdout_size"], n)
    if val_n + hold_n >= n:
        raise UserError(f"val_size + holdout_size ({val_n} + {hold_n}) leave no training data out of {n}")
    order = np.random.default_rng(config["split_seed"]).permutation(n)
    val_idx, hold_idx, train_idx = order[:val_n], order[val_n:val_n + hold_n], order[val_n + hold_n:]
    return full.take(np.sort(train_idx)), full.take(np.sort(val_idx)), full.take(np.sort(hold_idx))


def _count(size, n):
    return int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)


def to_channels(x, channels):
    """Grey to RGB by repetition, RGB to grey by the channel mean (so a proxy set can match any victim)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return np.repeat(x, channels, axis=1)
    if channels == 1:
        return np.round(x.astype(np.float32).mean(1, keepdims=True)).astype(x.dtype)
    raise UserError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def resize(x, size):
    """Bilinear resize of uint8 NCHW images, rounded back to uint8 as torchvision's Resize does on PIL images."""
    import torch
    from torchvision.transforms.v2 import functional as F

    out = [F.resize(torch.from_numpy(np.array(x[i:i + 4096])), [size, size], antialias=True).numpy()
           for i in range(0, len(x), 4096)]
    return np.concatenate(out) if out else x[:, :, :size, :size]


def channel_stats(x):
    x = x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
    return tuple(x.mean(axis=(0, 2, 3)).tolist()), tuple(np.maximum(x.std(axis=(0, 2, 3)), 1e-3).tolist())


def images_like(config, input_shape, data_root=None, splits=("train",), size=None, seed=0, classes=None,
                what="dataset"):
    """uint8 NCHW images from a registry dataset (default: synthetic shapes) converted to ``input_shape``
    (C, H, W): attacker proxy sets and defenders' OOD sets. ``what`` names the spec field in errors."""
    channels, side = int(input_shape[0]), int(input_shape[1])
    synthetic = {"name": "shapes", "val_size": 0, "count": max(1000, size or 50000)}  # generate only what is used
    config = dict(config or synthetic)
    for key, value in (("channels", channels), ("image_size", side)):  # what the model takes, unless the spec says
        if config.get(key) is None:
            config[key] = value
    data = load_dataset(config, data_root)
    if data.input_shape != tuple(input_shape):
        raise UserError(f"{what}: dataset '{data.name}' gives images {data.input_shape}, the model takes "
                        f"{tuple(input_shape)} (set its channels / image_size)")
    parts = [data.split(s) for s in splits]
    x, y = np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    if classes is not None:
        x = x[np.isin(y, classes)]
    if size is not None and len(x) > size:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))]
    if len(x) == 0:
        raise UserError(f"{what}: no images left (check its splits / classes)")
    return x
