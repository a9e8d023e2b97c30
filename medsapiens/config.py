"""Typed configs: dataclasses loaded from YAML, with `dotted.key=value` overrides.

Unknown keys are rejected by their full dotted name; values are coerced to the declared type;
the resolved config is what runs and what gets written next to the run.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path

import yaml

from medsapiens.errors import UserError


class ConfigError(UserError, ValueError):
    pass


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        item_hints = args if origin is tuple and args and args[-1] is not Ellipsis else (args[:1] or (typing.Any,)) * len(value)
        if origin is tuple and len(item_hints) != len(value):
            raise ConfigError(f"{where}: expected {len(item_hints)} values, got {_short(list(value))}")
        items = [_coerce(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
    if hint in (int, float):
        if isinstance(value, str):  # a number written as text: `010`, or a flag's JSON `Infinity`
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        if not _fits_a_float(value):  # inf, nan, 10**400: no setting means them
            kind = "integer" if hint is int else "number"
            raise ConfigError(f"{where}: expected a finite {kind}, got {_short(value)}")
        if hint is int and float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint!r}")


MAX_NESTING = 32  # sections and lists inside each other; real configs use 3
MAX_YAML_BYTES = 1 << 20


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader with YAML 1.2's plain booleans and decimal numbers: `1e-3` is a float (a
    string in YAML 1.1), and `yes`, `on` and `10:00` (600, base 60, in YAML 1.1) stay strings, which a
    number or true/false setting refuses; `010` (octal 8 in YAML 1.1) is read as the decimal 10."""


BOOL_TAG, INT_TAG, FLOAT_TAG = (f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float"))
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (BOOL_TAG, INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
ConfigLoader.add_implicit_resolver(INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(FLOAT_TAG, re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


class ConfigDumper(yaml.SafeDumper):
    """Quotes a string that YAML 1.1 or ConfigLoader would read as something else (`2e-3`, `yes`): a saved
    config reads back the same by both."""


ConfigDumper.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []), *ConfigLoader.yaml_implicit_resolvers.get(first, [])]
    for first in yaml.SafeDumper.yaml_implicit_resolvers.keys() | ConfigLoader.yaml_implicit_resolvers.keys()}


def read_yaml(text: str, where: str):
    """YAML (ConfigLoader's) without anchors, aliases or merge keys (a few bytes of nested aliases expand
    to gigabytes; a merge gives a key twice), with at most MAX_NESTING levels and no key given twice in one
    mapping (YAML keeps the last silently), checked on the parser's event stream before anything is built.
    Errors are one line."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes, more than a config's {MAX_YAML_BYTES}")
    open_nodes: list[dict] = []  # per open mapping or list: its keys so far, whether a key comes next
    try:
        for event in yaml.parse(text, Loader=ConfigLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(f"{where}: YAML anchors and aliases (&, *) are not accepted in configs; "
                                  "write the values out")
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                open_nodes.pop()
                continue
            if isinstance(event, yaml.NodeEvent) and open_nodes and open_nodes[-1]["keys"] is not None:
                check_key(open_nodes[-1], event, where)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if len(open_nodes) >= MAX_NESTING:
                    raise ConfigError(f"{where}: nested more than {MAX_NESTING} levels deep")
                mapping = isinstance(event, yaml.MappingStartEvent)
                open_nodes.append({"keys": set() if mapping else None, "key_next": True})
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {yaml_problem(exc)}") from None
    except ConfigError:
        raise
    except ValueError as exc:  # an integer of more digits than Python converts, a date of month 13
        raise ConfigError(f"{where}: a value YAML cannot read: {str(exc).split(';')[0]}") from None


def check_key(mapping: dict, event, where: str) -> None:
    """At a mapping's key: refuse one it already has. Keys and values alternate."""
    if mapping["key_next"] and isinstance(event, yaml.ScalarEvent):
        line = f" (line {event.start_mark.line + 1})" if event.start_mark else ""
        if event.value in mapping["keys"]:
            raise ConfigError(f"{where}: key {event.value!r} given twice in one section{line}")
        if event.value == "<<":
            raise ConfigError(f"{where}: YAML merge keys (<<) are not accepted in configs{line}; write the values out")
        mapping["keys"].add(event.value)
    mapping["key_next"] = not mapping["key_next"]


def yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, in one line."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")


