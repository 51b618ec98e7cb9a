"""``mtk extract``: one threat model (attack x victim x clone x budget) from a threat spec, through the oracle only."""

import pathlib
import time

import numpy as np

from toolkit import artifacts, progress
from toolkit.artifacts import load_deployable
from toolkit.data import Split, load_dataset
from toolkit.errors import UserError
from toolkit.models import build_model
from toolkit.oracle import Oracle
from toolkit.schemas import load_spec, spec_hash
from toolkit.training.checkpoint import atomic_write_json
from toolkit.training.evaluate import accuracy, agreement, model_predictor

IMPLEMENTED = ("knockoff", "dfme")


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


def extract(spec, out=None, data_root=None):
    """Runs the attack in ``spec`` (dict or path); writes the clone and ``result.json``; returns the result."""
    import keras

    spec = load_spec(spec, kind="threat")
    if spec["attack"] not in IMPLEMENTED:
        raise UserError(f"attack '{spec['attack']}' is not implemented in this version (available: "
                        f"{', '.join(IMPLEMENTED)})")
    if str(spec["victim"]).startswith(("http://", "https://")):
        raise UserError("http victims need the serving extra (mtk serve); not available in this version")
    folder = pathlib.Path(out) if out else default_folder(spec)
    victim = load_deployable(spec["victim"])
    card = victim.card
    eval_data = load_dataset(spec["eval_dataset"] or artifacts.dataset_config(card), data_root)
    keras.utils.set_random_seed(spec["seed"])
    clone = build_model(spec["clone"]["architecture"], victim.input_shape, victim.num_classes,
                        eval_data.mean, eval_data.std, name="clone", **spec["clone"]["options"])
    oracle = Oracle(victim, spec["budget"], **spec["oracle"])
    predict_clone = model_predictor(clone)
    test = eval_data.test

    def evaluate(model):  # reporting only: the defender's test set never steers the attack
        return {"clone_test_acc": accuracy(model_predictor(model), test)}

    start = time.time()
    if spec["attack"] == "knockoff":
        from toolkit.attacks.knockoff import KnockoffAttack

        cfg = spec["knockoff"]
        pool = surrogate_pool(cfg["surrogate"], card, data_root)
        run = KnockoffAttack(oracle, clone, pool, cfg, seed=spec["seed"], evaluate=evaluate).run()
    elif spec["attack"] == "dfme":
        from toolkit.attacks.dfme import DFMEAttack, resolve
        from toolkit.models.generators import dfme_generator

        cfg = resolve(spec["dfme"], spec["preset"])
        generator = dfme_generator(cfg["nz"], victim.input_shape, cfg["ngf"], cfg["fast_upsample"])
        attack = DFMEAttack(oracle, clone, generator, cfg, victim.input_shape)
        curve = []
        every = max(1, spec["progress_every"] // attack.cost)

        def on_iteration(it):
            if it % every == 0:
                curve.append({"queries": oracle.queries_used, **evaluate(clone)})

        attack.run(on_iteration=on_iteration)
        run = {"curve": curve + [{"queries": oracle.queries_used, **evaluate(clone)}]}
    result = {
        "attack": spec["attack"], "preset": spec["preset"], "victim": str(spec["victim"]),
        "victim_kind": card.get("kind"), "victim_name": card.get("name"),
        "clone_architecture": spec["clone"]["architecture"], "oracle": spec["oracle"], "budget": spec["budget"],
        "queries_used": oracle.queries_used, "seed": spec["seed"],
        "clone_test_acc": accuracy(predict_clone, test),
        "fidelity": agreement(predict_clone, victim.predict_proba, test.x),
        "victim_test_acc": accuracy(victim.predict_proba, test),
        "curve": run["curve"], "wall_seconds": round(time.time() - start, 1),
        "spec": spec, "spec_hash": spec_hash(spec), "versions": artifacts.versions(), "created": artifacts.now(),
    }
    artifacts.save_model(folder, clone, "clone.keras")
    atomic_write_json(folder / "result.json", result)
    progress.log(f"[{spec['name']}] clone test acc {result['clone_test_acc']:.4f}, fidelity {result['fidelity']:.4f}, "
                 f"{oracle.queries_used} queries -> {folder}")
    return result
