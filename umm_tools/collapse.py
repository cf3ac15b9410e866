"""``umm collapse``: merge each MoE layer's experts back into one FFN and write the source dense RM.

For every MoE layer ``l`` and projection ``p`` in gate_proj, up_proj, down_proj::

    θ*_{l,p} = Σ_k w_{l,p,k} · θ̂_{l,p,k}        k over shared.0 … shared.S-1, routed.0 … routed.E-1

where ``θ̂`` are the *canonical* experts (the upcycle's scales undone: a shared copy's down block divided by
``umm.shared_scale``, a routed expert's down_proj by ``umm.routed_scale``; gate/up as stored) and ``w`` the
convex weights of a merge-weights file (:mod:`umm_tools.merge_weights`). The result is written under the
source's names ``model.layers.{l}.mlp.{p}.weight``; routers and shared-expert gates are dropped; every
other tensor is copied unchanged. Config (``umm.source_config``, class ``umm.source_architecture``) and
tokenizer files complete a folder that ``AutoModelForSequenceClassification.from_pretrained`` loads with
nothing from umm; ``umm_provenance.json`` records where it came from.

Streaming: tensors are read one at a time through mergekit's ``LazyTensorLoader`` and appended to their
shard as soon as they exist (:class:`umm_tools.tensorio.StreamingSafetensorsWriter`: memory bounded by one
output tensor and the experts of one layer, whatever the shard size); the model is never built with weights.
Names, shapes and dtypes are checked from the safetensors headers before anything is computed. The source
class is built once on the *meta* device (no memory) to learn exactly which tensor names and shapes it has:
anything the MoE holds that the source cannot represent is refused by name (all-zero q/k/v biases
excepted: dropped with a log line), and any tensor the source needs but the MoE lacks is refused too.
Nothing is dropped silently.

MoE tensors read (both on-disk layouts of the routed experts are accepted)::

    model.layers.{l}.mlp.experts.{i}.{gate,up,down}_proj.weight   (I,H) (I,H) (H,I)   transformers' save
    model.layers.{l}.mlp.experts.gate_up_proj  (E,2I,H: gate rows, then up rows)       fused (mergekit)
    model.layers.{l}.mlp.experts.down_proj     (E,H,I)
    model.layers.{l}.mlp.shared_expert.{gate,up,down}_proj.weight  (S·I,H) (S·I,H) (H,S·I): S stacked copies
    model.layers.{l}.mlp.gate.weight, model.layers.{l}.mlp.shared_expert_gate.weight   dropped
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from umm_tools.config import Options
from umm_tools.errors import UmmError
from umm_tools.merge_weights import PROJECTIONS, MergeWeights, expert_names, load_merge_weights

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "umm_provenance.json"

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_SHARED = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")
_SHARED_GATE = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight")
_MOE_ANY = re.compile(r"model\.layers\.(\d+)\.mlp\.(experts|shared_expert|gate|shared_expert_gate)\.")
_QKV_BIAS = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias")

_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CollapseOptions(Options):
    """Options of ``umm collapse``."""

    overwrite: bool = Field(
        False, description="Replace output_dir if it exists (only once the new folder is complete)."
    )
    max_shard_size: str = Field(
        "5GB", description="Largest safetensors shard to write, e.g. '5GB', '500MB', '2GiB' or a byte count."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the written tensors; 'auto' keeps the dtype the MoE stores."
    )

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _check_size(cls, value: Any) -> str:
        from umm_tools.upcycle import parse_size

        value = str(value)
        try:
            size = parse_size(value)
        except UmmError as e:
            raise ValueError(str(e)) from e
        if size <= 0:
            raise ValueError("max_shard_size must be positive")
        return value


class UmmInfo(BaseModel):
    """The ``umm`` block of an MoE's config.json, written by ``umm upcycle``: what collapse needs to undo it."""

    model_config = ConfigDict(extra="allow")

    version: int | str
    source_architecture: str
    source_model_type: Literal["llama", "mistral", "qwen2"]
    source_config: dict[str, Any]
    source: str
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    shared_experts: int = Field(ge=1)
    shared_share: float = Field(ge=0.0, le=1.0)
    intermediate_size: int = Field(ge=1)
    routed_scale: float = Field(ge=0.0)
    shared_scale: float = Field(ge=0.0)


