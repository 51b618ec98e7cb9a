"""Mutated specs through `mtk validate` and the loader: every one ends in exit 0 or 2 with one line per problem,
never a traceback (seeded, a few hundred mutants, a few seconds)."""

import json
import pathlib
import random

from click.testing import CliRunner

from cli.main import main
from toolkit.errors import UserError
from toolkit.schemas import load_spec, read_json

SHIPPED = sorted(str(p) for p in pathlib.Path("specs").rglob("*.json"))
NASTY_VALUES = [None, True, 0, -1, 1.5, "", "x" * 300, [], {}, [[]], "a\u0000b", "\ud800", "../../x", "/abs/path",
                10 ** 30, -(10 ** 25), 1e308, "NaN", {"name": "nope"}, [1, "a", None]]
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, '"\\ud800"', '"\\u0000"', "[" * 2000 + "]" * 2000,
              "{" + '"a":{' * 60 + "}" * 61]


def _mutate(spec, rng):
    """One structural mutation of a parsed spec: delete, replace or add a field somewhere in it."""
    spec = json.loads(json.dumps(spec))
    nodes, stack = [], [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and node:
            nodes.append(node)
            stack.extend(node.values())
        elif isinstance(node, list) and node:
            nodes.append(node)
            stack.extend(node)
    node = rng.choice(nodes)
    key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    action = rng.random()
    if action < 0.2 and isinstance(node, dict):
        del node[key]
    elif action < 0.8:
        node[key] = rng.choice(NASTY_VALUES)
    elif isinstance(node, dict):
        node[rng.choice(["zzz", "", "kind", "name", "seed"])] = rng.choice(NASTY_VALUES)
    return spec


def _raw(text, rng):
    """A text-level mutation: a raw literal spliced in, bytes flipped or cut, or invalid UTF-8."""
    data = text.encode()
    action = rng.random()
    if action < 0.5:
        at = text.find(":", rng.randrange(len(text)))
        if at > 0:
            end = min(i for i in (text.find(",", at), text.find("}", at), len(text)) if i >= 0)
            return (text[:at + 1] + " " + rng.choice(RAW_VALUES) + text[end:]).encode()
    if action < 0.7:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    if action < 0.85:
        return data[:rng.randrange(len(data))]
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))


def test_mutated_specs_end_in_one_line_errors_never_tracebacks(tmp_path):
    rng = random.Random(1234)
    runner = CliRunner()
    outcomes = {0: 0, 2: 0}
    for i in range(300):
        source = rng.choice(SHIPPED)
        text = pathlib.Path(source).read_text()
        if i % 2:
            data = json.dumps(_mutate(json.loads(text), rng)).encode()
        else:
            data = _raw(text, rng)
        path = tmp_path / f"m{i}.json"
        path.write_bytes(data)
        result = runner.invoke(main, ["validate", str(path)])
        assert result.exit_code in (0, 2), (source, data[:300], result.output, result.exception)
        assert "Traceback" not in result.output, (source, data[:300], result.output)
        outcomes[result.exit_code] += 1
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert lines and all(line.startswith(str(path)) or line.startswith("mtk: error:") for line in lines), lines
        try:  # the loader itself: defaults filled, or a UserError
            load_spec(read_json(path), source=str(path))
        except UserError:
            pass
    assert outcomes[2] > 100 and outcomes[0] > 10, outcomes  # the mutants exercised both paths


def test_integers_become_floats_where_the_schema_takes_floats(tmp_path):
    spec = load_spec({"kind": "threat", "attack": "knockoff", "victim": "v",
                      "knockoff": {"optimizer": {"name": "sgd", "lr": 1, "momentum": 0}}})
    optimizer = spec["knockoff"]["optimizer"]
    assert isinstance(optimizer["momentum"], float) and isinstance(optimizer["lr"], float)
    assert isinstance(spec["seed"], int) and isinstance(spec["budget"], int)  # integer fields stay integers


def test_names_must_be_one_safe_path_component(tmp_path):
    runner = CliRunner()
    for name in ("../../x", "/abs/x", "a/b", ".hidden", "a b"):
        path = tmp_path / "t.json"
        path.write_text(json.dumps({"kind": "threat", "attack": "dfme", "victim": "v", "name": name}))
        result = runner.invoke(main, ["validate", str(path)])
        assert result.exit_code == 2 and "$.name" in result.stderr and "letters, digits" in result.stderr, name
    path.write_text(json.dumps({"kind": "threat", "attack": "dfme", "victim": "v", "seed": 2 ** 40}))
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "$.seed" in result.stderr
