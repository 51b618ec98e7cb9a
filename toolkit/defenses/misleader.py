"""MISLEADER (paper Algorithm 1): members distilled from the target while misleading a simulated clone.

Each member d trains beside its own simulated attacker a. Per batch (one "bilevel" round, as released):
  1. attacker step on an augmented batch x~:  KL(d(x~) || a(x~)) with d's answers fixed;
  2. member step:  alpha*T^2*KL(t/T || d/T) + (1-alpha)*CE(d(x), y) - lambda*D(d(x~) || a(x~)),  a's answers fixed.
Members train independently (each resumable per epoch) and are deployed as a soft-voting ensemble.
"""

import pathlib

from toolkit import artifacts, progress
from toolkit.backend import configure_keras, device
from toolkit.data import BatchStream
from toolkit.data.augment import AttackerAugmentation, clean_augmentation
from toolkit.defenses.losses import adversary_divergence, attacker_loss, distillation_loss
from toolkit.models import build_model, count_trainable_params
from toolkit.models.fast import forward
from toolkit.training.evaluate import accuracy, agreement, model_predictor
from toolkit.training.loop import EpochLoop
from toolkit.training.optim import LossScaler, make_optimizer, zero_grad

keras = configure_keras()


@keras.saving.register_keras_serializable(package="mtk")
class MisleaderMember(keras.Model):
    """A member d, its simulated attacker a and the frozen target t, with MISLEADER's custom train step.

    ``compile(d_optimizer=..., a_optimizer=...)`` then ``train_step(((x, x_attack), y))`` per batch; the returned
    dict holds every loss term. The deployable part is ``self.defender``.
    """

    def __init__(self, defender, attacker, teacher, config, augment=None, clean_augment=None, mixed_precision=False,
                 **kwargs):
        super().__init__(**kwargs)
        import torch

        # float16 autocast + dynamic loss scaling, as the released code's AMP; only on CUDA (slower on this CPU).
        self.amp = bool(mixed_precision) and torch.cuda.is_available()
        self.d_scaler, self.a_scaler = LossScaler(self.amp), LossScaler(self.amp)
        self.defender, self.attacker, self.teacher = defender, attacker, teacher
        self.config = config
        self.augment = augment or AttackerAugmentation()
        self.clean_augment = clean_augment
        self.teacher.trainable = False
        # Without BatchNorm or Dropout, k passes on one batch compute k identical gradients: one pass with k x the
        # loss is the same math at 1/k of the cost (LeNet attackers), so 'repeat' takes that path too.
        self._attacker_is_deterministic = not any(
            isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Dropout)) for layer in attacker.layers)

    def compile(self, d_optimizer, a_optimizer, **kwargs):
        # A plain compile() would build an unused default optimizer over every weight.
        keras.Model.compile(self, optimizer=None, **kwargs)
        self.d_optimizer, self.a_optimizer = d_optimizer, a_optimizer
        self.d_optimizer.build(self.defender.trainable_variables)
        self.a_optimizer.build(self.attacker.trainable_variables)

    def call(self, x, training=False):
        return forward(self.defender, x, training)

    def losses_on(self, x, y, x_attack):
        """The member objective on a fixed batch (no parameter update): total, kd, ce, adversary terms."""
        import torch

        cfg = self.config
        with self._autocast():
            with torch.no_grad():
                t_logits = forward(self.teacher, x, False).float()
                a_logits = forward(self.attacker, x_attack, True).float()
            d_logits = forward(self.defender, x, True).float()
            d_attack_logits = forward(self.defender, x_attack, True).float()
        distill, kd, ce = distillation_loss(d_logits, t_logits, y, cfg["temperature"], cfg["alpha"])
        adv = adversary_divergence(d_attack_logits, a_logits, cfg["adversary_loss"], cfg["adversary_clamp"])
        return {"loss": distill - cfg["lambda"] * adv, "kd": kd, "ce": ce, "adv": adv, "d_logits": d_logits}

    def attacker_step(self, x_attack):
        """One update of the simulated clone towards the member's current answers on x~."""
        import torch

        acfg = self.config["attacker"]
        a_vars = self.attacker.trainable_variables
        with torch.no_grad(), self._autocast():
            d_attack = forward(self.defender, x_attack, True).float()

        def attacker_out():
            with self._autocast():
                return forward(self.attacker, x_attack, True).float()

        zero_grad(a_vars)
        if acfg["mode"] == "accumulate" and (acfg["passes"] == "scale" or self._attacker_is_deterministic):
            # One pass with k x the loss: the same summed gradient as k identical passes, at 1/k of the cost.
            loss = attacker_loss(d_attack, attacker_out())
            self.a_scaler.backward(loss * acfg["steps"])
            self.a_scaler.step(self.a_optimizer, a_vars)
            return float(loss.detach())
        total = 0.0
        for _ in range(acfg["steps"]):
            loss = attacker_loss(d_attack, attacker_out())
            self.a_scaler.backward(loss)
            total += float(loss.detach())
            if acfg["mode"] == "steps":
                self.a_scaler.step(self.a_optimizer, a_vars)
        if acfg["mode"] == "accumulate":  # released: k backward passes summed, then one step
            self.a_scaler.step(self.a_optimizer, a_vars)
        return total / acfg["steps"]

    def _autocast(self):
        import torch

        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def train_step(self, data):
        (x, x_attack), y = data
        if self.clean_augment is not None:
            x = self.clean_augment(x)
        x_attack = self.augment(x_attack, training=True)
        a_loss = self.attacker_step(x_attack)
        d_vars = self.defender.trainable_variables
        terms = self.losses_on(x, y, x_attack)
        zero_grad(d_vars)
        self.d_scaler.backward(terms["loss"])
        self.d_scaler.step(self.d_optimizer, d_vars)
        acc = float((terms["d_logits"].argmax(1) == y).float().mean())
        return {"loss": float(terms["loss"].detach()), "kd": float(terms["kd"].detach()),
                "ce": float(terms["ce"].detach()), "adv": float(terms["adv"].detach()), "atk": a_loss, "acc": acc}


