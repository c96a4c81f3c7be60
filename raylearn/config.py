"""Configuration: YAML -> pydantic (validated once) -> plain kwargs.

Every YAML the project reads is parsed into a :class:`StrictModel` subclass (``extra="forbid"``),
so a misspelt key or a wrong value fails before any work starts, with one line naming the file,
the key path and what was expected::

    experiment.yaml: strategy.nme: unknown key (allowed: name, params)

Section models live beside the code they configure (``raylearn.data.preprocess.PreprocessConfig``,
``raylearn.models.config.TrainConfig``, ...); this module holds the shared base and loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "StrictModel", "format_validation_error", "load_yaml", "load_config", "parse_config"]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or mapping is invalid. The message is one human-readable line per problem."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk ``loc`` through nested model fields and list the keys allowed at its parent."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        # unwrap Optional[X] / X | None
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        current = ann
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """Turn a pydantic ``ValidationError`` into ``source: key.path: message`` lines."""
    lines = []
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        path = ".".join(str(p) for p in loc) or "<root>"
        if e.get("type") == "extra_forbidden":
            allowed = _allowed_keys(model, loc) if model is not None else []
            msg = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif e.get("type") == "missing":
            msg = "required key is missing"
        else:
            msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], Mapping | list):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any] | None, model: type[M], source: str = "<config>") -> M:
    """Validate a mapping against ``model``; raise :class:`ConfigError` with readable lines."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, raising :class:`ConfigError` (naming the file) when missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None


def load_config(path: str | Path, model: type[M]) -> M:
    """Load and validate a YAML file into ``model``."""
    return parse_config(load_yaml(path), model, source=str(path))
