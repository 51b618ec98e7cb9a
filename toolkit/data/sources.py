"""Readers for the on-disk dataset layouts: torchvision's (IDX .gz, CIFAR pickles), the CIFAR-10 npz, user npz files.

Every reader returns uint8 or float32 images in NCHW plus int64 labels, and never writes into the data root, so a
read-only root works. Downloads (torchvision's) go to a writable cache only when the files are nowhere to be found.
"""

import gzip
import os
import pathlib

import numpy as np

from toolkit.errors import UserError

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_cache_root():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mtk" / "data"


def resolve_data_root(data_root=None):
    """``--data-root``, else ``$MTK_DATA``, else the per-user cache (``~/.cache/mtk/data``)."""
    root = data_root or os.environ.get("MTK_DATA") or default_cache_root()
    return pathlib.Path(root).expanduser().absolute()  # absolute: workers may run elsewhere


def _writable(path):
    path = pathlib.Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


def _download_root(root):
    return root if _writable(root) else default_cache_root()


def _read_idx(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated IDX file ({array.size} values, header says {dims})")
    return array.reshape(dims)


def _find(folder, stem):
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.exists():
            return path
    return None


def load_idx_dataset(root, folder_name, torchvision_class, download):
    """MNIST-style datasets in torchvision's layout (``root/<folder>/raw/*-ubyte[.gz]``)."""
    raw = root / folder_name / "raw"
    if any(_find(raw, stem) is None for pair in _IDX_FILES.values() for stem in pair):
        fallback = default_cache_root() / folder_name / "raw"
        if all(_find(fallback, s) for pair in _IDX_FILES.values() for s in pair):
            raw = fallback
        elif download:
            import torchvision

            target = _download_root(root)
            try:
                getattr(torchvision.datasets, torchvision_class)(str(target), train=True, download=True)
            except Exception as exc:  # no network, no files
                raise UserError(f"{raw}: {folder_name} files not found and download failed ({exc})") from None
            raw = target / folder_name / "raw"
        else:
            raise UserError(f"{raw}: {folder_name} IDX files not found (set --data-root or MTK_DATA)")
    out = {}
    for split, (images, labels) in _IDX_FILES.items():
        x = _read_idx(_find(raw, images))
        y = _read_idx(_find(raw, labels)).astype(np.int64)
        out[split] = (x[:, None, :, :], y)
    return out["train"], out["test"], None


def load_npz(path, expect_classes=None):
    """A user npz (or the staged CIFAR-10 copy) with train_x, train_y, test_x, test_y and optional classes."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path}: not a readable npz file ({exc})") from None
    missing = [k for k in ("train_x", "train_y", "test_x", "test_y") if k not in data.files]
    if missing:
        raise UserError(f"{path}: missing arrays {', '.join(missing)} (needs train_x, train_y, test_x, test_y)")
    splits = []
    for split in ("train", "test"):
        x, y = to_nchw(data[f"{split}_x"], f"{path}:{split}_x"), np.asarray(data[f"{split}_y"])
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"{path}:{split}_y: expected {len(x)} integer labels, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}:{split}_y: labels must be integers, got {y.dtype}")
        splits.append((x, y.astype(np.int64)))
    classes = [str(c) for c in data["classes"]] if "classes" in data.files else None
    return splits[0], splits[1], classes


def to_nchw(x, where):
    """Accepts NHW, NHWC or NCHW images (uint8 0-255 or float 0-1) and returns NCHW."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise UserError(f"{where}: expected images of shape N,H,W[,C] or N,C,H,W, got {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        if x.size and (x.min() < 0 or x.max() > 1):
            raise UserError(f"{where}: float images must lie in [0, 1] (got {x.min():.3g}..{x.max():.3g})")
    return np.ascontiguousarray(x)


def load_cifar10(root, download, verify_checksums=True):
    """CIFAR-10 from ``root/cifar10/cifar10.npz`` (the staged bit-exact copy) or torchvision's pickles."""
    for npz in (root / "cifar10" / "cifar10.npz", root / "cifar10.npz"):
        if npz.exists():
            return load_npz(npz)
    return _load_torchvision_cifar(root, "CIFAR10", "cifar-10-batches-py", download, verify_checksums)


def load_cifar100(root, download, verify_checksums=True):
    """CIFAR-100 through torchvision's reader (``root/cifar-100-python``), or an npz at ``root/cifar100/``."""
    for npz in (root / "cifar100" / "cifar100.npz", root / "cifar100.npz"):
        if npz.exists():
            return load_npz(npz)
    return _load_torchvision_cifar(root, "CIFAR100", "cifar-100-python", download, verify_checksums)


def _load_torchvision_cifar(root, class_name, folder, download, verify_checksums):
    import torchvision

    base = getattr(torchvision.datasets, class_name)
    if not verify_checksums:
        # Same reader, no MD5 check: for re-packed or generated files in torchvision's on-disk format.
        base = type(f"Unverified{class_name}", (base,), {
            "train_list": [[name, None] for name, _ in base.train_list],
            "test_list": [[name, None] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        })
    location = root
    if not (root / folder).exists() and (default_cache_root() / folder).exists():
        location = default_cache_root()
    if not (location / folder).exists():
        if not download:
            raise UserError(f"{root / folder}: {class_name} not found (set --data-root or MTK_DATA)")
        location = _download_root(root)
    try:
        train = base(str(location), train=True, download=download and not (location / folder).exists())
        test = base(str(location), train=False, download=False)
    except RuntimeError as exc:
        raise UserError(f"{location / folder}: {exc} (for re-packed files set \"verify_checksums\": false)") from None
    except Exception as exc:
        raise UserError(f"{location / folder}: cannot read {class_name} ({exc})") from None
    pack = [(np.ascontiguousarray(d.data.transpose(0, 3, 1, 2)), np.asarray(d.targets, dtype=np.int64))
            for d in (train, test)]
    return pack[0], pack[1], list(train.classes)
