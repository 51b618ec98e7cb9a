"""Optimizers and epoch-wise learning-rate schedules with torch semantics, as Keras objects."""

import math

from toolkit.backend import configure_keras

keras = configure_keras()


@keras.saving.register_keras_serializable(package="mtk")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate that changes once per epoch like torch's MultiStepLR / CosineAnnealingLR (stepped per epoch)."""

    def __init__(self, lr, steps_per_epoch, epochs, name="constant", milestones=(), gamma=0.1, offset=0,
                 warmup_epochs=0, warmup_lr=0.0):
        self.lr, self.steps_per_epoch, self.epochs = float(lr), int(steps_per_epoch), int(epochs)
        self.name, self.milestones, self.gamma = name, [int(m) for m in milestones], float(gamma)
        self.offset = int(offset)  # 1: the scheduler is stepped before each epoch (rates one epoch ahead)
        # val-iisc's --warmup (DFMS-HL stage 4): after each epoch e < W it sets the rate to warmup_lr * e, so epoch
        # k in 1..W runs at warmup_lr * (k - 1); the chained cosine then carries on from there (see lr_at_epoch).
        self.warmup_epochs, self.warmup_lr = int(warmup_epochs), float(warmup_lr)
        self.epoch = None  # set_epoch: the training loop says which epoch it is in (sets of changing size)

    def set_epoch(self, epoch):
        """Follow the loop's epoch counter instead of deriving the epoch from the step count."""
        self.epoch = int(epoch)

    def lr_at_epoch(self, epoch):
        epoch += self.offset
        w = self.warmup_epochs
        if w and 1 <= epoch <= w:
            return self.warmup_lr * (epoch - 1)
        if self.name == "multistep":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.name == "cosine":
            if w and epoch > w:  # torch's chained cosine from the last warm-up rate: ratios of (1 + cos) telescope
                return self.warmup_lr * (w - 1) * self._cos(epoch) / self._cos(w)
            return self.lr * 0.5 * self._cos(epoch)
        return self.lr

    def _cos(self, epoch):
        return 1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs)

    def __call__(self, step):
        epoch = int(step) // max(1, self.steps_per_epoch) if self.epoch is None else self.epoch
        return self.lr_at_epoch(epoch)

    def get_config(self):
        return {"lr": self.lr, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "name": self.name,
                "milestones": self.milestones, "gamma": self.gamma, "offset": self.offset,
                "warmup_epochs": self.warmup_epochs, "warmup_lr": self.warmup_lr}


def make_optimizer(config, schedule=None, steps_per_epoch=1, epochs=1):
    """A Keras optimizer from an optimizer spec block. L2 weight decay (sgd/adam) is added to the gradient by
    ``apply_gradients`` below, as torch does; adamw decays decoupled inside Keras."""
    schedule = schedule or {"name": "constant"}
    lr = EpochSchedule(config["lr"], steps_per_epoch, epochs, schedule.get("name", "constant"),
                       schedule.get("milestones", ()), schedule.get("gamma", 0.1), schedule.get("offset", 0),
                       schedule.get("warmup_epochs", 0), schedule.get("warmup_lr", 0.0))
    clip = config.get("clip_norm")
    name = config.get("name", "sgd")
    if name == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=config.get("momentum", 0.9), nesterov=config.get("nesterov", False),
                                   global_clipnorm=clip)
    elif name == "adam":
        b1, b2 = config.get("betas", (0.9, 0.999))
        opt = keras.optimizers.Adam(lr, beta_1=b1, beta_2=b2, epsilon=1e-8, global_clipnorm=clip)
    elif name == "adamw":
        b1, b2 = config.get("betas", (0.9, 0.999))
        opt = keras.optimizers.AdamW(lr, beta_1=b1, beta_2=b2, epsilon=1e-8,
                                     weight_decay=config.get("weight_decay", 0.0), global_clipnorm=clip)
    else:
        raise ValueError(f"unknown optimizer {name}")
    opt.mtk_l2 = 0.0 if name == "adamw" else float(config.get("weight_decay", 0.0))
    opt.mtk_schedule = lr
    return opt


def apply_gradients(optimizer, variables):
    """One optimizer step from the ``.grad`` of each variable's torch tensor (then clears them)."""
    grads = []
    for v in variables:
        g = v.value.grad
        if g is None:
            import torch

            g = torch.zeros_like(v.value)
        elif optimizer.mtk_l2:
            g = g.add(v.value.detach(), alpha=optimizer.mtk_l2)
        grads.append(g)
        v.value.grad = None
    optimizer.apply(grads, variables)


def zero_grad(variables):
    for v in variables:
        v.value.grad = None


class LossScaler:
    """Dynamic loss scaling for float16 autocast on CUDA (torch's GradScaler rule, on Keras variables).

    ``backward(loss)`` back-propagates ``loss * scale``; ``step(optimizer, variables)`` divides the gradients by the
    scale and applies them if all are finite, else skips the step and halves the scale; after ``growth_interval``
    finite steps the scale doubles. Scales are powers of two, so with ``enabled=False`` (CPU) or no overflow the
    update is exactly the unscaled one.
    """

    def __init__(self, enabled=True, init_scale=2.0 ** 16, growth_interval=2000):
        self.enabled, self.scale, self.growth_interval = bool(enabled), float(init_scale), int(growth_interval)
        self.good_steps, self.skipped = 0, 0

    def backward(self, loss):
        (loss * self.scale if self.enabled else loss).backward()

    def step(self, optimizer, variables):
        """Applies the step unless a gradient overflowed; returns whether it was applied."""
        import torch

        if not self.enabled:
            apply_gradients(optimizer, variables)
            return True
        grads = [v.value.grad for v in variables if v.value.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            zero_grad(variables)
            self.scale, self.good_steps, self.skipped = self.scale / 2, 0, self.skipped + 1
            return False
        for g in grads:
            g.div_(self.scale)
        apply_gradients(optimizer, variables)
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True
