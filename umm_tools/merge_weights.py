"""The merge-weights file (``merge_weights.json``): convex weights over experts, looked up per tensor.

``umm learn-merge`` writes it, ``umm collapse`` and the ``umm_learned`` mergekit method read it. Light on
purpose (pydantic only), so writing or checking a weights file never imports torch or mergekit.

Schema (JSON)::

    {
      "format": "umm-merge-weights/1",
      "mode": "learned",                     # learned | stats | uniform: how the weights were made
      "experts": ["shared.0", "routed.0", "routed.1"],   # K names, in the order of every weight list
      "layers": {                             # decoder layer index -> {key: K weights}
        "0": {"gate_proj": [0.5, 0.3, 0.2], "up_proj": [...], "down_proj": [...]},
        "1": {"*": [0.4, 0.4, 0.2]}           # "*": every tensor of the layer no other key names
      },
      "tensors": {                            # optional: exact tensor names or fnmatch patterns
        "model.layers.1.mlp.down_proj.weight": [1.0, 0.0, 0.0],
        "model.layers.3.*": [...]
      },
      "default": "uniform",                  # optional: K weights or "uniform" for anything else
      "meta": {}                              # optional, free-form (learn-merge's losses, seeds, ...)
    }

Every weight list has K entries, each finite and >= 0, summing to 1 within 1e-5.

Lookup of the weights for a tensor name, first hit wins:

1. ``tensors`` entry whose key equals the name;
2. ``tensors`` entry whose key is an fnmatch pattern (``*``, ``?``, ``[``) matching the name, in file order;
3. for a name ``...layers.<l>.<rest>``: in ``layers["<l>"]`` the longest key naming a dotted part of
   ``<rest>`` (``"gate_proj"`` and ``"mlp.gate_proj"`` both name ``mlp.gate_proj.weight``; ``"self_attn"``
   names every attention tensor), then the layer's ``"*"``;
4. ``default``.

A tensor none of these covers is an error (never a silent guess): add it, or set ``"default"``.

For ``umm collapse`` the experts are ``shared.0 … shared.S-1, routed.0 … routed.E-1`` (see
:func:`expert_names`), every MoE layer must be listed under ``layers``, and ``default`` is never used for
the merged FFN tensors.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from umm_tools.errors import UmmError

FORMAT = "umm-merge-weights/1"
SUM_TOLERANCE = 1e-5
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_GLOB_CHARS = set("*?[")


def expert_names(shared_experts: int, routed_experts: int) -> list[str]:
    """The canonical expert order of a umm MoE: ``shared.0 … shared.S-1, routed.0 … routed.E-1``."""
    return [f"shared.{s}" for s in range(shared_experts)] + [f"routed.{i}" for i in range(routed_experts)]


def _check_vector(where: str, values: Sequence[float], k: int) -> None:
    if len(values) != k:
        raise ValueError(f"{where}: expected {k} weights (one per expert), found {len(values)}")
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{where}: weight {v} is not finite")
        if v < 0:
            raise ValueError(f"{where}: weight {v} is negative; merge weights must be >= 0")
    total = math.fsum(values)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"{where}: weights sum to {total:.8g}, must sum to 1 (within {SUM_TOLERANCE:g})")


class MergeWeights(BaseModel):
    """Convex merge weights over K experts (or K models), per layer and per tensor; see the module doc."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["umm-merge-weights/1"] = Field(
        FORMAT, description="Schema tag; always 'umm-merge-weights/1'."
    )
    mode: Literal["learned", "stats", "uniform"] = Field(
        "learned",
        description="How the weights were made: fitted by learn-merge, from gating statistics, or uniform.",
    )
    experts: list[str] = Field(
        min_length=1, description="Names of the K experts (or models), in the order of every weight list."
    )
    layers: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="Decoder layer index -> {module key or '*': K weights}.",
    )
    tensors: dict[str, list[float]] = Field(
        default_factory=dict, description="Exact tensor name or fnmatch pattern -> K weights; overrides layers."
    )
    default: list[float] | Literal["uniform"] | None = Field(
        None, description="K weights (or 'uniform') for tensors nothing else covers; None makes them an error."
    )
    meta: dict[str, Any] = Field(default_factory=dict, description="Free-form provenance of the weights.")

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_keys_as_strings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check_weights(self) -> MergeWeights:
        k = len(self.experts)
        dupes = sorted({e for e in self.experts if self.experts.count(e) > 1})
        if dupes:
            raise ValueError(f"experts: names must be unique, repeated: {dupes}")
        for layer, entry in self.layers.items():
            if not layer.isdigit():
                raise ValueError(f"layers: key {layer!r} is not a layer index (expected '0', '1', ...)")
            if not entry:
                raise ValueError(f"layers.{layer}: empty; give weights per projection or under '*'")
            for key, values in entry.items():
                _check_vector(f"layers.{layer}.{key}", values, k)
        for name, values in self.tensors.items():
            _check_vector(f"tensors[{name!r}]", values, k)
        if isinstance(self.default, list):
            _check_vector("default", self.default, k)
        return self

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def uniform(cls, experts: Sequence[str], num_layers: int, mode: str = "uniform", **kw: Any) -> MergeWeights:
        """Explicit uniform weights (1/K) for every projection of every layer (WARM-style plain average)."""
        w = [1.0 / len(experts)] * len(experts)
        layers = {str(lyr): {p: list(w) for p in PROJECTIONS} for lyr in range(num_layers)}
        return cls(experts=list(experts), mode=mode, layers=layers, **kw)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (JSON); returns its path."""
        from umm_tools.utils import write_json

        path = Path(path)
        write_json(path, self.model_dump(mode="json", exclude_none=True))
        return path

    # ------------------------------------------------------------------------------------------ lookup
    def lookup(self, tensor_name: str, allow_default: bool = True) -> tuple[list[float], str] | None:
        """The K weights for ``tensor_name`` and where they came from, or None if nothing covers it."""
        if tensor_name in self.tensors:
            return self.tensors[tensor_name], f"tensors[{tensor_name!r}]"
        for pattern, values in self.tensors.items():
            if _GLOB_CHARS & set(pattern) and fnmatch.fnmatchcase(tensor_name, pattern):
                return values, f"tensors[{pattern!r}]"
        m = _LAYER_RE.search(tensor_name)
        if m and m.group(1) in self.layers:
            layer, rest = m.group(1), m.group(2)
            entry = self.layers[layer]
            dotted = f".{rest}."
            named = [key for key in entry if key != "*" and f".{key}." in dotted]
            if named:
                key = max(named, key=len)
                return entry[key], f"layers.{layer}.{key}"
            if "*" in entry:
                return entry["*"], f"layers.{layer}.*"
        if allow_default and self.default is not None:
            if self.default == "uniform":
                return [1.0 / len(self.experts)] * len(self.experts), "default (uniform)"
            return list(self.default), "default"
        return None

    def weights_for(self, tensor_name: str, source: str = "merge weights", allow_default: bool = True) -> list[float]:
        """Like :meth:`lookup` but raises :class:`UmmError` naming the tensor when nothing covers it."""
        hit = self.lookup(tensor_name, allow_default=allow_default)
        if hit is None:
            hint = ' or set "default"' if allow_default else ""
            raise UmmError(
                f"{source} has no weights for tensor {tensor_name!r}: add it under \"layers\" "
                f"(layer index -> projection or '*') or \"tensors\"{hint}."
            )
        return hit[0]

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per layer and key: the total weight on shared and on routed experts, and the heaviest expert."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for layer in sorted(self.layers, key=int):
            out[layer] = {}
            for key, values in self.layers[layer].items():
                top = max(range(len(values)), key=values.__getitem__)
                row: dict[str, Any] = {"top": self.experts[top], "top_weight": round(values[top], 6)}
                shared = [v for e, v in zip(self.experts, values, strict=True) if e.startswith("shared.")]
                if shared:
                    row["shared"] = round(math.fsum(shared), 6)
                    row["routed"] = round(1.0 - row["shared"], 6)
                out[layer][key] = row
        return out


def load_merge_weights(path: str | os.PathLike) -> MergeWeights:
    """Read and validate a merge-weights file; a bad file is a :class:`UmmError` naming file and field."""
    from umm_tools.utils import read_json

    path = Path(path)
    data = read_json(path, what="merge weights file")
    if not isinstance(data, dict):
        raise UmmError(f"{path}: a merge weights file holds a JSON object, found {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise UmmError(
            f"{path}: not a umm merge weights file (\"format\" is {data.get('format')!r}, expected {FORMAT!r}); "
            "write it with umm learn-merge."
        )
    try:
        return MergeWeights.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise UmmError(f"{path} is not a valid merge weights file:\n" + "\n".join(lines)) from e
