"""Synthetic random-shapes images: the data-free attacks' proxy set that needs no download (as DFMS offers).

Each image is a random background colour with 1-4 random filled shapes (ellipse, rectangle, triangle, thick line)
of random colours, sizes and positions; the label is the kind of the largest shape (only for bookkeeping: attacks
never use it). Deterministic in ``seed``; vectorised over one shape at a time across the whole batch.
"""

import numpy as np

KINDS = ("ellipse", "rectangle", "triangle", "line")


def random_shapes(count, image_size=32, channels=3, seed=0, chunk=4096):
    """(x uint8 N x C x S x S, y int64 N) of ``count`` random-shape images."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for start in range(0, count, chunk):
        x, y = _chunk(min(chunk, count - start), image_size, channels, rng)
        xs.append(x)
        ys.append(y)
    if not xs:
        return np.zeros((0, channels, image_size, image_size), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def _chunk(n, s, channels, rng):
    grid = (np.arange(s) + 0.5) / s
    yy, xx = grid[None, :, None], grid[None, None, :]
    img = np.broadcast_to(rng.random((n, channels, 1, 1)), (n, channels, s, s)).copy()
    best_area, label = np.zeros(n), np.zeros(n, np.int64)
    for k in range(4):
        present = rng.random(n) < (1.0 if k == 0 else 0.6)
        kind = rng.integers(0, len(KINDS), n)
        cx, cy = rng.uniform(0.15, 0.85, (2, n))
        rx, ry = rng.uniform(0.08, 0.4, (2, n))
        angle = rng.uniform(0, np.pi, n)
        c, si = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
        u, v = (c * dx + si * dy) / rx[:, None, None], (-si * dx + c * dy) / ry[:, None, None]
        masks = np.stack([
            u ** 2 + v ** 2 <= 1,                                    # ellipse
            (np.abs(u) <= 1) & (np.abs(v) <= 1),                     # rectangle
            (v >= -1) & (v <= 1) & (np.abs(u) <= (1 - v) / 2),       # triangle (apex up in its frame)
            (np.abs(v) <= 0.15) & (np.abs(u) <= 1),                  # thick line
        ])[kind, np.arange(n)] & present[:, None, None]
        colour = rng.random((n, channels, 1, 1))
        img = np.where(masks[:, None], colour, img)
        area = masks.mean((1, 2))
        label = np.where(area > best_area, kind, label)
        best_area = np.maximum(area, best_area)
    noise = rng.normal(0, 0.02, img.shape)
    return np.clip(np.round((img + noise) * 255), 0, 255).astype(np.uint8), label


def load_shapes(options):
    """Registry loader: ``count`` training images (and count // 10 test images), ``channels``, 32 px by default."""
    count = int(options.get("count") or 50000)
    size = int(options.get("image_size") or 32)
    channels = int(options.get("channels") or 3)
    seed = int(options.get("split_seed") or 0)
    train = random_shapes(count, size, channels, seed=seed * 2 + 1)
    test = random_shapes(max(1, count // 10), size, channels, seed=seed * 2 + 2)
    return train, test, list(KINDS)