def member_names(members):
    names, seen = [], {}
    for m in members:
        base = m["name"] or m["architecture"]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 and sum(
            (x["name"] or x["architecture"]) == base for x in members) == 1 else f"{base}_{seen[base]}")
    return names


def train_member(folder, name, member_cfg, spec, data, teacher, teacher_predict, fingerprint, steps_cap=None,
                 epochs=None, force=False):
    """Trains one member (resuming per epoch) and saves it as its own deployable folder; returns its card."""
    import torch

    folder = pathlib.Path(folder)
    card_path = folder / artifacts.CARD
    if card_path.exists():
        card = artifacts.read_card(folder)
        if card.get("fingerprint") == fingerprint:
            progress.log(f"[{name}] already trained (test acc {card['metrics']['test_acc']:.4f})")
            return card
    keras.utils.set_random_seed(spec["seed"] + 1000 * (1 + sum(map(ord, name))) % 100_000)
    shape, k = data.input_shape, data.num_classes
    defender = build_model(member_cfg["architecture"], shape, k, data.mean, data.std, name=name,
                           **member_cfg["options"])
    acfg = member_cfg["attacker"]
    attacker = build_model(acfg["architecture"] or member_cfg["architecture"], shape, k, data.mean, data.std,
                           name=f"{name}_attacker", **(acfg["options"] or member_cfg["options"]))
    dev = device()
    bs = member_cfg["batch_size"]
    clean = BatchStream(data.train, bs, shuffle=True, seed=spec["seed"], drop_last=True, device=dev)
    attack_stream = BatchStream(data.train, bs, shuffle=True, seed=spec["seed"] + 7919, drop_last=True, device=dev)
    steps = min(len(clean), steps_cap or len(clean), member_cfg.get("steps_per_epoch") or len(clean))
    epochs = epochs or member_cfg["epochs"]
    d_opt = make_optimizer(member_cfg["optimizer"], member_cfg["schedule"], steps, epochs)
    a_opt = make_optimizer(acfg["optimizer"], acfg["schedule"], steps, epochs)
    trainer = MisleaderMember(defender, attacker, teacher, member_cfg, AttackerAugmentation(spec["augment"]),
                              clean_augmentation(spec["clean_augment"]), mixed_precision=spec["mixed_precision"])
    trainer.compile(d_optimizer=d_opt, a_optimizer=a_opt)
    loop = EpochLoop(folder, name, epochs, steps, {"defender": defender, "attacker": attacker},
                     {"d_opt": d_opt, "a_opt": a_opt}, fingerprint, "best_val", discard_stale=force)
    d_predict, a_predict = model_predictor(defender, dev), model_predictor(attacker, dev)

    def train_epoch(epoch, on_step):
        sums, n = {}, 0
        for i, ((x, y), (x_att, _)) in enumerate(zip(clean.epoch(epoch), attack_stream.epoch(epoch))):
            if i >= steps:
                break
            metrics = trainer.train_step(((x, x_att), y))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            n += 1
            on_step(**{key: sums[key] / n for key in ("loss", "kd", "ce", "adv", "atk")})
        out = {f"train_{key}": value / max(1, n) for key, value in sums.items()}
        out["lr"] = float(d_opt.mtk_schedule.lr_at_epoch(epoch))
        return out

    def validate():
        return {"val_acc": accuracy(d_predict, data.val), "val_attacker_acc": accuracy(a_predict, data.val)}

    meta = loop.run(train_epoch, validate)
    with torch.no_grad():
        metrics = {
            "val_acc": accuracy(d_predict, data.val), "test_acc": accuracy(d_predict, data.test),
            "test_agreement_with_target": agreement(d_predict, teacher_predict, data.test.x),
            "simulated_attacker_test_acc": accuracy(a_predict, data.test),
            "selected_epoch": meta["best"]["epoch"],
        }
    filename = artifacts.save_model(folder, defender)
    artifacts.save_model(folder, attacker, "attacker.keras")  # the simulated clone, kept for analysis
    card = {
        "kind": "member", "name": name, "created": artifacts.now(),
        "deployable": {"type": "model", "file": filename},
        "dataset": artifacts.dataset_card(data),
        "architecture": {"architecture": member_cfg["architecture"], "options": member_cfg["options"],
                         "trainable_params": count_trainable_params(defender)},
        "member": member_cfg, "metrics": metrics, "history": meta["history"],
        "train_seconds": round(meta["elapsed"], 1), "fingerprint": fingerprint, "versions": artifacts.versions(),
    }
    artifacts.write_card(folder, card)
    loop.clear()
    progress.log(f"[{name}] val acc {metrics['val_acc']:.4f}, test acc {metrics['test_acc']:.4f}, "
                 f"agreement with target {metrics['test_agreement_with_target']:.4f}")
    return card
