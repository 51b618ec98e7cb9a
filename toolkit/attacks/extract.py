"""``mtk extract``: one threat model (attack x victim x clone x budget) from a threat spec, through the oracle only."""

import pathlib

import numpy as np

from toolkit import artifacts, progress
from toolkit.artifacts import load_deployable
from toolkit.data import Split, load_dataset
from toolkit.errors import UserError
from toolkit.models import build_model
from toolkit.attacks.state import AttackState
from toolkit.oracle import Oracle
from toolkit.schemas import load_spec, spec_hash
from toolkit.training.checkpoint import atomic_write_json
from toolkit.training.evaluate import accuracy, agreement, model_predictor



def default_folder(spec):
    return pathlib.Path("runs") / "attacks" / spec["name"]


def surrogate_pool(cfg, victim_card, data_root):
    """The attacker's natural images: chosen splits of a registry dataset (labels kept only for the bandit)."""
    data_cfg = cfg["dataset"] or artifacts.dataset_config(victim_card)
    data = load_dataset(data_cfg, data_root)
    if data.input_shape != tuple(victim_card["dataset"]["input_shape"]):
        raise UserError(f"surrogate dataset '{data.name}' has images {data.input_shape}, the victim takes "
                        f"{tuple(victim_card['dataset']['input_shape'])} (set its image_size)")
    splits = [data.split(s) for s in cfg["splits"]]
    return Split(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))


DRY_RUN_ITERATIONS = 2  # --dry-run: a couple of iterations / steps, enough to prove the path end to end
DRY_RUN_DFME_BATCH = 256  # --dry-run caps a DFME batch here: the released B 2048 preset proves its path in seconds


def fingerprint(spec):
    """What must match for a checkpoint to be resumed: the spec minus naming and reporting cadence."""
    ignored = ("name", "description", "progress_every", "checkpoint_every")
    return spec_hash({k: v for k, v in spec.items() if k not in ignored})


def shrink_for_dry_run(spec, budget):
    """A copy of ``spec`` that spends at most ``budget`` queries, with tiny stage lengths."""
    spec = {**spec, "name": spec["name"] + "-dry-run", "budget": min(spec["budget"], budget)}
    spec["dfms_hl"] = {**spec["dfms_hl"], "gan_epochs": min(1, spec["dfms_hl"]["gan_epochs"]),
                       "init_epochs": min(1, spec["dfms_hl"]["init_epochs"]),
                       "divgan_epochs": min(1, spec["dfms_hl"]["divgan_epochs"]),
                       "divgan_clone_epochs": min(1, spec["dfms_hl"]["divgan_clone_epochs"]),
                       "init_generated": min(64, spec["dfms_hl"]["init_generated"]),
                       "divgan_samples": min(64, spec["dfms_hl"]["divgan_samples"]),
                       "proxy_size": min(256, spec["dfms_hl"]["proxy_size"] or 256)}
    spec["knockoff"] = {**spec["knockoff"], "rounds": 1, "epochs": 1}
    return spec