@dataclass
class _Layer:
    """The MoE tensors of one decoder layer, by role."""

    experts: dict[tuple[int, str], str] = field(default_factory=dict)  # (i, proj) -> name
    fused: dict[str, str] = field(default_factory=dict)  # gate_up_proj | down_proj -> name
    shared: dict[str, str] = field(default_factory=dict)  # proj -> name


@dataclass
class _Plan:
    copies: dict[str, str] = field(default_factory=dict)  # output name -> input name
    merges: dict[str, tuple[int, str, list[float], str]] = field(default_factory=dict)  # out -> (l, p, w, where)
    layers: dict[int, _Layer] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # input name -> reason


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ reading
def _check_moe_dir(moe_dir: Path) -> tuple[dict[str, Any], UmmInfo]:
    """config.json with a valid ``umm`` block, and some weights: else a UmmError saying what was found."""
    if not moe_dir.is_dir():
        raise UmmError(f"MoE folder not found: {moe_dir}")
    found = sorted(p.name for p in moe_dir.iterdir())
    shown = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "") if found else "nothing"
    missing = []
    if not (moe_dir / "config.json").is_file():
        missing.append("config.json")
    if not any((moe_dir / f).is_file() for f in _WEIGHT_FILES):
        missing.append("weights (model.safetensors, or model.safetensors.index.json and its shards)")
    if missing:
        raise UmmError(
            f"{moe_dir} is not a model folder: missing {' and '.join(missing)}; found: {shown}. "
            "Point collapse at the folder written by umm upcycle or umm train."
        )
    from umm_tools.utils import read_json

    cfg = read_json(moe_dir / "config.json", what="MoE config")
    if not isinstance(cfg, dict) or "umm" not in cfg:
        raise UmmError(
            f"{moe_dir / 'config.json'} has no 'umm' key: not a umm MoE: run umm upcycle first "
            "(collapse needs the source architecture and scales that upcycle records there)."
        )
    try:
        info = UmmInfo.model_validate(cfg["umm"])
    except ValidationError as e:
        lines = [f"  umm.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise UmmError(
            f"{moe_dir / 'config.json'}: the 'umm' block is incomplete or invalid (was it edited?):\n"
            + "\n".join(lines)
        ) from e
    for key, want in (
        ("num_experts", info.num_experts),
        ("moe_intermediate_size", info.intermediate_size),
        ("shared_expert_intermediate_size", info.shared_experts * info.intermediate_size),
    ):
        if key in cfg and cfg[key] != want:
            raise UmmError(
                f"{moe_dir / 'config.json'}: {key} is {cfg[key]} but the umm block implies {want}; "
                "the config and its umm block disagree."
            )
    return cfg, info


def build_source_model(info: UmmInfo, device: str = "meta") -> Any:
    """An instance of the source class (``umm.source_architecture``) with ``umm.source_config``.

    On ``meta`` (default) it takes no memory; elsewhere its parameters are allocated but not initialised
    (load them before use); buffers (rotary frequencies) are computed as usual.
    """
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, info.source_architecture, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise UmmError(
            f"umm.source_architecture {info.source_architecture!r} is not a transformers model class; "
            "the MoE's config.json was written for another transformers version or edited."
        )
    sc = dict(info.source_config)
    model_type = sc.pop("model_type", info.source_model_type)
    try:
        config = AutoConfig.for_model(model_type, **sc)
        with torch.device(device), no_init_weights():
            return cls(config)
    except Exception as e:  # a bad config is the user's file, not a bug here
        raise UmmError(f"umm.source_config does not build a {info.source_architecture}: {e}") from e


def _expected_tensors(info: UmmInfo) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the source class's state dict, from a meta-device instance (no memory)."""
    return {k: tuple(v.shape) for k, v in build_source_model(info).state_dict().items()}


def _read_headers(moe_dir: Path, index: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype name, shape) for every tensor the index lists, from the safetensors headers alone."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in index.shards:
        path = moe_dir / shard.filename
        if not shard.filename.endswith(".safetensors"):
            raise UmmError(
                f"{path}: collapse reads safetensors weights only; re-save the MoE with "
                "save_pretrained(..., safe_serialization=True)."
            )
        if not path.is_file():
            raise UmmError(f"{moe_dir}: the weight index names shard {shard.filename}, which is missing.")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = f.get_slice(key)
                    code = sl.get_dtype()
                    out[key] = (_ST_DTYPES.get(code, code), tuple(sl.get_shape()))
        except Exception as e:  # safetensors raises several types for a damaged header
            raise UmmError(f"{path} is corrupt or not a safetensors file ({e}).") from e
    absent = sorted(set(index.tensor_paths) - set(out))
    if absent:
        raise UmmError(f"{moe_dir}: the weight index lists {absent[0]} ({len(absent)} in all) but no shard holds it.")
    return out


