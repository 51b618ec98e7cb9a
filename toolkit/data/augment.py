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


def _grayscale(x):
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601-2 luma, as torchvision/PIL


def _uniform(torch, n, low, high, device):
    return torch.empty(n, device=device).uniform_(float(low), float(high))


@keras.saving.register_keras_serializable(package="mtk")
class AttackerAugmentation(keras.layers.Layer):
    """The operator that turns clean images into simulated attacker queries x~ (MISLEADER's augmentation).

    Released order: random resized crop -> horizontal flip -> colour jitter -> random grayscale -> random affine.
    Every parameter is drawn per sample on the input's device. Colour jitter applies brightness, contrast,
    saturation in that fixed order (torchvision shuffles the order per call). Out-of-image pixels are 0 (black),
    like torchvision's fill on PIL images. ``config`` is the spec block (see ``mtk schema defense``: $defs.augmentation).
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(**kwargs)
        from toolkit.schemas import fill_defaults, get_schema

        schema = get_schema("defense")
        self.config = fill_defaults(schema["$defs"]["augmentation"], config or {}, schema)
        self._flip = RandomHorizontalFlip(self.config["horizontal_flip"]["p"])

    def build(self, input_shape):
        self._flip.build(input_shape)  # weightless; building it keeps Keras's state tracking quiet

    def call(self, x, training=True):
        if not training:
            return x
        c = self.config
        x = x.float()
        if c["resized_crop"]["enabled"]:
            x = self._resized_crop(x, c["resized_crop"])
        if c["horizontal_flip"]["enabled"]:
            x = self._flip(x, training=True)
        if c["color_jitter"]["enabled"]:
            x = self._color_jitter(x, c["color_jitter"])
        if c["grayscale"]["enabled"] and x.shape[1] == 3:
            torch = _torch()
            pick = torch.rand(x.shape[0], device=x.device) < c["grayscale"]["p"]
            x = torch.where(pick[:, None, None, None], _grayscale(x).expand_as(x), x)
        if c["affine"]["enabled"]:
            x = self._affine(x, c["affine"])
        return x

    @staticmethod
    def _warp(x, theta):
        torch = _torch()
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _resized_crop(self, x, cfg):
        """Per-sample crop of area fraction ~ U(scale) and log-uniform aspect ratio, resized back to full size."""
        torch = _torch()
        n, dev = x.shape[0], x.device
        area = _uniform(torch, n, *cfg["scale"], dev)
        log_ratio = _uniform(torch, n, *[float(torch.log(torch.tensor(r))) for r in cfg["ratio"]], dev)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
        return self._warp(x, theta)

    def _color_jitter(self, x, cfg):
        torch = _torch()
        n, dev = x.shape[0], x.device
        if cfg["brightness"]:
            f = _uniform(torch, n, max(0.0, 1 - cfg["brightness"]), 1 + cfg["brightness"], dev)
            x = (x * f[:, None, None, None]).clamp(0, 1)
        if cfg["contrast"]:
            f = _uniform(torch, n, max(0.0, 1 - cfg["contrast"]), 1 + cfg["contrast"], dev)[:, None, None, None]
            mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (mean + (x - mean) * f).clamp(0, 1)
        if cfg["saturation"] and x.shape[1] == 3:
            f = _uniform(torch, n, max(0.0, 1 - cfg["saturation"]), 1 + cfg["saturation"], dev)[:, None, None, None]
            gray = _grayscale(x)
            x = (gray + (x - gray) * f).clamp(0, 1)
        return x

    def _affine(self, x, cfg):
        """Per-sample rotation ~ U(+-degrees), translation ~ U(+-translate * size), scale ~ U(scale)."""
        torch = _torch()
        n, dev = x.shape[0], x.device
        angle = _uniform(torch, n, -cfg["degrees"], cfg["degrees"], dev) * (torch.pi / 180)
        scale = _uniform(torch, n, *cfg["scale"], dev)
        tx = _uniform(torch, n, -cfg["translate"], cfg["translate"], dev) * 2  # normalised coords span 2
        ty = _uniform(torch, n, -cfg["translate"], cfg["translate"], dev) * 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # grid_sample needs the inverse map (output -> input): (1/s) R^T (p - t).
        theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                             torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)], 1)
        return self._warp(x, theta)

    def get_config(self):
        return {**super().get_config(), "config": self.config}