def _fits_a_float(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value) -> str:
    """A value's repr for an error line, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value}")


SEEDS = 2**32  # seeds 0 .. 2**32 - 1: plenty for any run; torch.manual_seed fails past 2**64


def a_seed(key: str, value: int) -> None:
    if not 0 <= value < SEEDS:
        raise ConfigError(f"{key} must be a seed from 0 to {SEEDS - 1}, got {value}")


def positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive number, got {value}")


def from_dict(cls, data: dict, where: str = "", base=None):
    """Build dataclass `cls` from a nested dict; missing keys keep their defaults: those of `base` when
    given, and a section given in part starts from its field's default (a stage's own schedule, say),
    not from its class's. `cls.ONE_OF` lists groups of numeric keys that are one choice (a schedule's
    length in epochs or in steps): the data giving some of a group sets the others to 0."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    not_names = [key for key in data if not isinstance(key, str)]
    if not_names:
        raise ConfigError(f"key {_short(not_names[0])}{' under ' + where if where else ''} is not a name "
                          "(config keys are words)")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        default = getattr(base, key) if base is not None else field_default(fields[key])
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(hints[key], value, path, default)
        else:
            kwargs[key] = _coerce(value, hints[key], path)
    for group in getattr(cls, "ONE_OF", ()):  # keys naming one choice: giving one clears the defaults' others
        if set(group) & set(data):
            kwargs.update({key: 0 for key in group if key not in data})
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict of dataclass `cls`. A mapping
    given to a section sets the keys it names, as their dotted forms would (`optim={lr: 1e-3}` is
    `optim.lr=1e-3`: the file's other `optim` keys stay); one given to a mapping setting (`data.weights`)
    replaces it. Of a key given twice the last wins, as a script adding its own overrides after its
    defaults expects."""
    for item in overrides:
        key, value = parse_override(item)
        merge_into(data, key.split("."), value, item, cls)
    return data


def parse_override(item: str) -> tuple[str, object]:
    """`a.b=value` -> ("a.b", the value read as YAML; "" for nothing after the =)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    if not raw:
        return key, ""
    value = read_yaml(raw, f"override {key}")
    check_no_comment_dropped(item, raw, value)
    return key, value


def check_no_comment_dropped(item: str, raw: str, value) -> None:
    """Refuse a value YAML cut at a comment: `run_dir=/runs/exp #2` would be /runs/exp, another run."""
    for mark in re.finditer(r"(?:^|\s)#", raw):
        try:
            before = read_yaml(raw[:mark.start()], "")
        except ConfigError:  # the # is inside quotes or brackets: part of the value
            continue
        if before == value:
            raise ConfigError(f"override {item!r}: YAML reads {raw[mark.start():].strip()!r} as a comment and "
                              "drops it; quote the value to keep the #, or leave the comment out")


def keys_set(key: str, value) -> list[str]:
    """The dotted keys an override of `key` to `value` sets: a mapping's own keys, else `key`."""
    if isinstance(value, dict) and value:
        return [leaf for name, inner in value.items() for leaf in keys_set(f"{key}.{name}", inner)]
    return [key]


def overlapping(a: str, b: str) -> bool:
    """Whether setting dotted keys a and b sets one thing twice (the same key, or one inside the other)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def merge_into(node: dict, parts: list, value, item: str, section) -> None:
    """Set `value` at the dotted path `parts` under `node`, a mapping of dataclass `section` (None once
    past the dataclasses)."""
    for part in parts[:-1]:
        node, section = node.setdefault(part, {}), field_type(section, part)
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    last, section = parts[-1], field_type(section, parts[-1])
    if isinstance(value, dict) and isinstance(node.get(last), dict) and section is not None:
        for name, inner in value.items():
            merge_into(node[last], [name], inner, item, section)
    else:
        node[last] = value


def field_type(cls, name) -> type | None:
    """The dataclass type of field `name` of dataclass `cls`, or None (not a dataclass, or no such field)."""
    if cls is None or not isinstance(name, str):
        return None
    hint = typing.get_type_hints(cls).get(name)
    return hint if dataclasses.is_dataclass(hint) else None


def read_config_text(path: str | Path) -> str:
    """A config file's text: at most MAX_YAML_BYTES (read no further), UTF-8, else one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: more than a config's {MAX_YAML_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML file") from None


def load_data(cls, path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """YAML file (optional) + overrides -> the nested dict, not yet checked against dataclass `cls`."""
    data = {}
    if path is not None:
        data = read_yaml(read_config_text(path), str(path))
        if data is None:  # a run of every default from a blank file is rather the wrong file than a wish
            raise ConfigError(f"{path}: no settings in it (empty, or comments only); a config is a YAML mapping of "
                              "settings ({} for every default)")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(data, list(overrides), cls)


def load(cls, path: str | Path | None = None, overrides: list[str] = (), check=None):
    """YAML file (optional) + overrides -> a validated instance of dataclass `cls`, on which `check` (the
    stage's checks, if given) raises a UserError blamed on the file or the override that caused it."""
    def loaded(extra: list[str]):
        data = load_data(cls, path)
        drop_replaced_choices(cls, data, apply_overrides({}, extra, cls))
        cfg = from_dict(cls, apply_overrides(data, extra, cls))
        if check is not None:
            check(cfg)
        check_overrides_read(cfg, extra)
        return cfg

    return blame(loaded, path, list(overrides))


# An `APPLIES_WHEN` value: the setting (a probability or a step count, never below 0) is above 0. None, a
# count chosen at run time, is never 0.
ABOVE_ZERO = object()


def unread_keys(cfg, prefix: str = "") -> dict[str, tuple[str, object, object]]:
    """The dotted keys of `cfg` that its other settings leave unread (a section's `APPLIES_WHEN` maps such
    a key, dotted below it, to the setting it depends on, dotted too, and the value that makes it read)
    -> (that setting, the value it needs, the value it has)."""
    unread = {}
    for field in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(value := getattr(cfg, field.name)):
            unread |= unread_keys(value, f"{prefix}{field.name}.")
    for key, (gate, wanted) in getattr(type(cfg), "APPLIES_WHEN", {}).items():
        have = functools.reduce(getattr, gate.split("."), cfg)
        if not (have != 0 if wanted is ABOVE_ZERO else have == wanted):
            unread[prefix + key] = (prefix + gate, wanted, have)
    return unread


def check_overrides_read(cfg, overrides: list[str]) -> None:
    """An override of a key the resolved config does not read is refused, rather than changing nothing in
    silence (`optim.milestones` under a cosine schedule, `lora.qkv_rank` with LoRA off)."""
    unread = unread_keys(cfg)
    given = dict.fromkeys(leaf for item in overrides for leaf in keys_set(*parse_override(item)) if leaf in unread)
    by_setting: dict[tuple, list[str]] = {}
    for key in given:
        by_setting.setdefault(unread[key], []).append(key)
    if by_setting:
        raise ConfigError("; ".join(
            f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} read only with {_setting(gate, wanted)}, and this "
            f"run has {gate}={_spelled(have)}: leave {'it' if len(keys) == 1 else 'them'} out, or set "
            f"{_setting(gate, wanted)}" for (gate, wanted, have), keys in by_setting.items()))


def _setting(gate: str, wanted) -> str:
    return f"{gate} above 0" if wanted is ABOVE_ZERO else f"{gate}={_spelled(wanted)}"


def _spelled(value) -> str:
    """A setting's value as an override spells it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def drop_replaced_choices(cls, data: dict, given: dict) -> None:
    """Where the overrides (`given`, nested) name a key of one of `cls.ONE_OF`'s groups, the file's other
    keys of that group go from `data`: the command line's choice replaces the file's (`train.max_steps=N`
    over a config's `train.epochs`)."""
    for group in getattr(cls, "ONE_OF", ()):
        if set(group) & set(given):
            for key in set(group) - set(given):
                data.pop(key, None)
    for key, value in given.items():
        section = field_type(cls, key)
        if isinstance(value, dict) and isinstance(data.get(key), dict) and section is not None:
            drop_replaced_choices(section, data[key], value)


def blame(check, path: str | Path | None, overrides: list[str]):
    """`check(overrides)`, whose UserError is re-raised naming where the bad key or value came from: the
    file when the overrides change nothing of it; else, when the file alone passes, the KEY=VALUE overrides
    without which the error changes; when it fails otherwise, the overrides the error names (if any)."""
    try:
        return check(overrides)
    except UserError as exc:
        error = str(exc)
        where = str(path) if path else ""
        alone = error_of(check, []) if overrides else error
        if alone != error:
            keys = [o.partition("=")[0] for o in overrides]
            if alone is None:  # the overrides broke a good file: those without which the error changes
                blamed = [key for n, key in enumerate(keys) if error_of(check, overrides[:n] + overrides[n + 1:]) != error]
            else:  # they got past the file's own error to another: only those the error names
                blamed = [key for key in keys if key in error.split("; valid keys")[0]]
            where = f"override {', '.join(blamed or keys)}" if blamed or alone is None else ""
        raise ConfigError(f"{where}: {error}" if where and where not in error else error) from None


def error_of(check, overrides: list[str]) -> str | None:
    try:
        check(overrides)
    except UserError as exc:
        return str(exc)
    return None


def to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested sections as dotted keys (lists stay values)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(saved: dict, cfg) -> dict[str, tuple]:
    """{dotted key: (saved value, cfg's value)} where the resolved config `cfg` differs from `saved`
    (a to_dict of a config of the same class, e.g. read back from the YAML `save` wrote)."""
    before, now = flatten(saved), flatten(to_dict(cfg))
    return {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def save(cfg, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.dump(to_dict(cfg), Dumper=ConfigDumper, sort_keys=False))


def digest(cfg) -> str:
    return json_digest(to_dict(cfg))


def json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