def _open_weights(moe_dir: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], Any]:
    """The safetensors headers (name -> (dtype, shape)) and a mergekit ``LazyTensorLoader`` of the MoE."""
    from mergekit.io import LazyTensorLoader, ShardedTensorIndex

    try:
        index = ShardedTensorIndex.from_disk(str(moe_dir))
    except (RuntimeError, OSError, ValueError) as e:
        raise UmmError(f"cannot read the weight index of {moe_dir}: {e}") from e
    return _read_headers(moe_dir, index), LazyTensorLoader(index, lazy_unpickle=False)


def _plan(headers: dict[str, tuple[str, tuple[int, ...]]], info: UmmInfo, mw: MergeWeights, weights_src: str,
          expected: dict[str, tuple[int, ...]], loader: Any) -> _Plan:
    """Assign every input tensor a fate (copied, merged, dropped) or refuse; check against the source."""
    plan = _Plan()
    E, S, I = info.num_experts, info.shared_experts, info.intermediate_size
    unplaced = []
    for name in sorted(headers, key=_natural_key):
        if m := _EXPERT.fullmatch(name):
            lyr, i, p = int(m.group(1)), int(m.group(2)), m.group(3)
            if i >= E:
                unplaced.append(name)
                continue
            plan.layers.setdefault(lyr, _Layer()).experts[(i, p)] = name
        elif m := _FUSED.fullmatch(name):
            plan.layers.setdefault(int(m.group(1)), _Layer()).fused[m.group(2)] = name
        elif m := _SHARED.fullmatch(name):
            plan.layers.setdefault(int(m.group(1)), _Layer()).shared[m.group(2)] = name
        elif m := _ROUTER.fullmatch(name):
            plan.layers.setdefault(int(m.group(1)), _Layer())
            plan.dropped[name] = "router"
        elif m := _SHARED_GATE.fullmatch(name):
            plan.layers.setdefault(int(m.group(1)), _Layer())
            plan.dropped[name] = "shared_expert_gate"
        elif _MOE_ANY.match(name):
            unplaced.append(name)
        else:
            plan.copies[name] = name

    # The weights file must describe exactly this MoE.
    want_experts = expert_names(S, E)
    if mw.experts != want_experts:
        raise UmmError(
            f"{weights_src} does not match the MoE: it has {len(mw.experts)} experts {mw.experts}, the MoE has "
            f"{S} shared and {E} routed: {want_experts}. Run umm learn-merge on this MoE."
        )
    moe_layers = sorted(plan.layers)
    have = sorted(int(k) for k in mw.layers)
    if have != moe_layers:
        missing = sorted(set(moe_layers) - set(have))
        extra = sorted(set(have) - set(moe_layers))
        raise UmmError(
            f"{weights_src} does not match the MoE: the MoE has {len(moe_layers)} MoE layers {moe_layers}, "
            f"the file has weights for layers {have} (missing: {missing}, not in the MoE: {extra}). "
            "Run umm learn-merge on this MoE."
        )

    def check_shape(name: str, want: tuple[int, ...], why: str) -> None:
        if headers[name][1] != want:
            raise UmmError(
                f"MoE tensor {name} has shape {headers[name][1]}, expected {want} ({why}); "
                "the checkpoint does not match its config.json."
            )

    # Every MoE layer complete, in exactly one routed layout, with the shapes the umm block implies.
    for lyr in moe_layers:
        layer = plan.layers[lyr]
        prefix = f"model.layers.{lyr}.mlp"
        need = [f"{prefix}.shared_expert.{p}.weight" for p in PROJECTIONS if p not in layer.shared]
        if layer.experts and layer.fused:
            raise UmmError(
                f"layer {lyr} stores routed experts in both layouts (per-expert {prefix}.experts.N.* and fused "
                f"{prefix}.experts.gate_up_proj/down_proj); keep one."
            )
        if layer.fused:
            need += [f"{prefix}.experts.{k}" for k in ("gate_up_proj", "down_proj") if k not in layer.fused]
        else:
            need += [
                f"{prefix}.experts.{i}.{p}.weight" for i in range(E) for p in PROJECTIONS
                if (i, p) not in layer.experts
            ]
        if need:
            shown = ", ".join(need[:6]) + (f", ... ({len(need)} in all)" if len(need) > 6 else "")
            raise UmmError(f"the MoE is missing tensors of layer {lyr}: {shown}")
        for p in PROJECTIONS:
            out = f"{prefix}.{p}.weight"
            if out in plan.copies:
                raise UmmError(f"layer {lyr} holds both a dense {out} and MoE experts; it cannot be collapsed")
            if out not in expected:
                raise UmmError(f"{info.source_architecture} has no tensor {out}: umm.source_config has fewer layers")
            dense = expected[out]  # (I, H) for gate/up, (H, I) for down
            if p == "down_proj":
                if dense[1] != I:
                    raise UmmError(
                        f"umm.intermediate_size is {I} but umm.source_config gives {out} shape {dense}; "
                        "the umm block is inconsistent."
                    )
                H = dense[0]
                check_shape(layer.shared[p], (H, S * I), f"{S} shared copies of width {I}")
                if layer.fused:
                    check_shape(layer.fused["down_proj"], (E, H, I), f"{E} routed experts")
                else:
                    for i in range(E):
                        check_shape(layer.experts[(i, p)], dense, "a routed expert")
            else:
                H = dense[1]
                check_shape(layer.shared[p], (S * I, H), f"{S} shared copies of width {I}")
                if layer.fused:
                    check_shape(layer.fused["gate_up_proj"], (E, 2 * I, H), f"{E} routed experts, gate then up")
                else:
                    for i in range(E):
                        check_shape(layer.experts[(i, p)], dense, "a routed expert")
            hit = mw.lookup(out, allow_default=False)
            if hit is None:
                raise UmmError(
                    f"{weights_src}: layers.{lyr} has no weights for {p} (nor '*'); give all of "
                    f"{', '.join(PROJECTIONS)}."
                )
            weights, where = hit
            if p == "down_proj":
                for e, w in zip(mw.experts, weights, strict=True):
                    scale = info.shared_scale if e.startswith("shared.") else info.routed_scale
                    if w != 0 and scale == 0:
                        raise UmmError(
                            f"{weights_src}: {where} gives {e} weight {w}, but its down_proj was scaled by 0 at "
                            "upcycle (shared_share 0 or 1), so it has no canonical form; give it weight 0."
                        )
            plan.merges[out] = (lyr, p, list(weights), where)

    # Against the source architecture: nothing unrepresentable, nothing missing.
    for name in sorted(set(plan.copies) - set(expected), key=_natural_key):
        if _QKV_BIAS.fullmatch(name):
            t = loader.get_tensor(name)
            if t.count_nonzero().item() == 0:
                logger.info("dropping %s: all zeros, and %s has no attention bias", name, info.source_architecture)
                plan.dropped[name] = "zero attention bias"
                del plan.copies[name]
                continue
            raise UmmError(
                f"MoE tensor {name} is non-zero (max |b| = {t.abs().max().item():.3g}) but "
                f"{info.source_architecture} has no q/k/v biases, so collapsing would change the model. "
                "Retrain with the attention biases frozen at zero (umm train freezes them)."
            )
        unplaced.append(name)
    if unplaced:
        shown = ", ".join(sorted(unplaced, key=_natural_key)[:8])
        raise UmmError(
            f"{len(unplaced)} MoE tensor(s) have no place in {info.source_architecture} and would be lost: "
            f"{shown}{', ...' if len(unplaced) > 8 else ''}. Nothing is dropped silently; remove them from the "
            "checkpoint only if they do not matter."
        )
    missing = sorted(set(expected) - set(plan.copies) - set(plan.merges), key=_natural_key)
    if missing:
        raise UmmError(
            f"{info.source_architecture} needs tensor(s) the MoE does not have: {', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}."
        )
    for name in plan.copies:
        check_shape(name, expected[name], f"{info.source_architecture}'s shape")
    return plan