def extract(spec, out=None, data_root=None, force=False, dry_run=False, api_key=None, source=None):
    """Runs (or resumes) the attack in ``spec`` (dict or path); writes the clone and ``result.json``; returns it.

    The victim is an artifact folder, or the URL of a live ``mtk serve`` endpoint (``api_key``, else
    ``$MTK_API_KEY``): then every query also spends the key's budget on the server, and the victim-side figures
    (its test accuracy, the clone's fidelity) are not measured, as they would cost the attacker queries.
    """
    import os

    import keras

    source = source or (str(spec) if not isinstance(spec, dict) else None)  # names the spec file in errors
    spec = load_spec(spec, kind="threat", source=source)
    if spec["attack"] == "dfme" and spec["oracle"]["output"] != "soft":
        raise UserError(f"{source or '<spec>'}: $.oracle.output: dfme learns from probabilities and needs a 'soft' "
                        "API; dfms-hl is the hard-label attack")
    remote = str(spec["victim"]).startswith(("http://", "https://"))
    if remote:
        from toolkit.serve.client import RemoteVictim

        victim = RemoteVictim(spec["victim"], api_key or os.environ.get("MTK_API_KEY"))
    else:
        try:
            victim = load_deployable(spec["victim"])
        except UserError as exc:
            raise UserError(f"{source}: $.victim: {exc}" if source else str(exc)) from None
    card = victim.card
    if spec["attack"] == "dfme":
        from toolkit.attacks.dfme import resolve

        cfg = resolve(spec["dfme"], spec["preset"])
        if dry_run and cfg["batch_size"] > DRY_RUN_DFME_BATCH:  # the same path at a tenth of the cost (B 2048)
            spec["dfme"] = {**spec["dfme"], "batch_size": DRY_RUN_DFME_BATCH}
            cfg = resolve(spec["dfme"], spec["preset"])
        dry_budget = DRY_RUN_ITERATIONS * cfg["batch_size"] * (cfg["g_iter"] * (cfg["grad_m"] + 1) + cfg["d_iter"])
    elif spec["attack"] == "dfms-hl":
        dry_budget = 256 + 64 + 64 + DRY_RUN_ITERATIONS * spec["dfms_hl"]["alt_batch_size"]
    else:
        dry_budget = DRY_RUN_ITERATIONS * spec["knockoff"]["query_batch"]
    if dry_run:
        spec = shrink_for_dry_run(spec, dry_budget)
    folder = pathlib.Path(out) if out else default_folder(spec)
    eval_data = load_dataset(spec["eval_dataset"] or artifacts.dataset_config(card), data_root)
    keras.utils.set_random_seed(spec["seed"])
    clone = build_model(spec["clone"]["architecture"], victim.input_shape, victim.num_classes,
                        eval_data.mean, eval_data.std, name="clone", **spec["clone"]["options"])
    state = AttackState(folder, fingerprint(spec), discard_stale=force)
    try:
        spec["oracle"] = {**spec["oracle"], "accept_out_of_range": out_of_range(spec, remote)}
    except UserError as exc:
        raise UserError(f"{source or '<spec>'}: {exc}") from None
    oracle = Oracle(victim, spec["budget"], ledger=state.ledger, **spec["oracle"])
    test = eval_data.test if not dry_run else eval_data.test.take(slice(0, 512))

    def evaluate(model):  # reporting only: the defender's test set never steers the attack
        return {"clone_test_acc": accuracy(model_predictor(model), test)}

    every = {"state": state, "checkpoint_every": spec["checkpoint_every"], "progress_every": spec["progress_every"],
             "evaluate": evaluate}
    if spec["attack"] == "knockoff":
        from toolkit.attacks.knockoff import KnockoffAttack

        cfg = spec["knockoff"]
        pool = surrogate_pool(cfg["surrogate"], card, data_root)
        curve = KnockoffAttack(oracle, clone, pool, cfg, seed=spec["seed"], evaluate=evaluate).run(
            state, spec["checkpoint_every"])["curve"]
    elif spec["attack"] == "dfme":
        from toolkit.attacks.dfme import DFMEAttack
        from toolkit.models.generators import dfme_generator

        generator = dfme_generator(cfg["nz"], victim.input_shape, cfg["ngf"], cfg["fast_upsample"])
        stats = eval_data if spec["eval_dataset"] is None else load_dataset(artifacts.dataset_config(card), data_root)
        curve = DFMEAttack(oracle, clone, generator, cfg, stats.mean, stats.std).run(**every)
    else:
        from toolkit.attacks.dfms_hl import DFMSHLAttack
        from toolkit.models.generators import dcgan_discriminator, dcgan_generator

        cfg = spec["dfms_hl"]
        proxy = proxy_images(cfg, victim.input_shape, data_root, spec["seed"])
        generator = dcgan_generator(cfg["nz"], victim.input_shape, cfg["ngf"])
        discriminator = dcgan_discriminator(victim.input_shape, cfg["ndf"])
        curve = DFMSHLAttack(oracle, clone, generator, discriminator, proxy, cfg, seed=spec["seed"],
                             check_fraction=cfg["check_fraction"]).run(**every)
    elapsed = state.seconds()
    predict_clone = model_predictor(clone)
    result = {
        "attack": spec["attack"], "preset": spec["preset"], "victim": str(spec["victim"]),
        "victim_kind": card.get("kind"), "victim_name": card.get("name"),
        "victim_method": card.get("method") or ("undefended" if card.get("kind") == "target" else card.get("kind")),
        "dataset": card["dataset"]["name"], "victim_metrics": card.get("metrics", {}),
        "clone_architecture": spec["clone"]["architecture"], "oracle": spec["oracle"], "budget": spec["budget"],
        "queries_used": oracle.queries_used, "queries_lost_to_restarts": oracle.queries_lost, "seed": spec["seed"],
        "dry_run": dry_run,
        "clone_test_acc": accuracy(predict_clone, test),
        "fidelity": None if remote else agreement(predict_clone, victim.predict_proba, test.x),
        "victim_test_acc": None if remote else accuracy(victim.predict_proba, test),
        "curve": curve, "wall_seconds": round(elapsed, 1),
        "spec": spec, "spec_hash": spec_hash(spec), "versions": artifacts.versions(), "created": artifacts.now(),
    }
    artifacts.save_model(folder, clone, "clone.keras")
    atomic_write_json(folder / "result.json", result)
    fidelity = "not measured" if result["fidelity"] is None else f"{result['fidelity']:.4f}"
    progress.log(f"[{spec['name']}] clone test acc {result['clone_test_acc']:.4f}, fidelity {fidelity}, "
                 f"{oracle.queries_used} queries -> {folder}")
    return result


def out_of_range(spec, remote):
    """Whether the oracle takes pixels outside [0, 1]: only for DFME's reference query space, only in-process."""
    wanted = spec["attack"] == "dfme" and spec["dfme"]["query_space"] == "reference"
    asked = spec["oracle"].get("accept_out_of_range")
    if wanted and asked is False:
        raise UserError("$.oracle.accept_out_of_range: false, but dfme.query_space 'reference' sends pixels outside "
                        "[0, 1]; set dfme.query_space to 'reference-clipped' for an API that takes [0, 1] images")
    if (wanted or asked) and remote:
        raise UserError("$.dfme.query_space: 'reference' sends pixels outside [0, 1], which an HTTP victim cannot "
                        "receive; use 'reference-clipped'")
    return bool(wanted if asked is None else asked)


def proxy_images(cfg, input_shape, data_root, seed):
    """DFMS-HL's proxy images (uint8 NCHW) shaped like the victim's inputs; synthetic shapes unless a dataset is set."""
    from toolkit.data.registry import images_like

    return images_like(cfg["proxy"], input_shape, data_root, cfg["proxy_splits"], cfg["proxy_size"], seed,
                       cfg["proxy_classes"], what="dfms_hl.proxy")


