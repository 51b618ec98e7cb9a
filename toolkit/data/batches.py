"""Batches as float [0, 1] torch tensors on the training device, from in-memory uint8 splits."""

import numpy as np


def to_float_tensor(x, device=None):
    import torch

    t = torch.as_tensor(x, device=device)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


class BatchStream:
    """Iterates one split in (optionally seeded, reshuffled per epoch) batches; the split lives on the device once."""

    def __init__(self, split, batch_size, shuffle=False, seed=0, drop_last=False, device=None):
        import torch

        self.x = torch.as_tensor(split.x, device=device)
        self.y = torch.as_tensor(split.y, device=device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch=0):
        """Batches of one epoch; the order depends only on (seed, epoch), so a resumed run sees the same data."""
        import torch

        n = len(self.y)
        if self.shuffle:
            order = torch.as_tensor(np.random.default_rng([self.seed, epoch]).permutation(n), device=self.y.device)
        else:
            order = None
        for i in range(len(self)):
            idx = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is not None:
                idx = order[idx]
            yield to_float_tensor(self.x[idx]), self.y[idx]