class _Reader:
    """Reads MoE tensors through mergekit's loader, caching the current layer's shared/fused blocks."""

    def __init__(self, loader: Any, info: UmmInfo) -> None:
        self.loader, self.info = loader, info
        self._layer: int | None = None
        self._cache: dict[str, Any] = {}

    def _get_cached(self, lyr: int, name: str) -> torch.Tensor:
        if self._layer != lyr:
            # A new layer: drop the previous layer's blocks and the loader's open shard, so the memory-mapped
            # input pages already used are released (peak RSS 1.3 GB -> 0.5 GB on a SmolLM2-135M-sized MoE).
            self._layer, self._cache = lyr, {}
            self.loader.flush()
        if name not in self._cache:
            self._cache[name] = self.loader.get_tensor(name)
        return self._cache[name]

    def canonical(self, lyr: int, p: str, layer: _Layer, weights: list[float]) -> Iterator[torch.Tensor | None]:
        """Yield θ̂_{l,p,k} (float32) in expert order; None where the weight is 0 (never loaded)."""
        info, I = self.info, self.info.intermediate_size
        for s in range(info.shared_experts):
            if weights[s] == 0:
                yield None
                continue
            full = self._get_cached(lyr, layer.shared[p])  # (S·I, H), or (H, S·I) for down_proj
            if p == "down_proj":
                yield full[:, s * I:(s + 1) * I].float() / info.shared_scale
            else:
                yield full[s * I:(s + 1) * I].float()
        for i in range(info.num_experts):
            if weights[info.shared_experts + i] == 0:
                yield None
                continue
            if layer.fused and p == "down_proj":
                t = self._get_cached(lyr, layer.fused["down_proj"])[i]  # (E, H, I) -> (H, I)
            elif layer.fused:
                gate_up = self._get_cached(lyr, layer.fused["gate_up_proj"])  # (E, 2I, H): gate rows, then up
                t = gate_up[i, :I] if p == "gate_proj" else gate_up[i, I:]
            else:
                t = self.loader.get_tensor(layer.experts[(i, p)])
            t = t.float()
            yield t / info.routed_scale if p == "down_proj" else t


