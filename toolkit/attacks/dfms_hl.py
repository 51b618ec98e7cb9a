"""DFMS-HL (Sanyal et al., CVPR 2022): data-free model stealing with hard labels, a DCGAN and proxy data.

Stages (the val-iisc code's order and, by default, its settings; every victim label goes through the oracle):
1. ``gan``: a DCGAN learns the proxy data (no victim signal, no queries).
2. ``init``: the proxy images and ``init_generated`` DCGAN samples (generator in eval mode) are labelled by the
   victim (top-1); the clone trains on them with cross-entropy (SGD 0.1, cosine; batches of 128 proxy + 102
   generated images, pad-crop + flip).
3. ``divgan``: the generator keeps its adversarial loss and adds the class-diversity loss
   ``sum_k pbar_k log pbar_k`` (pbar: the stage-2 clone's batch-mean softmax on G(z); no queries), then
   ``divgan_samples`` samples are labelled and a clone trained from scratch on proxy + DivGAN samples.
4. ``alternate``: per step, G(z) -> AutoAugment -> victim labels -> one clone step (SGD 0.01, warm-up then cosine
   over ``alt_epochs`` proxy-sized epochs); one generator step (adversarial + diversity); one discriminator step;
   until the budget is spent.
Every departure kept from mtk's earlier version is a named field (clone_mix, clone_augment, divgan_clone_from,
sample_mode, alt_schedule). Labelled sets are sent as 8-bit images, as an image API receives them, and kept so a
killed run resumes. The attacker's check slice is every 1/check_fraction-th labelled image, never trained on.
"""
import numpy as np

from toolkit import progress
from toolkit.models.fast import forward
from toolkit.oracle import BudgetExhausted
from toolkit.training.optim import apply_gradients, make_optimizer, zero_grad

PHASES = ("gan", "init", "divgan", "divgan_label", "alternate")
PROXY, INIT, DIVGAN = 0, 1, 2  # the sources of labelled images
REFERENCE_WARMUP_LR = 0.001  # val-iisc train_generator_clone.py: inital_lr, hard-coded
PAD = 4  # RandomCrop(32, padding=4)


def class_diversity_loss(logits):
    """sum_k pbar_k log pbar_k of the batch-mean softmax: minimised when the batch covers the classes evenly."""
    import torch

    pbar = torch.softmax(logits, dim=1).mean(0)
    return (pbar * torch.log(pbar.clamp_min(1e-12))).sum()


def labels_of(answers):
    """Top-1 labels from whatever the oracle returns (DFMS-HL uses labels only)."""
    return answers if answers.ndim == 1 else answers.argmax(1)


