"""DNF, Dynamic Neural Fortresses (ICLR 2025): early exits on the frozen target decide who gets a real answer.

Heads (global average pool -> dense(hidden) -> ReLU -> dense(K)) read feature maps spread over the backbone. A query
gets the first exit whose max softmax reaches its threshold, else the target's own output. Heads train with
  in distribution: sum_e CE(exit_e(x), y) - w * H(exits(x))      (stay unsure: real queries reach the final exit)
  OOD:             sum_e CE(exit_e(x~), argmax exit_0(x~)) + w * H(exits(x~))   (be sure: leave early, say little)
The backbone is frozen, so the official +/- w * H(final) terms have no gradient and are left out. Fixed official
bugs: the OOD term acts in every epoch (not only the first); thresholds apply to softmax, not logits.
"""

import pathlib

import keras
import torch

from toolkit.artifacts import Deployable, load_keras_model, register_deployable, save_model
from toolkit.defenses import trained
from toolkit.errors import UserError
from toolkit.models.fast import forward


def exit_layers(model, count):
    """``count`` layers with 4-D (feature map) outputs, spread evenly over the backbone, excluding the last one."""
    maps = [layer for layer in model.layers[1:] if len(getattr(layer, "output", None).shape or ()) == 4]
    maps = maps[:-1] or maps
    if not maps:
        raise UserError(f"dnf: architecture '{model.name}' has no feature maps to attach exits to")
    count = min(count, len(maps))
    return [maps[round((i + 1) * len(maps) / (count + 1)) - 1] for i in range(count)]


def with_exits(backbone, count, num_classes, hidden):
    """One Keras model: inputs -> [exit_1, ..., exit_n, final logits], the backbone's layers frozen."""
    for layer in backbone.layers:
        layer.trainable = False
    outputs = []
    for i, layer in enumerate(exit_layers(backbone, count)):
        h = keras.layers.GlobalAveragePooling2D(data_format="channels_first", name=f"exit{i}_pool")(layer.output)
        h = keras.layers.Dense(hidden, activation="relu", name=f"exit{i}_hidden")(h)
        outputs.append(keras.layers.Dense(num_classes, name=f"exit{i}_logits")(h))
    return keras.Model(backbone.inputs, outputs + [backbone.outputs[0]], name="dnf")


def build(folder, spec, target_folder, target_card, data, teacher, dry_run=False, force=False, data_root=None):
    cfg = spec["dnf"]
    keras.utils.set_random_seed(spec["seed"])
    backbone = load_keras_model(pathlib.Path(target_folder) / target_card["deployable"]["file"])
    model = with_exits(backbone, cfg["exits"], data.num_classes, cfg["hidden"] or 10 * data.num_classes)
    thresholds = list(cfg["thresholds"])[: len(model.outputs) - 1]
    if len(thresholds) < len(model.outputs) - 1:
        raise UserError(f"$.dnf.thresholds: {len(thresholds)} thresholds for {len(model.outputs) - 1} exits")
    ood = trained.OODBatches(spec, data.input_shape, data_root, spec["train"]["batch_size"], dry_run)
    w = cfg["entropy_weight"]

    def loss(x, y):
        exits = forward(model, x, False)[:-1]  # heads have no BatchNorm/Dropout; the backbone stays in inference
        total = sum(torch.nn.functional.cross_entropy(e, y) - w * trained.entropy(e) for e in exits)
        ood_exits = forward(model, ood.next(), False)[:-1]
        pseudo = ood_exits[0].argmax(1).detach()
        return total + sum(torch.nn.functional.cross_entropy(e, pseudo) + w * trained.entropy(e) for e in ood_exits)

    deployable = DNFDeployable(model, thresholds, trained.training_card(data))
    trained.train(folder, "dnf", spec, data, model, loss, dry_run, force, predict=deployable.predict_proba,
                  config=cfg)
    return {"type": "dnf", "file": save_model(folder, model, "dnf.keras"), "thresholds": thresholds}, {}


class DNFDeployable(Deployable):
    """The first exit whose max softmax reaches its threshold answers; the final output otherwise."""

    def __init__(self, model, thresholds, card, folder=None):
        super().__init__(card, folder)
        self.model, self.thresholds = model, list(thresholds)

    def answers(self, x):
        """(probabilities, index of the exit that answered; len(thresholds) = the final output)."""
        outs = [torch.softmax(o.float(), dim=1) for o in forward(self.model, x, False)]
        answer, taken = outs[-1].clone(), torch.full((len(x),), len(outs) - 1, device=x.device)
        for i in reversed(range(len(outs) - 1)):  # earlier exits override later ones
            ok = outs[i].max(1).values >= self.thresholds[i]
            answer[ok], taken[ok] = outs[i][ok], i
        return answer, taken

    def _proba(self, x):
        return self.answers(x)[0]


@register_deployable("dnf")
def _load(folder, card):
    folder, entry = pathlib.Path(folder), card["deployable"]
    return DNFDeployable(load_keras_model(folder / entry["file"]), entry["thresholds"], card, folder)