@dataclass
class CanonicalMoE:
    """A umm MoE read for merging: what :func:`collapse` writes, before the weights are chosen."""

    info: UmmInfo
    experts: list[str]  # shared.0 … shared.S-1, routed.0 … routed.E-1
    fixed: dict[str, torch.Tensor]  # source tensor name -> tensor as stored (copied unchanged by collapse)
    merged: dict[str, tuple[int, str, torch.Tensor]]  # source FFN name -> (layer, projection, θ̂ (K, ...) fp32)
    dtypes: dict[str, str]  # source FFN name -> dtype collapse writes it in (dtype 'auto': as stored)


def read_canonical_moe(moe_dir: str | os.PathLike) -> CanonicalMoE:
    """Read every tensor of a umm MoE as collapse sees it: the source's fixed tensors and, per merged FFN
    tensor, its K canonical experts stacked in expert order (the same checks and refusals as collapse).

    Holds the whole MoE in memory (the experts in float32); used by ``umm learn-merge``.
    """
    import torch

    moe_dir = Path(moe_dir).absolute()
    _, info = _check_moe_dir(moe_dir)
    headers, loader = _open_weights(moe_dir)
    experts = expert_names(info.shared_experts, info.num_experts)
    moe_layers = sorted({int(m.group(1)) for name in headers if (m := _MOE_ANY.match(name))})
    every = [1.0 / len(experts)] * len(experts)  # every weight non-zero: every expert is read
    uniform = MergeWeights(experts=experts, mode="uniform", layers={str(lyr): {"*": every} for lyr in moe_layers})
    plan = _plan(headers, info, uniform, "the MoE", _expected_tensors(info), loader)
    reader = _Reader(loader, info)
    merged, dtypes = {}, {}
    for out, (lyr, p, weights, _) in sorted(plan.merges.items(), key=lambda kv: _natural_key(kv[0])):
        merged[out] = (lyr, p, torch.stack(list(reader.canonical(lyr, p, plan.layers[lyr], weights))))
        dtypes[out] = headers[plan.layers[lyr].shared[p]][0]
    fixed = {out: loader.get_tensor(name) for out, name in plan.copies.items()}
    loader.flush()
    return CanonicalMoE(info=info, experts=experts, fixed=fixed, merged=merged, dtypes=dtypes)


