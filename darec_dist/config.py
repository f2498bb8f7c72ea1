"""Typed configuration: YAML files plus `key=value` overrides into dataclasses.

Every job (Spark prepare, trainer, experiment runner) describes its settings as
nested dataclasses. This module turns a YAML file and command-line overrides
into such a dataclass, and refuses unknown keys and values of the wrong type
with an error that names the file and the dotted key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans and integers instead of PyYAML's YAML 1.1 ones, where `run_dir: no` was False,
    `epochs: 010` was 8 (octal) and `1:30` was 90 (base 60): only true/false are booleans, integers are decimal,
    and no number is read in base 60."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
# PyYAML's float forms less the base-60 one.
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


class _WrittenInt(int):
    """An integer that remembers how it was written: a string field given `010` is the text '010', not '10'."""

    written: str


class _WrittenFloat(float):
    """A float that remembers how it was written (`run_dir: 1.50` is the directory '1.50')."""

    written: str


def _written(number: int | float, text: str) -> int | float:
    kept = (_WrittenInt if isinstance(number, int) else _WrittenFloat)(number)
    kept.written = text
    return kept


def _decimal_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    try:
        return _written(int(text), text)
    except ValueError:  # an explicit !!int tag on other text
        raise yaml.constructor.ConstructorError(None, None, f"expected a decimal integer, got {text!r}", node.start_mark) from None


def _written_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    return _written(loader.construct_yaml_float(node), loader.construct_scalar(node))


_Loader.add_constructor(_INT, _decimal_int)
_Loader.add_constructor(_FLOAT, _written_float)


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A key given twice in one mapping: PyYAML keeps the last silently (an experiment's first variant of a name vanished)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: construct_mapping merges it, explicit keys winning
            continue
        key = loader.construct_object(key_node)
        if not isinstance(key, (str, int, float, bool, type(None))):
            continue  # construct_mapping names an unhashable key
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (first on line {seen[key] + 1})",
                                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value`; the value is read as YAML so `3`, `0.1`, `true`, `null`, `[1,2]` get their types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key, value


def set_dotted(tree: dict, key: str, value: Any, schema: Any = None) -> None:
    """Set `key` (dotted) in `tree`. A mapping given for a section of `schema` (a dataclass field) is merged into it,
    keeping the settings it does not name; one given for a mapping-valued field (an experiment's variants) replaces it."""
    node, section = tree, schema
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node, section = child, _field_type(section, part)
    _assign(node, parts[-1], value, _field_type(section, parts[-1]))


def _field_type(cls: Any, name: str) -> Any:
    """The type of dataclass `cls`'s field `name` (None where `cls` is no dataclass or has no such field)."""
    return get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None


def _assign(node: dict, name: str, value: Any, tp: Any) -> None:
    """node[name] = value, merging a mapping into a section."""
    if dataclasses.is_dataclass(tp) and value is None:  # it reset the file's whole section to the defaults
        raise ConfigError(f"override {name}=null: {name!r} is a section; set its keys ({name}.KEY=VALUE)")
    if isinstance(value, dict) and dataclasses.is_dataclass(tp) and isinstance(node.get(name), dict):
        for inner, inner_value in value.items():
            _assign(node[name], str(inner), inner_value, _field_type(tp, str(inner)))
        return
    node[name] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from a YAML file (optional) and `key=value` overrides applied on top."""
    tree = read_yaml(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value, cls)
    # A bad key may come from the file or from the command line: name both when there are overrides.
    source = str(path) if path is not None else "<overrides>"
    if path is not None and overrides:
        source += " with the command-line overrides"
    return from_dict(cls, tree, source=source)


def from_dict(cls: type[T], data: Any, source: str = "<config>") -> T:
    return _convert(cls, data, source, "")


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (what goes into manifests and run dirs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees, each as 'key: old -> new'."""
    found = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def listed(differ: list[str], most: int = 6) -> str:
    """The first `most` of differences() joined for a message, and how many more there are."""
    more = f" (and {len(differ) - most} more)" if len(differ) > most else ""
    return "; ".join(differ[:most]) + more


def _where(source: str, key: str) -> str:
    return f"{source}: key {key!r}" if key else source


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, source, key)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{_where(source, key)}: null is not allowed")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_where(source, key)}: {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{_where(source, key)}: {value!r} is not one of {list(allowed)}")
        return allowed[allowed.index(value)]  # (the allowed value itself, not a number that remembers its text)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, key)}: expected a list, got {value!r}")
        (item_type, *_) = get_args(tp) or (Any,)
        items = [_convert(item_type, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, key)}: expected a mapping, got {value!r}")
        _, value_type = get_args(tp) or (str, Any)
        if value_type is str:  # Spark's settings: `spark.sql.adaptive.enabled: true` is the text Spark reads
            value = {k: str(v).lower() if isinstance(v, bool) else v for k, v in value.items()}
        return {str(k): _convert(value_type, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)}: expected true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-4 and 1e6, without a dot, as strings.
        value = float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{_where(source, key)}: expected an integer, got {value!r}")
        # 1e6-style floats that are whole numbers are allowed: sizes are often written that way.
        if not -2**63 <= value < 2**63:  # Spark, numpy and torch take 64-bit integers; a larger one failed stages later
            raise ConfigError(f"{_where(source, key)}: expected a 64-bit integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, key)}: expected a number, got {value!r}")
        # YAML's .nan / .inf: every range check passes NaN, which trains to nan. An integer past float's range too.
        if isinstance(value, int) and abs(value) > sys.float_info.max or not math.isfinite(value):
            raise ConfigError(f"{_where(source, key)}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"{_where(source, key)}: expected a string, got {value!r} (quote it to give it as text)")
        return getattr(value, "written", str(value))  # a number read from YAML: as written
    raise ConfigError(f"{_where(source, key)}: unsupported config type {tp}")


def _convert_dataclass(cls: Any, value: Any, source: str, key: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(source, key)}: expected a section (mapping), got {value!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        names = ", ".join(f"{key + '.' if key else ''}{u}" for u in unknown)
        raise ConfigError(f"{source}: unknown key(s) {names}; allowed here: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        child = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], source, child)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _convert(hints[name], {}, source, child)
            else:
                raise ConfigError(f"{source}: missing required key {child!r}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{_where(source, key)}: {err}") from err
    return obj


__all__ = [
    "ConfigError",
    "differences",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "set_dotted",
    "to_dict",
]
