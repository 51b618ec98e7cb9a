"""``mtk defend``: from a defense spec to a deployable defense folder (trains the target first when needed)."""

import pathlib
import shutil

from toolkit import artifacts, progress
from toolkit.artifacts import load_keras_model, read_card
from toolkit.data import load_dataset
from toolkit.defenses.misleader import member_names, train_member
from toolkit.errors import UserError
from toolkit.models import get_architecture
from toolkit.schemas import load_spec, same_spec, spec_hash
from toolkit.training.evaluate import accuracy, agreement, model_predictor
from toolkit.training.target import DRY_RUN_STEPS, shrink_for_dry_run, train_target



def _baseline_builders():
    """method -> build(folder, spec, target_folder, target_card, data, teacher, dry_run, force, data_root)
    -> (deployable entry, extra card fields)."""
    from toolkit.defenses import act, dnf, edm, meco, misinformation, perturbation

    return {**{m: perturbation.build for m in perturbation.METHODS}, "misinformation": misinformation.build,
            "edm": edm.build, "dnf": dnf.build, "meco": meco.build, "act": act.build}


BUILDERS = _baseline_builders()


def default_folder(spec, dry_run=False):
    return pathlib.Path("runs") / "defenses" / (spec["name"] + ("-dry-run" if dry_run else ""))


def resolve_target(target, data_root=None, dry_run=False):
    """A target artifact folder from the spec's ``target`` (a folder, or a target spec trained when missing)."""
    path = pathlib.Path(target)
    if path.suffix == ".json":
        card = train_target(path, data_root=data_root, dry_run=dry_run)
        return pathlib.Path(card["folder"])
    if not (path / artifacts.CARD).exists():
        raise UserError(f"{path}: target artifact not found (train it with mtk train-target, or point "
                        "\"target\" at a target spec)")
    return path


