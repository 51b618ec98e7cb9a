"""The JSON Schemas of mtk specs (package data) and the one place specs are loaded, validated and defaulted.

Four kinds: target, defense, threat, experiment. ``load_spec(path)`` returns the spec with every default filled in,
or raises a ``SpecError`` whose lines read ``file: $.json.path: problem``.
"""

import copy
import functools
import hashlib
import json
import math
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


MAX_DEPTH = 32  # specs nest ~5 levels; deeper is a mistake (and would exhaust recursion in the validator)
MAX_INTEGER = 2 ** 63 - 1  # what any integer field could mean; longer literals are never turned into Python ints
MAX_INT_DIGITS = len(str(MAX_INTEGER))


class _Literal:
    """A JSON number the loader keeps as text (NaN, Infinity, 1e999, a 5,000-digit integer): reported with its path."""

    def __init__(self, text, why):
        self.text, self.why = text, why


def _parse_int(text):
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_INT_DIGITS else _Literal(text, f"an integer of {digits} digits is out of range")


def _parse_float(text):
    value = float(text)
    return value if math.isfinite(value) else _Literal(text, "not a finite number")


def _parse_constant(text):
    return _Literal(text, "not a number a spec may hold (NaN and Infinity are not JSON)")


def _json_path(path, key):
    return f"{path}.{key}" if isinstance(key, str) and key.isidentifier() else f"{path}[{json.dumps(key)}]"


def input_problems(spec, source="<spec>"):
    """What JSON Schema cannot say about a spec: depth, non-finite or absurd numbers, NUL / control characters and
    lone surrogates in strings. One 'source: $.path: problem' line each."""
    problems, stack = [], [(spec, "$", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(f"{source}: {path}: nested deeper than {MAX_DEPTH} levels")
            continue
        if isinstance(node, dict):
            for key, value in node.items():
                problems += [f"{source}: {path}: key {why}" for why in _string_problems(key)]
                stack.append((value, _json_path(path, key), depth + 1))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]", depth + 1) for i, value in enumerate(node))
        elif isinstance(node, _Literal):
            text = node.text if len(node.text) <= 24 else node.text[:20] + "..."
            problems.append(f"{source}: {path}: {text}: {node.why}")
        elif isinstance(node, float) and not math.isfinite(node):
            problems.append(f"{source}: {path}: {node}: not a finite number")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_INTEGER:
            problems.append(f"{source}: {path}: an integer of {len(str(abs(node)))} digits is out of range")
        elif isinstance(node, str):
            problems += [f"{source}: {path}: {why}" for why in _string_problems(node)]
    return sorted(problems)


def _string_problems(text):
    if not isinstance(text, str):
        return []
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return ["contains a control character (e.g. NUL), which no spec field takes"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return ["contains a lone surrogate (an invalid \\uD800-\\uDFFF escape), not text"]
    return []


def validate(spec, source="<spec>", kind=None):
    """Returns one 'source: $.path: message' line per problem (empty when valid)."""
    if not isinstance(spec, dict):
        return [f"{source}: $: a spec must be a JSON object, got {type(spec).__name__}"]
    problems = input_problems(spec, source)
    if problems:
        return problems  # the schema validator would trip on them (recursion, NaN comparisons, surrogates)
    kind = kind or spec.get("kind")
    if kind not in KINDS:
        return [f"{source}: $.kind: must be one of {', '.join(KINDS)} (got {json.dumps(spec.get('kind'))})"]
    validator = jsonschema.Draft202012Validator(_bundled(kind))
    problems = []
    for error in sorted(validator.iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        if error.context:
            error = jsonschema.exceptions.best_match(error.context)
        message = error.message
        if error.validator == "pattern" and "x-pattern-message" in error.schema:
            message = f"{json.dumps(error.instance)} {error.schema['x-pattern-message']}"
        problems.append(f"{source}: {error.json_path}: {message}")
    if not problems:
        schema = _bundled(kind)
        problems = _registry_problems(schema, spec, schema, "$", source)
    return problems


def _registry_names(registry):
    if registry == "architecture":
        from toolkit.models.registry import available_architectures

        return available_architectures()
    from toolkit.data.registry import available_datasets

    return available_datasets()


def _registry_problems(schema, value, root, path, source):
    """Names the schema marks ``x-registry`` (architectures, datasets) must be registered: said here with the JSON
    path, not later by the code that builds them."""
    import difflib

    schema = _resolve(schema, root)
    problems = []
    if "x-registry" in schema and isinstance(value, str):
        known = _registry_names(schema["x-registry"])
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{source}: {path}: unknown {schema['x-registry']} '{value}'{hint}; known: "
                            f"{', '.join(known)}")
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        if isinstance(value, dict) and _resolve(option, root).get("type") == "object":
            return problems + _registry_problems(option, value, root, path, source)
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += _registry_problems(sub, value[key], root, _json_path(path, key), source)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += _registry_problems(schema["items"], item, root, f"{path}[{i}]", source)
    return problems


def read_json(path):
    """A spec file's JSON; any way it cannot be read is one UserError line naming the file. Numbers the loader
    refuses (NaN, Infinity, overflowing or absurdly long literals) stay as markers that validation reports by path."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a spec file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); a spec is a "
                        "UTF-8 JSON file") from None
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read (specs nest at most {MAX_DEPTH} levels)") from None


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
    return _as_declared(schema, value, root)


def _types(schema, root):
    types = schema.get("type", [])
    types = set([types] if isinstance(types, str) else types)
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        types |= _types(_resolve(option, root), root)
    return types


def _as_declared(schema, value, root):
    """An integer where the schema takes a float-only number becomes a float (Keras, e.g., refuses momentum=0)."""
    if isinstance(value, int) and not isinstance(value, bool):
        types = _types(schema, root)
        if "number" in types and "integer" not in types:
            return float(value)
    if isinstance(value, list) and "items" in schema and isinstance(schema["items"], dict):
        return [_as_declared(_resolve(schema["items"], root), v, root) for v in value]
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
