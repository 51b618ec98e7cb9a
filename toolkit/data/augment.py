"""Per-sample image augmentation as small Keras layers over torch ops (NCHW, on the training device).

Keras's own geometric layers are slow on CPU (gather-based) or draw one parameter set per batch; these draw every
parameter per sample, which is what simulating a population of attacker queries needs.
"""

from toolkit.backend import configure_keras

keras = configure_keras()


def _torch():
    import torch

    return torch


@keras.saving.register_keras_serializable(package="mtk")
class RandomCropPad(keras.layers.Layer):
    """Zero-pads by ``padding`` and crops back at a random offset per sample (CIFAR's RandomCrop(32, padding=4))."""

    def __init__(self, padding=4, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)

    def call(self, x, training=True):
        torch = _torch()
        if not training or self.padding == 0:
            return x
        n, c, h, w = x.shape
        p = self.padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * p)
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
        return padded.gather(2, rows).gather(3, cols)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


@keras.saving.register_keras_serializable(package="mtk")
class RandomHorizontalFlip(keras.layers.Layer):
    """Flips each sample left-right with probability ``p`` (the W axis of NCHW)."""

    def __init__(self, p=0.5, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)

    def call(self, x, training=True):
        torch = _torch()
        if not training or self.p == 0:
            return x
        flip = torch.rand(x.shape[0], device=x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def get_config(self):
        return {**super().get_config(), "p": self.p}


def clean_augmentation(config):
    """The training augmentation of clean batches from a spec block ({crop_padding, horizontal_flip})."""
    layers = []
    if config.get("crop_padding"):
        layers.append(RandomCropPad(config["crop_padding"]))
    if config.get("horizontal_flip"):
        layers.append(RandomHorizontalFlip(0.5))
    if not layers:
        return None

    def apply(x):
        for layer in layers:
            x = layer(x, training=True)
        return x

    return apply
