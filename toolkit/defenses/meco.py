"""MeCo (DFME-DRO, NeurIPS 2023): answer through a freshly drawn random perturbation of every query.

Inference: f(x + s * p(x)) with p a random small convolutional net drawn anew for every query (one net per sample,
grouped convolutions), s = ``scale``. Training (distributionally robust, fine-tuned from the target here): per batch
one SVGD step moves particles z (started at x) up CE(f(z), y) - gamma ||z - x||^2 (RBF kernel, median bandwidth),
then CE(f(x), y) + CE(f(z + s_t p(z)), y) + l1_weight * |f(z + s_t p(z)) - f(z)|_1.
Simplified from the official code (stated): the perturbation net is two grouped dilated 3x3 convolutions with a tanh,
not two Bottle2neck blocks; its strength eps ~ U[eps_low, eps_high] as there. Fixed: any batch size works (the
original needs batches of exactly 64), and every query an attack sends, zeroth-order probes included, is perturbed.
"""

import pathlib

import keras
import torch

from toolkit.artifacts import Deployable, load_keras_model, register_deployable, save_model
from toolkit.defenses import trained
from toolkit.models.fast import forward


def random_perturbation(x, eps_low=0.3, eps_high=0.6, width=8, generator=None):
    """p(x): a different random two-layer dilated conv net for every sample, output in [-eps, eps]."""
    n, c, h, w = x.shape
    g = generator
    w1 = torch.randn(n * width, c, 3, 3, generator=g) / (c * 9) ** 0.5
    w2 = torch.randn(n * c, width, 3, 3, generator=g) / (width * 9) ** 0.5
    eps = torch.empty(n, 1, 1, 1).uniform_(eps_low, eps_high, generator=g)
    hidden = torch.tanh(torch.nn.functional.conv2d(x.reshape(1, n * c, h, w), w1.to(x), padding=2, dilation=2,
                                                   groups=n))
    out = torch.nn.functional.conv2d(hidden, w2.to(x), padding=2, dilation=2, groups=n).reshape(n, c, h, w)
    return torch.tanh(out) * eps.to(x)


def svgd_step(z, x, y, model, step, gamma):
    """One Stein variational gradient step of the particles z on log p(z) = CE(f(z), y) - gamma ||z - x||^2."""
    z = z.detach().requires_grad_(True)
    objective = torch.nn.functional.cross_entropy(forward(model, z, True), y, reduction="sum") \
        - gamma * ((z - x) ** 2).sum()
    (score,) = torch.autograd.grad(objective, z)
    flat, score = z.detach().reshape(len(z), -1), score.reshape(len(z), -1)
    dist = torch.cdist(flat, flat) ** 2
    bandwidth = dist.median() / max(1.0, torch.log(torch.tensor(float(len(z) + 1))).item())
    kernel = torch.exp(-dist / bandwidth.clamp_min(1e-8))
    repulsion = (kernel.sum(1, keepdim=True) * flat - kernel @ flat) * 2 / bandwidth.clamp_min(1e-8)
    phi = (kernel @ score + repulsion) / len(z)
    return (flat + step * phi).reshape(z.shape).clamp(0, 1).detach()


def build(folder, spec, target_folder, target_card, data, teacher, dry_run=False, force=False, data_root=None):
    cfg = spec["meco"]
    keras.utils.set_random_seed(spec["seed"])
    model = trained.like_target(target_card, teacher, data, "meco", spec["train"]["init"])
    g = torch.Generator().manual_seed(spec["seed"] + 31)

    def loss(x, y):
        z = svgd_step(x, x, y, model, cfg["svgd_step"], cfg["gamma"])
        z_perturbed = z + cfg["train_scale"] * random_perturbation(z, cfg["eps_low"], cfg["eps_high"], generator=g)
        out_z, out_p = forward(model, z, True), forward(model, z_perturbed.clamp(0, 1), True)
        return (torch.nn.functional.cross_entropy(forward(model, x, True), y)
                + torch.nn.functional.cross_entropy(out_p, y) + cfg["l1_weight"] * (out_p - out_z).abs().mean())

    deployable = MeCoDeployable(model, cfg, trained.training_card(data), seed=spec["seed"])
    trained.train(folder, "meco", spec, data, model, loss, dry_run, force, predict=deployable.predict_proba,
                  config=cfg)
    return {"type": "meco", "file": save_model(folder, model, "meco.keras"), "scale": cfg["scale"],
            "eps_low": cfg["eps_low"], "eps_high": cfg["eps_high"], "seed": spec["seed"]}, {}


class MeCoDeployable(Deployable):
    """f(x + scale * p(x)) with a fresh random perturbation net per query."""

    def __init__(self, model, cfg, card, folder=None, seed=0):
        super().__init__(card, folder)
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(int(seed) + 7)

    def _proba(self, x):
        p = random_perturbation(x, self.cfg["eps_low"], self.cfg["eps_high"], generator=self.generator)
        return torch.softmax(forward(self.model, (x + self.cfg["scale"] * p).clamp(0, 1), False).float(), dim=1)


@register_deployable("meco")
def _load(folder, card):
    folder, entry = pathlib.Path(folder), card["deployable"]
    return MeCoDeployable(load_keras_model(folder / entry["file"]), entry, card, folder, entry.get("seed", 0))
