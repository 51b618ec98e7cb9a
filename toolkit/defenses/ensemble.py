"""Soft-voting ensembles: the deployed MISLEADER defense answers with the (weighted) mean of member probabilities."""

import pathlib

from toolkit.artifacts import Deployable, load_keras_model, register_deployable
from toolkit.models.fast import forward


class EnsembleDeployable(Deployable):
    """mean_i w_i softmax(member_i(x)) (released: equal weights, T = 1)."""

    def __init__(self, models, weights, card, folder=None):
        super().__init__(card, folder)
        total = float(sum(weights))
        self.models, self.weights = list(models), [w / total for w in weights]

    def _proba(self, x):
        import torch

        out = None
        for model, weight in zip(self.models, self.weights):
            p = torch.softmax(forward(model, x, training=False), dim=1) * weight
            out = p if out is None else out + p
        return out


@register_deployable("ensemble")
def _load_ensemble(folder, card):
    folder = pathlib.Path(folder)
    entries = card["deployable"]["members"]
    models = [load_keras_model(folder / e["path"] / e["file"]) for e in entries]
    return EnsembleDeployable(models, [e["weight"] for e in entries], card, folder)
