"""Loading a config: YAML files, ``--set`` overrides, one-line validation errors, paths, defaults as YAML."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from hem_bootstrap.config.experiment import ExperimentConfig
from hem_bootstrap.config.model import with_legacy_width
from hem_bootstrap.errors import ConfigError
from hem_bootstrap.remote import is_remote


def _fields_of(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """Valid keys at ``path`` inside ``model`` (for 'did you mean')."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        current = nxt
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _one_line(text: str) -> str:
    """Escape control characters (a key may be any YAML string, even a newline) so the error stays one line."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn the first pydantic error into one line naming key, section, value and constraint."""
    return _one_line(_format_validation_error(err, source))


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = [p for p in e["loc"]]
    dotted = ".".join(str(p) for p in loc) or "<root>"
    if e["type"] == "extra_forbidden":
        key = str(loc[-1])
        section = ".".join(str(p) for p in loc[:-1]) or "top level"
        valid = _fields_of(ExperimentConfig, loc[:-1])
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{source}: unknown key '{key}' in section '{section}'{hint}"
    value = e.get("input")
    msg = e["msg"]
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{source}: {dotted} = {shown}: {msg}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[1,2]``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _resolve_path(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    if is_remote(p):
        return p
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path))


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    for sets in (cfg.data.train, cfg.data.pool, cfg.data.val, cfg.data.test):
        for s in sets:
            s.images = [str(_resolve_path(p, base)) for p in s.images]
            s.labels = _resolve_path(s.labels, base)
            s.distractors = _resolve_path(s.distractors, base)
            s.ignore_zones = _resolve_path(s.ignore_zones, base)
            s.aoi = _resolve_path(s.aoi, base)
    cfg.model.weights = _resolve_path(cfg.model.weights, base)
    cfg.model.backbone_weights = _resolve_path(cfg.model.backbone_weights, base)
    cfg.rounds.out_dir = str(_resolve_path(cfg.rounds.out_dir, base))
    cfg.runtime.log_file = _resolve_path(cfg.runtime.log_file, base)
    return cfg


def config_from_tree(tree: dict[str, Any], base: Path, source: str = "config") -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig`, resolving paths against ``base``."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    return _resolve_paths(cfg, base)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config, apply overrides and validate it.

    Relative paths inside the file resolve against the file's folder; with no file,
    against the current directory.
    """
    tree: Any = {}
    base = Path.cwd()
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found" + (" (a directory)" if p.is_dir() else ""))
        try:
            tree = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - safe
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p}: not a UTF-8 text file (byte {err.start}); expected a YAML config") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", "") or ""
            why = f": {problem}" if "appears twice" in problem else ""
            raise ConfigError(f"{p}: not valid YAML{where}{why}") from None
        base = p.resolve().parent
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides)
    return config_from_tree(tree, base, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def with_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved resolved config with the settings added since it was written at their defaults.

    A run started by an older version lacks the keys that came later; their defaults keep the
    old behaviour, so they are no change, except ``model.width``, whose default grew: a tree
    without it is a model of width 1. A tree the current schema refuses is compared as it is.
    """
    if isinstance(tree.get("model"), dict):
        tree = {**tree, "model": with_legacy_width(tree["model"])}
    try:
        return ExperimentConfig.model_validate(tree).model_dump(mode="json")
    except ValueError:
        return tree


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_defaults() -> str:
    """Every key with its default and help, as commented YAML."""
    lines: list[str] = []
    described: dict[type, str] = {}  # list item models already spelled out, and where

    def walk(model: type[BaseModel], indent: int, prefix: str = "", comment: str = "") -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            pad = "  " * indent
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                doc = (ann.__doc__ or "").strip().splitlines()[0] if ann.__doc__ else ""
                lines.append(f"{pad}{name}:  # {doc}")
                walk(ann, indent + 1, f"{prefix}{name}.")
                continue
            if field.is_required():
                lines.append(f"{pad}{comment}{name}:  # (required) {field.description or ''}")
                continue
            if field.default_factory is not None:
                default = field.default_factory()  # type: ignore[call-arg]
            else:
                default = field.default
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if isinstance(default, list):
                default = [d.model_dump(mode="json", exclude_none=True) if isinstance(d, BaseModel) else d for d in default]
            if isinstance(default, tuple):
                default = list(default)
            text = yaml.safe_dump(default, default_flow_style=True).strip()
            if text.endswith("\n...") or text.endswith("..."):
                text = text.replace("\n...", "").replace("...", "").strip()
            help_ = field.description or ""
            lines.append(f"{pad}{comment}{name}: {text}  # {help_}")
            _describe_items(ann, indent, f"{prefix}{name}")

    def _describe_items(ann: Any, indent: int, key: str) -> None:
        """The keys of a list's items (image sets), as a commented example entry; once per item type."""
        args = get_args(ann) if get_origin(ann) is list else ()
        item = args[0] if args else None
        if not (isinstance(item, type) and issubclass(item, BaseModel)):
            return
        if item in described:
            lines.append(f"{'  ' * (indent + 1)}# each entry as in {described[item]}")
            return
        described[item] = key
        lines.append(f"{'  ' * (indent + 1)}# each entry ({item.__name__}):")
        first = len(lines)
        walk(item, indent + 1, f"{key}[].", comment="#   ")
        lines[first] = lines[first].replace("#   ", "# - ", 1)

    walk(ExperimentConfig, 0)
    return "\n".join(lines) + "\n"
