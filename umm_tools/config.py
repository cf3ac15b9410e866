"""Options of every stage as pydantic models, and loading them from YAML with ``--set`` overrides.

Each stage's options model subclasses :class:`Options` (``extra="forbid"``: a typo is an error, never a
silent default). Every field is documented once, in ``Field(description=...)``; the CLI renders ``--help``
from there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from umm_tools.errors import UmmError

O = TypeVar("O", bound="Options")


class Options(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so ``3`` is an int and ``[1, 2]`` a list)."""
    import yaml

    if "=" not in text:
        raise UmmError(f"--set {text!r}: expected KEY=VALUE, e.g. --set num_experts=8")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise UmmError(f"--set {text!r}: the key is empty; expected KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides (dotted keys) to a nested dict, in place; returns it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`UmmError` naming the file if it is missing or malformed."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UmmError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UmmError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UmmError(f"{p} must hold a mapping of option names to values, found {type(data).__name__}")
    return data