def defend(spec, out=None, data_root=None, force=False, dry_run=False, only_members=None):
    """Builds the defense in ``spec`` (dict or path); returns its card. Resumes per member and per epoch.

    ``only_members`` (names) trains just those members and returns None: members are independent, so several
    processes or machines can train different members of one defense; a plain call then assembles the ensemble.
    """
    source = "<spec>" if isinstance(spec, dict) else str(spec)
    spec = load_spec(spec, kind="defense")
    for i, member in enumerate(spec["members"]):
        for field, arch in (("architecture", member["architecture"]),
                            ("attacker.architecture", member["attacker"]["architecture"])):
            if arch is not None:
                try:
                    get_architecture(arch)
                except UserError as exc:
                    raise UserError(f"{source}: $.members[{i}].{field}: {exc}") from None
    if spec["method"] == "misleader" and not spec["members"]:
        raise UserError(f"{source}: $.members: a misleader defense needs at least one member")
    folder = pathlib.Path(out) if out else default_folder(spec, dry_run)
    digest = spec_hash({"spec": spec, "dry_run": dry_run})
    if (folder / artifacts.CARD).exists() and not force:
        card = read_card(folder)
        if same_spec(card, spec, "defense", wrap=lambda s: {"spec": s, "dry_run": dry_run}):
            progress.log(f"[{spec['name']}] already built: {folder}")
            return card
        raise UserError(f"{folder}: holds a defense built from a different spec; use --force or --out")

    try:
        target_folder = resolve_target(spec["target"], data_root, dry_run)
    except UserError as exc:
        if str(exc).startswith(f"{source}:"):
            raise
        raise UserError(f"{source}: $.target: {exc}") from None
    target_card = read_card(target_folder)
    data_cfg = spec["dataset"] or artifacts.dataset_config(target_card)
    data = load_dataset(data_cfg, data_root)
    if spec["dataset"] is None and data.fingerprint() != target_card["dataset"]["fingerprint"]:
        raise UserError(f"{target_folder}: the target's dataset no longer matches its card (different data root?)")
    if dry_run:
        shrink_for_dry_run(data)
    teacher = load_keras_model(target_folder / target_card["deployable"]["file"])
    teacher_predict = model_predictor(teacher)
    folder.mkdir(parents=True, exist_ok=True)

    if spec["method"] == "undefended":
        return _deploy_undefended(folder, spec, digest, target_folder, target_card, data, teacher_predict)
    if spec["method"] in BUILDERS:
        entry, extra = BUILDERS[spec["method"]](folder, spec, target_folder, target_card, data, teacher, dry_run,
                                                force, data_root)
        return finish_defense(folder, spec, digest, target_folder, target_card, data, teacher_predict, entry, extra)

    names = member_names(spec["members"])
    unknown = sorted(set(only_members or ()) - set(names))
    if unknown:
        raise UserError(f"{source}: no member named {', '.join(unknown)} (members: {', '.join(names)})")
    member_cards = []
    for name, member in zip(names, spec["members"]):
        if only_members and name not in only_members:
            continue
        fingerprint = spec_hash({"member": member, "augment": spec["augment"], "clean": spec["clean_augment"],
                                 "seed": spec["seed"], "target": target_card.get("spec_hash"),
                                 "data": data.fingerprint(), "dry_run": dry_run})
        member_cards.append(train_member(
            folder / "members" / name, name, member, spec, data, teacher, teacher_predict, fingerprint,
            steps_cap=DRY_RUN_STEPS if dry_run else None, epochs=1 if dry_run else None, force=force))
    if only_members:
        return None

    weights = spec["ensemble"]["weights"] or [1.0] * len(names)
    if len(weights) != len(names):
        raise UserError(f"{source}: $.ensemble.weights: {len(weights)} weights for {len(names)} members")
    entries = [{"name": n, "path": f"members/{n}", "file": c["deployable"]["file"], "weight": w}
               for n, c, w in zip(names, member_cards, weights)]
    members = {n: {"architecture": c["architecture"], "metrics": c["metrics"], "lambda": c["member"]["lambda"],
                   "temperature": c["member"]["temperature"], "alpha": c["member"]["alpha"],
                   "train_seconds": c["train_seconds"]} for n, c in zip(names, member_cards)}
    return finish_defense(folder, spec, digest, target_folder, target_card, data, teacher_predict,
                          {"type": "ensemble", "members": entries}, {"members": members, "dry_run": dry_run})


def finish_defense(folder, spec, digest, target_folder, target_card, data, teacher_predict, deployable, extra=None):
    """Writes the defense card: its deployable entry with the spec's postprocessors, and the accuracy and top-1
    agreement with the target of exactly what the deployed defense answers (the same object an attack queries).
    Removes the training checkpoints once the card is safely written."""
    card = {"kind": "defense", "method": spec["method"], "name": spec["name"], "created": artifacts.now(),
            "deployable": {**deployable, "postprocess": spec["postprocess"]}, "dataset": target_card["dataset"],
            "target": {"folder": str(target_folder), "name": target_card["name"], "metrics": target_card["metrics"]},
            **(extra or {})}
    predict = artifacts.deployable_from_card(folder, card).predict_proba
    card["metrics"] = {
        "val_acc": accuracy(predict, data.val), "test_acc": accuracy(predict, data.test),
        "test_agreement_with_target": agreement(predict, teacher_predict, data.test.x),
        "target_test_acc": accuracy(teacher_predict, data.test),
    }
    card.update(spec=spec, spec_hash=digest, versions=artifacts.versions())
    artifacts.write_card(folder, card)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    progress.log(f"[{spec['name']}] {spec['method']}: val acc {card['metrics']['val_acc']:.4f}, test acc "
                 f"{card['metrics']['test_acc']:.4f}, agreement with target "
                 f"{card['metrics']['test_agreement_with_target']:.4f} -> {folder}")
    return card


def _deploy_undefended(folder, spec, digest, target_folder, target_card, data, teacher_predict):
    filename = artifacts.copy_model_file(target_folder, target_card, folder)
    return finish_defense(folder, spec, digest, target_folder, target_card, data, teacher_predict,
                          {"type": "model", "file": filename})
