"""EDM, Ensemble of Diverse Models (Kariyappa, Prakash & Qureshi, ICLR 2021). No official code exists; our choices:

- members share the target's architecture and start from its weights (``train.init``), trained jointly with
  sum_i CE(f_i(x), y) + diversity_weight * log sum_{i<j} exp(cos(p_i(x_ood), p_j(x_ood))): accurate in distribution,
  dissimilar on OOD inputs (the smooth maximum of pairwise cosine similarities is the paper's coherence measure);
- the answering member is chosen by a keyed hash of the quantised input: the same query always gets the same member,
  a slightly different one usually another, which makes the API discontinuous for gradient-based attackers.
"""

import pathlib

import keras
import numpy as np
import torch

from toolkit.artifacts import Deployable, load_keras_model, register_deployable, save_model
from toolkit.defenses import trained
from toolkit.models.fast import forward

_PRIME = 2_147_483_647  # 2^31 - 1


def coherence(probs):
    """log sum_{i<j} exp(cos(p_i, p_j)), averaged over the batch; probs: members x N x K."""
    unit = torch.nn.functional.normalize(probs, dim=2)
    cos = torch.einsum("ink,jnk->nij", unit, unit)
    i, j = torch.triu_indices(len(probs), len(probs), offset=1)
    return torch.logsumexp(cos[:, i, j], dim=1).mean()


def member_index(x, members, key):
    """Which member answers each row of x: a keyed hash of its 8-bit pixels, modulo the ensemble size."""
    pixels = torch.round(x.reshape(len(x), -1).clamp(0, 1) * 255).long()
    weights = torch.as_tensor(np.random.default_rng(key).integers(1, _PRIME, pixels.shape[1]), device=x.device)
    return ((pixels * weights).remainder(_PRIME).sum(1).remainder(_PRIME)).remainder(members)


def build(folder, spec, target_folder, target_card, data, teacher, dry_run=False, force=False, data_root=None):
    cfg = spec["edm"]
    keras.utils.set_random_seed(spec["seed"])
    members = [trained.like_target(target_card, teacher, data, f"member_{i}", spec["train"]["init"])
               for i in range(cfg["members"])]
    if spec["train"]["init"] == "target":  # distinct starting points, or the diversity term has nothing to split
        with torch.no_grad():
            for i, member in enumerate(members[1:], 1):
                g = torch.Generator().manual_seed(spec["seed"] * 1000 + i)
                for v in member.trainable_variables:
                    v.value.add_(torch.randn(v.value.shape, generator=g) * 0.01 * v.value.std().clamp_min(1e-3))
    ood = trained.OODBatches(spec, data.input_shape, data_root, spec["train"]["batch_size"], dry_run)
    variables = [v for m in members for v in m.trainable_variables]

    def loss(x, y):
        ce = sum(torch.nn.functional.cross_entropy(forward(m, x, True), y) for m in members)
        x_ood = ood.next()
        # OOD images use BatchNorm's running statistics: they must not shape the statistics the deployed members use
        probs = torch.stack([torch.softmax(forward(m, x_ood, False), dim=1) for m in members])
        return ce + cfg["diversity_weight"] * coherence(probs)

    key = spec["seed"] + 104729
    deployable = EDMDeployable(members, key, trained.training_card(data))
    trained.train(folder, "edm", spec, data, members[0], loss, dry_run, force, variables=variables,
                  extra_models={f"member_{i}": m for i, m in enumerate(members[1:], 1)},
                  predict=deployable.predict_proba, config=cfg)
    files = [save_model(folder, m, f"member_{i}.keras") for i, m in enumerate(members)]
    return {"type": "edm", "members": files, "hash_key": key}, {}


class EDMDeployable(Deployable):
    """Each query answered by the member its input hashes to (softmax of that member's logits)."""

    def __init__(self, members, key, card, folder=None):
        super().__init__(card, folder)
        self.members, self.key = list(members), key

    def _proba(self, x):
        pick = member_index(x, len(self.members), self.key)
        out = torch.empty((len(x), self.num_classes), dtype=torch.float32, device=x.device)
        for i, member in enumerate(self.members):
            rows = (pick == i).nonzero(as_tuple=True)[0]
            if len(rows):
                out[rows] = torch.softmax(forward(member, x[rows], False).float(), dim=1)
        return out


@register_deployable("edm")
def _load(folder, card):
    folder, entry = pathlib.Path(folder), card["deployable"]
    return EDMDeployable([load_keras_model(folder / f) for f in entry["members"]], entry["hash_key"], card, folder)