class DFMSHLAttack:
    """Runs the four stages against ``oracle``; ``proxy_x`` is uint8 NCHW proxy images (their labels are unused)."""

    def __init__(self, oracle, clone, generator, discriminator, proxy_x, cfg, seed=0, check_fraction=0.0):
        self.oracle, self.clone, self.generator, self.discriminator = oracle, clone, generator, discriminator
        self.proxy_x, self.cfg, self.check_fraction = proxy_x, cfg, check_fraction
        self.rng = np.random.default_rng(seed)
        self.labelled_x = np.zeros((0,) + tuple(proxy_x.shape[1:]), np.uint8)
        self.labelled_y = np.zeros((0,), np.int64)
        self.labelled_source = np.zeros((0,), np.int8)  # PROXY, INIT or DIVGAN: which stage's images each label is
        self.initial_weights = [np.copy(w) for w in clone.get_weights()]  # "from scratch" in stage 3
        self.curve, self.check = [], []
        gan_opt = {"name": "adam", "lr": cfg["gan_lr"], "betas": [cfg["gan_beta1"], 0.999]}
        steps = max(1, len(proxy_x) // cfg["gan_batch_size"])
        self.opt_g, self.opt_d = make_optimizer(gan_opt), make_optimizer(gan_opt)
        cosine = {"name": "cosine"}  # per epoch; the stage loops say which epoch it is (set_epoch)
        self.opt_init = make_optimizer(cfg["clone_optimizer"], cosine, 1, max(1, cfg["init_epochs"]))
        self.opt_div = make_optimizer(cfg["clone_optimizer"], cosine, 1, max(1, cfg["divgan_clone_epochs"]))
        self.alt_epoch_steps = max(1, int(np.ceil(len(proxy_x) / cfg["alt_batch_size"])))
        alt = {"name": "constant"} if cfg["alt_schedule"] == "constant" else {
            "name": "cosine", "warmup_epochs": cfg["alt_warmup_epochs"], "warmup_lr": REFERENCE_WARMUP_LR}
        self.opt_alt = make_optimizer({"name": "sgd", "lr": cfg["alt_lr"], "momentum": 0.9, "weight_decay": 5e-4},
                                      alt, self.alt_epoch_steps, cfg["alt_epochs"])
        self.gan_steps = steps
        self.opt_g.build(generator.trainable_variables)
        self.opt_d.build(discriminator.trainable_variables)
        for opt in (self.opt_init, self.opt_div, self.opt_alt):
            opt.build(clone.trainable_variables)

    def models(self):
        return ({"clone": self.clone, "generator": self.generator, "discriminator": self.discriminator},
                {"g": self.opt_g, "d": self.opt_d, "init": self.opt_init, "div": self.opt_div, "alt": self.opt_alt})

    # --- pieces -------------------------------------------------------------------------------------------------
    def _z(self, n):
        import torch

        return torch.randn(n, self.cfg["nz"])

    def _real(self, n):
        from toolkit.data.batches import to_float_tensor

        idx = self.rng.integers(0, len(self.proxy_x), n)
        return to_float_tensor(self.proxy_x[idx]) * 2 - 1

    def gan_step(self, diversity_weight=0.0):
        """One discriminator step then one generator step (adversarial loss, plus the diversity loss if weighted)."""
        import torch
        import torch.nn.functional as F

        n = self.cfg["gan_batch_size"]
        fake = torch.tanh(forward(self.generator, self._z(n), True))
        real = self._real(n)
        d_vars, g_vars = self.discriminator.trainable_variables, self.generator.trainable_variables
        d_real, d_fake = forward(self.discriminator, real, True), forward(self.discriminator, fake.detach(), True)
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        zero_grad(d_vars)
        loss_d.backward()
        apply_gradients(self.opt_d, d_vars)
        d_out = forward(self.discriminator, fake, True)
        loss_g = F.binary_cross_entropy_with_logits(d_out, torch.ones_like(d_out))
        if diversity_weight:
            loss_g = loss_g + diversity_weight * class_diversity_loss(forward(self.clone, (fake + 1) / 2, False))
        zero_grad(g_vars)
        loss_g.backward()
        apply_gradients(self.opt_g, g_vars)
        zero_grad(self.clone.trainable_variables)  # the diversity loss left gradients on the clone; it is not stepped
        return float(loss_d.detach()), float(loss_g.detach())

    def sample_images(self, n, batch=256):
        """``n`` generator samples as uint8 images (what an image API receives)."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, n, batch):
                pre = forward(self.generator, self._z(min(batch, n - i)), self.cfg["sample_mode"] == "train")
                x = (torch.tanh(pre) + 1) / 2
                out.append(torch.round(x * 255).to(torch.uint8).numpy())
        return np.concatenate(out) if out else np.zeros((0,) + tuple(self.proxy_x.shape[1:]), np.uint8)

    def label(self, x_uint8, source, batch=512):
        """Victim top-1 labels for ``x_uint8`` (from ``source``), appended to the labelled set (stops cleanly at the
        budget)."""
        import torch

        n = min(len(x_uint8), self.oracle.remaining)
        for i in range(0, n, batch):
            chunk = x_uint8[i:min(n, i + batch)]
            y = labels_of(self.oracle.query(torch.from_numpy(chunk))).cpu().numpy().astype(np.int64)
            self.labelled_x = np.concatenate([self.labelled_x, chunk])
            self.labelled_y = np.concatenate([self.labelled_y, y])
            self.labelled_source = np.concatenate([self.labelled_source, np.full(len(y), source, np.int8)])
        return n

    def _split_check(self):
        """(train, check) indices: every 1/check_fraction-th label by arrival is checked, never trained on, so the
        slice of a stage stays the slice when later stages add labels."""
        position = np.arange(len(self.labelled_y))
        f = self.check_fraction
        check = np.floor((position + 1) * f) > np.floor(position * f)
        return position[~check], position[check]

    def _parts(self, sources):
        """The training batches' sources: [(indices, batch size), ...] for the stage's labelled ``sources``."""
        cfg = self.cfg
        train_idx, _ = self._split_check()
        train_idx = train_idx[np.isin(self.labelled_source[train_idx], sources)]
        bs = cfg["clone_batch_size"]
        if cfg["clone_mix"] == "pooled":
            return [(train_idx, bs)]
        proxy = train_idx[self.labelled_source[train_idx] == PROXY]
        generated = train_idx[self.labelled_source[train_idx] != PROXY]
        parts = [(proxy, bs), (generated, max(1, int(round(bs * cfg["generated_batch_ratio"]))))]
        return [(idx, b) for idx, b in parts if len(idx)]

    def _augment_batch(self, x):
        """RandomCrop(padding 4) with mid-grey padding (0 in the reference's [-1, 1] space) and, for pad-crop-flip,
        a horizontal flip with probability 1/2; per image, drawn from the attack's seeded generator."""
        import torch

        mode = self.cfg["clone_augment"]
        if mode == "none":
            return x
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=0.5)
        oy, ox = (torch.from_numpy(self.rng.integers(0, 2 * PAD + 1, n)) for _ in range(2))
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
        if mode == "pad-crop-flip":
            flip = torch.from_numpy(self.rng.random(n) < 0.5)[:, None, None, None]
            out = torch.where(flip, out.flip(3), out)
        return out

    def clone_epoch(self, opt, sources=(PROXY, INIT, DIVGAN)):
        """One epoch over the labelled images of ``sources``; 'per-source' batches end with the shorter source."""
        import torch
        import torch.nn.functional as F

        from toolkit.data.batches import to_float_tensor

        parts = [(self.rng.permutation(idx), b) for idx, b in self._parts(list(sources))]
        if not parts:
            return None
        steps = min(int(np.ceil(len(idx) / b)) for idx, b in parts)
        variables = self.clone.trainable_variables
        loss = None
        for i in range(steps):
            sel = np.concatenate([idx[i * b:(i + 1) * b] for idx, b in parts])
            x = self._augment_batch(to_float_tensor(self.labelled_x[sel]))
            logits = forward(self.clone, x, True)
            loss = F.cross_entropy(logits, torch.from_numpy(self.labelled_y[sel]))
            zero_grad(variables)
            loss.backward()
            apply_gradients(opt, variables)
        return None if loss is None else float(loss.detach())

    def check_agreement(self):
        """Clone vs victim labels on the attacker's own held-back labelled images (never trained on)."""
        import torch

        from toolkit.data.batches import to_float_tensor

        _, check_idx = self._split_check()
        if len(check_idx) == 0:
            return None
        with torch.no_grad():
            pred = forward(self.clone, to_float_tensor(self.labelled_x[check_idx]), False).argmax(1).numpy()
        return float((pred == self.labelled_y[check_idx]).mean())

    def _augment(self, x):
        import torch

        if self.cfg["augment"] == "none":
            return x
        from torchvision.transforms import v2

        if not hasattr(self, "_autoaugment"):
            self._autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
        images = torch.round(x * 255).to(torch.uint8)
        return torch.stack([self._autoaugment(img) for img in images]).float() / 255

    def alternate_step(self, step=0):
        """Stage 4: clone step on augmented generated queries (``step``: stage-4 steps done, which sets the clone's
        rate), then the GAN step with the diversity loss."""
        import torch
        import torch.nn.functional as F

        n, variables = self.cfg["alt_batch_size"], self.clone.trainable_variables
        with torch.no_grad():
            x = self._augment((torch.tanh(forward(self.generator, self._z(n), True)) + 1) / 2)
        y = labels_of(self.oracle.query(x))
        self.opt_alt.mtk_schedule.set_epoch(step // self.alt_epoch_steps)
        logits = forward(self.clone, x, True)
        self.check.append(float((logits.detach().argmax(1) == y).float().mean()))
        loss = F.cross_entropy(logits, y)
        zero_grad(variables)
        loss.backward()
        apply_gradients(self.opt_alt, variables)
        self.gan_step(self.cfg["alt_diversity_weight"])
        return float(loss.detach())

    # --- the run --------------------------------------------------------------------------------------------------
    def _point(self, stage, evaluate, check):
        point = {"queries": self.oracle.queries_used, "stage": stage, "attacker_check_agreement": check}
        return {**point, **(evaluate(self.clone) if evaluate else {})}

    def _save(self, state, stage, epoch, **extra):
        if state is None:
            return
        models, optimizers = self.models()
        meta = {"stage": stage, "epoch": epoch, "curve": self.curve, "rng": self.rng.bit_generator.state, **extra}
        state.save(self.oracle, models, optimizers, meta, {"labelled_x": self.labelled_x,
                                                           "labelled_y": self.labelled_y,
                                                           "labelled_source": self.labelled_source})

    def run(self, state=None, checkpoint_every=None, progress_every=None, evaluate=None):
        """Runs (or resumes) the stages; returns the accuracy-vs-queries curve."""
        import collections

        cfg = self.cfg
        phase, epoch, meta = PHASES[0], 0, {}
        if state is not None and (saved := state.restore(self.oracle, *self.models())) is not None:
            meta, arrays = saved
            self.curve, self.rng.bit_generator.state = meta["curve"], meta["rng"]
            self.labelled_x, self.labelled_y = arrays["labelled_x"], arrays["labelled_y"]
            self.labelled_source = arrays["labelled_source"]
            phase, epoch = meta["stage"], meta["epoch"]
        if meta.get("finished"):
            return self.curve
        at = PHASES.index(phase)

        def start(name):  # None: already done; else the epoch (or step) to start from
            i = PHASES.index(name)
            return None if i < at else (epoch if i == at else 0)

        def labelled(name):
            return PHASES.index(name) == at and meta.get("labelled", False)

        try:
            self._gan_stage("gan", cfg["gan_epochs"], 0.0, start("gan"), state)
            self._clone_stage("init", INIT, cfg["init_generated"], cfg["init_epochs"], self.opt_init, start("init"),
                              labelled("init"), state, evaluate, sources=(PROXY, INIT))
            self._gan_stage("divgan", cfg["divgan_epochs"], cfg["diversity_weight"], start("divgan"), state)
            scratch = cfg["divgan_clone_from"] == "scratch"
            self._clone_stage("divgan_label", DIVGAN, cfg["divgan_samples"], cfg["divgan_clone_epochs"], self.opt_div,
                              start("divgan_label"), labelled("divgan_label"), state, evaluate,
                              sources=(PROXY, DIVGAN) if scratch else (PROXY, INIT, DIVGAN), scratch=scratch)
        except BudgetExhausted:
            pass
        self.check = collections.deque(maxlen=16)
        steps, limit, n = start("alternate") or 0, cfg["alt_steps"], cfg["alt_batch_size"]
        every_point = max(1, (progress_every or self.oracle.budget) // n)
        every_save = max(1, (checkpoint_every or self.oracle.budget) // n)
        bar = progress.bar(self.oracle.budget, "dfms-hl alternate", unit="q", initial=self.oracle.queries_used)
        try:
            while self.oracle.remaining >= n and (limit is None or steps < limit):
                loss = self.alternate_step(steps)
                steps += 1
                bar.update(n)
                bar.set_postfix(loss_S=f"{loss:.3f}", check=f"{np.mean(self.check):.3f}", refresh=False)
                if steps % every_point == 0:
                    self.curve.append(self._point("alternate", evaluate, float(np.mean(self.check))))
                if steps % every_save == 0:
                    self._save(state, "alternate", steps)
        except BudgetExhausted:
            pass
        finally:
            bar.close()
        if not self.curve or self.curve[-1]["queries"] != self.oracle.queries_used:
            check = float(np.mean(self.check)) if self.check else self.check_agreement()
            self.curve.append(self._point("alternate" if steps else "divgan_label", evaluate, check))
        self._save(state, "alternate", steps, finished=True)
        return self.curve

    def _gan_stage(self, stage, epochs, diversity_weight, start, state):
        if start is None or start >= epochs:
            return
        bar = progress.bar((epochs - start) * self.gan_steps, f"dfms-hl {stage}", unit="step")
        for epoch in range(start, epochs):
            bar.set_description(f"dfms-hl {stage} epoch {epoch + 1}/{epochs}")
            for _ in range(self.gan_steps):
                loss_d, loss_g = self.gan_step(diversity_weight)
                bar.update(1)
                bar.set_postfix(loss_D=f"{loss_d:.3f}", loss_G=f"{loss_g:.3f}", refresh=False)
            self._save(state, stage, epoch + 1)
        bar.close()

    def _clone_stage(self, stage, source, n_generated, epochs, opt, start, labelled, state, evaluate, sources,
                     scratch=False):
        if start is None:
            return
        if not labelled:
            if source == INIT:
                self.label(self.proxy_x, PROXY)
            self.label(self.sample_images(min(n_generated, self.oracle.remaining)), source)
            if scratch:  # a fresh clone (the initial weights); saved at once, so a resumed run keeps training it
                self.clone.set_weights(self.initial_weights)
            start = 0
            self._save(state, stage, 0, labelled=True)
        used = int(np.isin(self.labelled_source, sources).sum())
        progress.log(f"[dfms-hl] {stage}: {len(self.labelled_y)} labelled images ({used} used by this stage), "
                     f"{self.oracle.queries_used}/{self.oracle.budget} queries")
        bar = progress.bar(max(0, epochs - start), f"dfms-hl {stage} clone", unit="epoch")
        for epoch in range(start, epochs):
            opt.mtk_schedule.set_epoch(epoch)
            loss = self.clone_epoch(opt, sources)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-", refresh=False)
            self._save(state, stage, epoch + 1, labelled=True)
        bar.close()
        self.curve.append(self._point(stage, evaluate, self.check_agreement()))
        check = self.curve[-1]["attacker_check_agreement"]
        progress.log(f"[dfms-hl] after {stage}: attacker check agreement "
                     f"{'-' if check is None else f'{check:.4f}'}")
