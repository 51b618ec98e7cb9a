"""The JSON Schemas of mtk specs (package data) and the one place specs are loaded, validated and defaulted.

Four kinds: target, defense, threat, experiment. ``load_spec(path)`` returns the spec with every default filled in,
or raises a ``SpecError`` whose lines read ``file: $.json.path: problem``.
"""

import copy
import functools
import hashlib
import json
import pathlib

import jsonschema

from toolkit.errors import UserError

KINDS = ("target", "defense", "threat", "experiment")
_HERE = pathlib.Path(__file__).parent
_COMMON = "common.schema.json#/$defs/"


class SpecError(UserError):
    """A spec failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@functools.lru_cache(maxsize=None)
def _bundled(kind):
    if kind not in KINDS:
        raise UserError(f"unknown spec kind '{kind}'; known: {', '.join(KINDS)}")
    common = json.loads((_HERE / "common.schema.json").read_text())["$defs"]
    schema = json.loads((_HERE / f"{kind}.schema.json").read_text())

    def rewrite(node):
        if isinstance(node, dict):
            return {k: ("#/$defs/" + v[len(_COMMON):] if k == "$ref" and v.startswith(_COMMON) else rewrite(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    schema = rewrite(schema)
    schema["$defs"] = {**common, **schema.get("$defs", {})}
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def get_schema(kind):
    """The self-contained JSON Schema (2020-12) of one spec kind."""
    return copy.deepcopy(_bundled(kind))


def validate(spec, source="<spec>", kind=None):
    """Returns one 'source: $.path: message' line per problem (empty when valid)."""
    if not isinstance(spec, dict):
        return [f"{source}: $: a spec must be a JSON object, got {type(spec).__name__}"]
    kind = kind or spec.get("kind")
    if kind not in KINDS:
        return [f"{source}: $.kind: must be one of {', '.join(KINDS)} (got {json.dumps(spec.get('kind'))})"]
    validator = jsonschema.Draft202012Validator(_bundled(kind))
    problems = []
    for error in sorted(validator.iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        if error.context:
            error = jsonschema.exceptions.best_match(error.context)
        problems.append(f"{source}: {error.json_path}: {error.message}")
    return problems


def read_json(path):
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def load_spec(path_or_spec, kind=None, source=None):
    """Reads (if a path), validates and fills defaults; raises SpecError listing every problem."""
    if isinstance(path_or_spec, dict):
        spec, source = copy.deepcopy(path_or_spec), source or "<spec>"
    else:
        spec, source = read_json(path_or_spec), source or str(path_or_spec)
    problems = validate(spec, source)
    if not problems and kind and spec.get("kind") != kind:
        problems = [f"{source}: $.kind: expected a '{kind}' spec, got '{spec.get('kind')}'"]
    if problems:
        raise SpecError(problems)
    schema = _bundled(spec["kind"])
    return fill_defaults(schema, spec, schema)


def _resolve(schema, root):
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def fill_defaults(schema, value, root):
    """Recursively fills object properties missing from ``value`` with the schema defaults."""
    schema = _resolve(schema, root)
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        option = _resolve(option, root)
        if isinstance(value, dict) and option.get("type") == "object":
            return fill_defaults(option, value, root)
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out:
                default = sub.get("default", _resolve(sub, root).get("default"))
                if default is None and "default" not in sub and "default" not in _resolve(sub, root):
                    continue
                out[key] = copy.deepcopy(default)
        for key, sub in schema["properties"].items():
            if key not in out:
                continue
            merge_with = sub.get("x-merge-with")
            if merge_with and isinstance(out[key], list):
                base = value.get(merge_with, {})
                out[key] = [fill_defaults(sub["items"], deep_merge(base, item), root) for item in out[key]]
            elif isinstance(out[key], list) and "items" in sub:
                out[key] = [fill_defaults(sub["items"], item, root) for item in out[key]]
            else:
                if isinstance(out[key], dict) and isinstance(sub.get("default"), dict) and key in value:
                    out[key] = deep_merge(sub["default"], out[key])  # a partial override keeps the field's defaults
                out[key] = fill_defaults(sub, out[key], root)
        return out
    return value


def deep_merge(base, override):
    """``override`` on top of ``base``, merging nested objects."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def same_spec(card, spec, kind, wrap=None):
    """Whether an artifact's card was built from ``spec``: by hash, or because the spec it stores, re-filled with
    today's defaults, is ``spec`` (a schema that gained optional fields must not orphan finished runs)."""
    wrap = wrap or (lambda s: s)
    digest = spec_hash(wrap(spec))
    if card.get("spec_hash") == digest:
        return True
    stored = card.get("spec")
    if not isinstance(stored, dict):
        return False
    try:
        return spec_hash(wrap(load_spec(stored, kind=kind))) == digest
    except SpecError:
        return False


def spec_hash(spec):
    """sha256 of the canonical JSON of a (defaulted) spec: cards record it to tell runs apart."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
