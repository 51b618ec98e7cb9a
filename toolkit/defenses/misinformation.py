"""Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020).

The API answers (1 - h) y + h y_mis with h = sigmoid(nu (tau - max y)): confident (in-distribution) queries get the
defender's y, unconfident ones (OOD, as most attack queries are assumed to be) the misinformation model's y_mis.
- defender: cross-entropy plus outlier exposure, oe_weight * CE(f(x_ood), uniform), so OOD queries look unconfident;
- misinformation model: CE(log(1 - softmax(f_mis(x)) + 1e-7), y), i.e. little mass on the true class.
"""

import pathlib

import keras
import torch

from toolkit.artifacts import Deployable, load_keras_model, register_deployable, save_model
from toolkit.defenses import trained
from toolkit.models.fast import forward


def build(folder, spec, target_folder, target_card, data, teacher, dry_run=False, force=False, data_root=None):
    cfg = spec["misinformation"]
    keras.utils.set_random_seed(spec["seed"])
    defender = trained.like_target(target_card, teacher, data, "defender", spec["train"]["init"])
    ood = trained.OODBatches(spec, data.input_shape, data_root, spec["train"]["batch_size"], dry_run)

    def defender_loss(x, y):
        # One forward over the clean and outlier images together, as outlier exposure does (Hendrycks et al.; the AM
        # code): BatchNorm normalises the mixed batch, so outliers are not whitened by statistics of their own.
        x_ood = ood.next()
        both = forward(defender, torch.cat([x, x_ood]), True)
        logits, ood_log_p = both[: len(x)], torch.log_softmax(both[len(x):], dim=1)
        return torch.nn.functional.cross_entropy(logits, y) - cfg["oe_weight"] * ood_log_p.mean()

    trained.train(folder, "defender", spec, data, defender, defender_loss, dry_run, force, config=cfg)
    misinformation = trained.like_target(target_card, teacher, data, "misinformation", spec["train"]["init"])

    def misinformation_loss(x, y):
        p = torch.softmax(forward(misinformation, x, True), dim=1)
        return torch.nn.functional.nll_loss(torch.log(1 - p + 1e-7), y)

    trained.train(folder, "misinformation", spec, data, misinformation, misinformation_loss, dry_run, force,
                  config=cfg, select="last")  # its validation accuracy should fall: keep the last epoch
    entry = {"type": "misinformation", "defender": save_model(folder, defender, "defender.keras"),
             "misinformation": save_model(folder, misinformation, "misinformation.keras"),
             "tau": cfg["tau"], "nu": cfg["nu"]}
    return entry, {}


class MisinformationDeployable(Deployable):
    def __init__(self, defender, misinformation, tau, nu, card, folder=None):
        super().__init__(card, folder)
        self.defender, self.misinformation, self.tau, self.nu = defender, misinformation, tau, nu

    def _proba(self, x):
        y = torch.softmax(forward(self.defender, x, False).float(), dim=1)
        y_mis = torch.softmax(forward(self.misinformation, x, False).float(), dim=1)
        h = torch.sigmoid(self.nu * (self.tau - y.max(1, keepdim=True).values))
        return (1 - h) * y + h * y_mis


@register_deployable("misinformation")
def _load(folder, card):
    folder, entry = pathlib.Path(folder), card["deployable"]
    return MisinformationDeployable(load_keras_model(folder / entry["defender"]),
                                    load_keras_model(folder / entry["misinformation"]), entry["tau"], entry["nu"],
                                    card, folder)
