import json
import pathlib

import pytest
from click.testing import CliRunner

from cli.main import main
from toolkit.schemas import KINDS, get_schema, load_spec, validate

REPO = pathlib.Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").rglob("*.json"))


def _walk_properties(schema, path="$"):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}.{key}", sub
        yield from _walk_properties(sub, f"{path}.{key}")
    for key, sub in schema.get("$defs", {}).items():
        yield from _walk_properties(sub, f"$defs.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk_properties(schema["items"], path + "[]")
    for option in schema.get("oneOf", []) + schema.get("anyOf", []):
        yield from _walk_properties(option, path)


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_description_and_default(kind):
    schema = get_schema(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    missing = [p for p, sub in _walk_properties(schema)
               if "$ref" not in sub and ("description" not in sub or "default" not in sub)]
    assert not missing


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_specs_validate(path):
    assert validate(json.loads(path.read_text()), str(path)) == []


def test_there_are_specs_of_each_shipped_kind():
    kinds = {json.loads(p.read_text())["kind"] for p in SPECS}
    assert {"target", "defense", "threat", "experiment"} <= kinds


def test_defaults_are_filled_and_partial_overrides_keep_field_defaults():
    spec = load_spec({"kind": "defense", "target": "t", "member_defaults": {"optimizer": {"lr": 0.05}},
                      "members": [{"architecture": "lenet5"}, {"architecture": "lenet5_half", "lambda": 0.2}]})
    first, second = spec["members"]
    assert first["optimizer"]["lr"] == 0.05 and first["optimizer"]["weight_decay"] == 0.0005
    assert first["optimizer"]["clip_norm"] == 5 and first["attacker"]["steps"] == 5
    assert first["lambda"] == 0.5 and second["lambda"] == 0.2
    assert spec["augment"]["affine"]["degrees"] == 15


BROKEN = [
    ({"kind": "target", "dataset": {"name": "mnist"}, "model": {"architecture": "lenet5"}, "train": {"epochs": -1}},
     ["$.train.epochs: -1 is less than the minimum of 1"]),
    ({"kind": "target", "model": {"architecture": "lenet5"}}, ["$: 'dataset' is a required property"]),
    ({"kind": "target", "dataset": {"name": "mnist"}, "model": {"architecture": "lenet5"}, "trian": {}},
     ["$: Additional properties are not allowed ('trian' was unexpected)"]),
    ({"kind": "target", "dataset": {"name": "mnist", "val_size": "big"}, "model": {"architecture": "lenet5"}},
     ["$.dataset.val_size: 'big' is not of type 'number'"]),
    ({"kind": "gizmo"}, ["$.kind: must be one of target, defense, threat, experiment (got \"gizmo\")"]),
    ({"kind": "defense", "target": "t", "members": [{"architecture": "lenet5", "alpha": 1.5}]},
     ["$.members[0].alpha: 1.5 is greater than the maximum of 1"]),
    ({"kind": "threat", "attack": "dfmx", "victim": "v"}, ["$.attack: 'dfmx' is not one of ['dfme', 'dfms-hl', 'knockoff']"]),
    ([1, 2], ["$: a spec must be a JSON object, got list"]),
]


@pytest.mark.parametrize("spec,expected", BROKEN)
def test_broken_specs_get_one_line_per_problem_and_exit_2(tmp_path, spec, expected):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"{path}: {e}" for e in expected]
    assert "Traceback" not in result.output


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "target",\n "x": }')
    result = CliRunner().invoke(main, ["validate", str(bad), str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"{bad}: invalid JSON at line 2 column 7: Expecting value",
                                          f"{tmp_path / 'nope.json'}: file not found"]


def test_schema_command_prints_a_usable_schema():
    result = CliRunner().invoke(main, ["schema", "target"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["properties"]["train"]["properties"]["epochs"]["default"] == 10
    assert "dataset" in schema["$defs"]


@pytest.mark.parametrize("path", sorted((REPO / "specs" / "experiments").glob("*.json")), ids=lambda p: p.name)
def test_shipped_experiments_expand_to_cells_naming_shipped_specs(path, monkeypatch):
    """Every cell of every shipped grid expands to a valid threat spec; every defense entry names a shipped spec."""
    from toolkit.experiments.grid import expand, split_entry

    monkeypatch.chdir(REPO)
    spec = load_spec(str(path), kind="experiment")
    for entry in spec["defenses"]:
        assert split_entry(entry)[0].exists(), entry
    cells = expand(spec, str(path))
    assert len(cells) == len({c["id"] for c in cells})