# ------------------------------------------------------------------------------------------ collapse
def collapse(moe_dir: str | os.PathLike, merge_weights: str | os.PathLike | MergeWeights,
             output_dir: str | os.PathLike, opts: CollapseOptions | None = None) -> Path:
    """Collapse a umm MoE RM into the source dense RM using ``merge_weights``; returns the output folder.

    ``merge_weights`` is a merge_weights.json path (or a :class:`MergeWeights`). The output folder appears
    only when complete (see :func:`umm_tools.utils.atomic_output_dir`); on any error nothing is left there.
    """
    import torch

    from umm_tools import __version__
    from umm_tools.merge_method import weighted_average
    from umm_tools.tensorio import StreamingSafetensorsWriter
    from umm_tools.upcycle import TOKENIZER_FILES, parse_size
    from umm_tools.utils import atomic_output_dir, progress, write_json

    opts = opts or CollapseOptions()
    moe_dir = Path(moe_dir).absolute()
    output_dir = Path(output_dir).absolute()
    cfg, info = _check_moe_dir(moe_dir)
    if isinstance(merge_weights, MergeWeights):
        mw, weights_path = merge_weights, None
        weights_src = "the merge weights"
        weights_sha = hashlib.sha256(mw.model_dump_json().encode()).hexdigest()
    else:
        weights_path = Path(merge_weights).absolute()
        mw = load_merge_weights(weights_path)
        weights_src = str(weights_path)
        weights_sha = _sha256(weights_path)
    if output_dir.exists() and not opts.overwrite:
        raise UmmError(f"{output_dir} already exists; choose another output folder or pass --overwrite to replace it.")

    headers, loader = _open_weights(moe_dir)
    expected = _expected_tensors(info)
    plan = _plan(headers, info, mw, weights_src, expected, loader)

    # Output layout, fixed before anything is computed: names and shapes of the source, dtypes as stored.
    def out_dtype(stored: str) -> torch.dtype:
        if opts.dtype != "auto" and getattr(torch, stored).is_floating_point:
            return getattr(torch, opts.dtype)
        return getattr(torch, stored)

    layout = []
    for out in sorted([*plan.copies, *plan.merges], key=_natural_key):
        if out in plan.merges:
            lyr, p = plan.merges[out][:2]
            stored = headers[plan.layers[lyr].shared[p]][0]
        else:
            stored = headers[plan.copies[out]][0]
        layout.append((out, expected[out], out_dtype(stored)))
    float_dtypes = Counter(_dtype_name(d) for _, _, d in layout if d.is_floating_point)

    reader = _Reader(loader, info)
    with atomic_output_dir(output_dir, overwrite=opts.overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, layout, parse_size(opts.max_shard_size))
        try:
            for out, _shape, dtype in progress(layout, desc="collapse", unit="tensor"):
                if out in plan.merges:
                    lyr, p, weights, _ = plan.merges[out]
                    canon = reader.canonical(lyr, p, plan.layers[lyr], weights)
                    tensor = weighted_average(canon, weights, name=out)
                else:
                    tensor = loader.get_tensor(plan.copies[out])
                writer.write(out, tensor.to(dtype))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        loader.flush()

        dense_cfg = dict(info.source_config)
        for key in ("torch_dtype", "_name_or_path"):
            dense_cfg.pop(key, None)
        dense_cfg["architectures"] = [info.source_architecture]
        dense_cfg["dtype"] = float_dtypes.most_common(1)[0][0]
        write_json(tmp / "config.json", dense_cfg)

        copied = []
        for fname in TOKENIZER_FILES:
            if (moe_dir / fname).is_file():
                shutil.copy2(moe_dir / fname, tmp / fname)
                copied.append(fname)
        if not copied:
            logger.warning("no tokenizer files in %s: the collapsed RM has none either", moe_dir)

        write_json(tmp / PROVENANCE_FILE, {
            "stage": "collapse",
            "umm_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": info.source,
            "source_architecture": info.source_architecture,
            "moe_dir": str(moe_dir),
            "moe_umm": {k: v for k, v in cfg["umm"].items() if k != "source_config"},
            "merge_weights": {
                "path": str(weights_path) if weights_path else None,
                "sha256": weights_sha,
                "mode": mw.mode,
                "experts": mw.experts,
                "meta": mw.meta,
                "used": {out: where for out, (_, _, _, where) in plan.merges.items()},
            },
            "layers": mw.summary(),
            "options": opts.model_dump(),
            "tensors": {
                "merged": len(plan.merges),
                "copied": len(plan.copies),
                "dropped": sorted(plan.dropped, key=_natural_key),
            },
            "tokenizer_files": copied,
        })
    logger.info(
        "collapsed %s -> %s: %d FFN tensors merged, %d copied, %d dropped (%s)", moe_dir, output_dir,
        len(plan.merges), len(plan.copies), len(plan.dropped),
        ", ".join(f"{n} {r}" for r, n in Counter(plan.dropped.values()).items()) or "none",
    )
    return output_dir
