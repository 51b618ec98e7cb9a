"""ACT, Bayesian active watermarking (ICML 2024): the deployed model answers f(x + scale * w(x)).

A small watermark net w and the target f are fine-tuned together. Even batches:
  CE(f(x + scale w(x)), y) - alpha * CE(f(g), f(g + scale w(g)))
with g images from a random DFME-style generator whose weights get N(0, noise^2) jitter after every step (attacker
queries of unknown shape); odd batches: CE(f(x + scale w(x)), y). The second term makes the watermark change what
an extraction-style query would be told while clean accuracy is kept.
Simplified (stated): the official Wasserstein-gradient-flow (SVGD) step on the watermark's outputs is left out, so
this w is a point estimate. Fixed: the official inference re-initialises the watermark net on every call; here the
trained watermark is saved and used. Generated images pass BatchNorm with its running statistics, so they never shape
the statistics the deployed model normalises real queries with.
"""

import pathlib

import keras
import torch

from toolkit.artifacts import Deployable, load_keras_model, register_deployable, save_model
from toolkit.defenses import trained
from toolkit.models.fast import forward


def watermark_net(input_shape, width=16, name="watermark"):
    """x -> w(x) in [-1, 1], same shape as x: two 3x3 convolutions."""
    channels = int(input_shape[0])
    inputs = keras.Input(tuple(input_shape))
    h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    out = keras.layers.Conv2D(channels, 3, padding="same", activation="tanh",
                              kernel_initializer=keras.initializers.RandomNormal(stddev=1e-3))(h)
    return keras.Model(inputs, out, name=name)


def build(folder, spec, target_folder, target_card, data, teacher, dry_run=False, force=False, data_root=None):
    from toolkit.models.generators import dfme_generator

    cfg = spec["act"]
    keras.utils.set_random_seed(spec["seed"])
    model = trained.like_target(target_card, teacher, data, "act", spec["train"]["init"])
    mark = watermark_net(data.input_shape)
    generator = dfme_generator(100, data.input_shape, 32)
    g = torch.Generator().manual_seed(spec["seed"] + 43)
    step = {"n": 0}

    def marked(x, training):
        return forward(model, (x + cfg["scale"] * forward(mark, x, training)).clamp(0, 1), training)

    def loss(x, y):
        step["n"] += 1
        out = torch.nn.functional.cross_entropy(marked(x, True), y)
        if step["n"] % 2 == 0:
            with torch.no_grad():
                fake = (torch.tanh(forward(generator, torch.randn(len(x), 100, generator=g), False)) + 1) / 2
                for v in generator.trainable_variables:  # a moving target: jitter the generator after each use
                    v.value.add_(torch.randn(v.value.shape, generator=g) * cfg["generator_noise"])
            # Generated images go through BatchNorm with its running statistics (training=False): in training mode
            # they would pull the statistics the deployed model uses towards generator noise (CIFAR-10 utility fell
            # from 87 % to 44 %); the loss still back-propagates through them.
            clean = torch.softmax(forward(model, fake, False), dim=1).detach()
            out = out - cfg["alpha"] * -(clean * torch.log_softmax(marked(fake, False), dim=1)).sum(1).mean()
        return out

    deployable = ACTDeployable(model, mark, cfg["scale"], trained.training_card(data))
    variables = list(model.trainable_variables) + list(mark.trainable_variables)
    trained.train(folder, "act", spec, data, model, loss, dry_run, force, variables=variables,
                  extra_models={"watermark": mark}, predict=deployable.predict_proba, config=cfg)
    return {"type": "act", "file": save_model(folder, model, "act.keras"),
            "watermark": save_model(folder, mark, "watermark.keras"), "scale": cfg["scale"]}, {}


class ACTDeployable(Deployable):
    def __init__(self, model, mark, scale, card, folder=None):
        super().__init__(card, folder)
        self.model, self.mark, self.scale = model, mark, scale

    def _proba(self, x):
        marked = (x + self.scale * forward(self.mark, x, False)).clamp(0, 1)
        return torch.softmax(forward(self.model, marked, False).float(), dim=1)


@register_deployable("act")
def _load(folder, card):
    folder, entry = pathlib.Path(folder), card["deployable"]
    return ACTDeployable(load_keras_model(folder / entry["file"]), load_keras_model(folder / entry["watermark"]),
                         entry["scale"], card, folder)
