"""An experiment spec expanded into cells: one attack run each (defense x threat x clone x budget x seed).

A cell is a complete threat spec (the threat file with its victim, clone, budget and seed replaced and the matching
overrides applied) plus the coordinates that name it. Its id is a hash of that threat spec with its defaults filled,
so a cell keeps its id (and its finished record) across re-runs and edits that do not change what it runs, and gets
a new one when a default of its attack changes.
"""

import copy
import itertools
import pathlib

from toolkit.errors import UserError
from toolkit.schemas import load_spec, read_json, spec_hash


def _set_dotted(spec, dotted, value, source):
    node = spec
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(node.get(key, {}), dict):
            raise UserError(f"{source}: $.overrides: '{dotted}' goes through a non-object field '{key}'")
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def split_entry(defense):
    """``spec.json#member`` names one member of a defense (a single-model defense, paper Fig. 2) -> (path, member)."""
    path, _, member = str(defense).partition("#")
    return pathlib.Path(path), member or None


def victim_name(defense):
    """The folder a defense entry deploys to: an artifact folder as given, or where its spec builds it
    (runs/targets/NAME for a target spec, runs/defenses/NAME for a defense, .../members/MEMBER for ``spec#MEMBER``)."""
    path, member = split_entry(defense)
    if path.suffix != ".json":
        return str(path)
    spec = read_json(path)
    home = "targets" if spec.get("kind") == "target" else "defenses"
    folder = pathlib.Path("runs") / home / spec.get("name", path.stem)
    return str(folder / "members" / member if member else folder)


ATTACK_BLOCKS = ("dfme", "dfms_hl", "knockoff")


def _cell_id(threat):
    """Hash of the resolved threat (defaults filled) minus its name and the other attacks' blocks: a changed default
    of the attack a cell runs (e.g. DFME's query space) makes it a new cell, never a finished one."""
    kept = {k: v for k, v in threat.items()
            if k not in ("name", "description") and (k not in ATTACK_BLOCKS or k == threat["attack"].replace("-", "_"))}
    return spec_hash({"threat": kept})[:12]


def expand(spec, source="<experiment>"):
    """The cells of an experiment spec (defaults filled), in a stable order."""
    cells = []
    threats = {}
    for path in spec["threats"]:
        if not pathlib.Path(path).exists():
            raise UserError(f"{source}: $.threats: {path}: file not found")
        threats[path] = read_json(path)
    for defense, threat_path, seed in itertools.product(spec["defenses"], spec["threats"], spec["seeds"]):
        base = threats[threat_path]
        clones = spec["clones"] or [base.get("clone", {}).get("architecture", "lenet5")]
        budgets = spec["budgets"] or [base.get("budget", 2_000_000)]
        for clone, budget in itertools.product(clones, budgets):
            threat = copy.deepcopy(base)
            threat.update(victim=victim_name(defense), budget=budget, seed=seed)
            threat["clone"] = {**threat.get("clone", {}), "architecture": clone}
            coords = {"defense": defense, "threat": threat_path, "attack": threat["attack"], "clone": clone,
                      "budget": budget, "seed": seed, "preset": threat.get("preset", "canonical")}
            for i, override in enumerate(spec["overrides"]):
                if all(coords.get(k) == v for k, v in override["match"].items()):
                    for dotted, value in override["set"].items():
                        _set_dotted(threat, dotted, value, f"{source}: $.overrides[{i}]")
            coords.update(budget=threat["budget"], clone=threat["clone"]["architecture"])  # as overridden
            threat["name"] = f"{spec['name']}-cell"
            threat = load_spec(threat, kind="threat", source=f"{source}: cell of {threat_path}")
            cell_id = _cell_id(threat)
            threat["name"] = f"{spec['name']}-{cell_id}"
            cells.append({"id": cell_id, **coords, "preset": threat["preset"], "threat_spec": threat})
    ids = [c["id"] for c in cells]
    if len(set(ids)) != len(ids):
        raise UserError(f"{source}: two cells expand to the same run (duplicate defenses, threats, clones, budgets "
                        "or seeds)")
    return cells
