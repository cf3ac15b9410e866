"""``umm learn-merge``: learn the convex weights that average a MoE RM's experts back into one dense FFN.

For every MoE layer ``l`` and projection ``p`` (gate_proj, up_proj, down_proj) the merged FFN tensor is

    θ*_{l,p} = Σ_k w_{l,p,k} · θ̂_{l,p,k},     w_{l,p} = softmax(ℓ_{l,p})

over the canonical experts ``k`` in the order ``shared.0 … shared.S-1, routed.0 … routed.E-1`` (the
upcycle's scales undone, read exactly as ``umm collapse`` reads them:
:func:`umm_tools.collapse.read_canonical_moe`). With ``granularity="layer"`` one vector ``w_l`` serves all
three projections of the layer.

Initialisation from gating statistics ("routing-weight normalisation")
------------------------------------------------------------------------
``umm train`` writes ``routing_stats.json`` into the MoE folder: per layer, over the training tokens, the
mean shared-gate value ``m_l = mean σ(g·x)`` and each routed expert's share ``π_{l,i}`` of the routing mass:
``routed_prob_share`` (its share of the softmax probability, which stands in for its mean renormalised
top-k weight p̃_i; both are 1/E for a uniform router) or, with ``routing_share="topk"``,
``routed_topk_share`` (its share of the top-k selections). Written in canonical experts, the MoE
layer is ``y = Σ_i p̃_i(x)·(1-c)·f̂_i(x) + Σ_s σ(g·x)·(2c/S)·f̂_s(x)`` (``routed_scale = 1-c``, ``shared_scale
= 2c/S`` from the ``umm`` block of config.json), so the token-averaged coefficient of each canonical expert is

    a_{shared.s} = shared_scale · m_l              (the same for every one of the S shared parts)
    a_{routed.i} = routed_scale · π_{l,i}

and the initial weights are these coefficients normalised to sum to 1 (``T`` = ``init_temperature``)::

    w_k = a_k^{1/T} / Σ_j a_j^{1/T}                 i.e.  ℓ_k = log(a_k) / T

For a freshly upcycled MoE (shared gate 0, so m = 1/2; uniform router, π = 1/E) this gives exactly ``c/S``
per shared part and ``(1-c)/E`` per routed expert: the coefficients the MoE itself applies, which already
sum to 1. After training they need not (the shared gate moves); normalising keeps their ratios and makes
the average convex. A coefficient below 1e-12 of the largest is raised to that floor, so every logit is
finite (an expert at the floor can still gain weight in the fit).

Fitting
-------
``mode="learned"`` then fits the logits ``ℓ`` (a few hundred scalars) by the Bradley–Terry loss
``-log σ(r_chosen - r_rejected)`` on preference pairs, plus ``init_pull · ‖ℓ - ℓ_init‖²``, with Adam. The
model run is the *dense source architecture* (``umm.source_config``) with the non-FFN tensors from the MoE
and the FFN tensors computed from the logits as above (``torch.func.functional_call``), so what is
optimised is exactly what ``umm collapse`` writes; the canonical experts and every other tensor stay
frozen. When the MoE is stored in bfloat16/float16 the averaged tensors are rounded to that dtype in the
forward pass (gradients pass straight through), as collapse rounds them when it writes.
``mode="stats"`` writes the initialisation; ``mode="uniform"`` writes the plain average 1/K (WARM-style),
needs no routing statistics and no data.

Several dense RMs (:func:`learn_merge_models`)
----------------------------------------------
The same fit over K dense RMs of one architecture (WARM with learned weights): every tensor of decoder
layer ``l`` is averaged with the layer's weights (``granularity="projection"``: the FFN projections each
get their own vector and ``"*"`` covers the rest of the layer), the tensors outside the layers (embeddings,
final norm, score head) with one ``global`` vector. Initialised uniform. Writes the weights file and a
mergekit YAML (merge method ``umm_learned``) that :func:`umm_tools.merge_method.run_mergekit_yaml` runs.

Output folder (written atomically: it appears only when complete)
------------------------------------------------------------------
``OUTPUT/merge_weights.json``       the weights (:mod:`umm_tools.merge_weights`); give it to ``umm collapse``
``OUTPUT/metrics.json``             BT loss and accuracy of the averaged dense RM before and after fitting,
                                    the training-loss curve, a per-layer weight summary, data statistics
``OUTPUT/learn_merge_options.json`` the resolved options and inputs
``OUTPUT/merge.yaml``               (several RMs only) the mergekit YAML

Multi-process: run under ``accelerate launch`` (GPUs) or ``torchrun`` (CPUs: gloo; accelerate is then told
``cpu=True``). Each process scores its share of every batch; the logits' gradients are summed over the
processes, so every process takes the same step; only the main process writes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from umm_tools.data import DataOptions
from umm_tools.errors import UmmError
from umm_tools.merge_weights import PROJECTIONS, MergeWeights, load_merge_weights
from umm_tools.train import ROUTING_STATS_FILE, ROUTING_STATS_FORMAT  # written by umm train

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "merge_weights.json"
METRICS_FILE = "metrics.json"
OPTIONS_FILE = "learn_merge_options.json"
MERGEKIT_YAML = "merge.yaml"
# A coefficient below this fraction of a layer's largest is raised to it: every initial logit stays finite.
_FLOOR = 1e-12
_SHARE_TOLERANCE = 1e-3
DEFAULT_EVAL_FRACTION = 0.1
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class LearnMergeOptions(DataOptions):
    """Options of ``umm learn-merge``: how the weights are made, and how the pairs are read (every
    :class:`~umm_tools.data.DataOptions` field, flat: ``max_length``, ``eval_data``, column names, ...)."""

    mode: Literal["learned", "stats", "uniform"] = Field(
        "learned",
        description="'learned': initialise from the routing statistics and fit on DATA; 'stats': the routing-"
        "statistics initialisation alone; 'uniform': the plain average (WARM-style; no statistics or data needed).",
    )
    granularity: Literal["projection", "layer"] = Field(
        "projection",
        description="'projection': one weight vector per layer and FFN projection (gate/up/down); 'layer': one "
        "per layer, shared by its projections.",
    )
    steps: int = Field(100, ge=0, description="Optimisation steps of the fit (mode 'learned').")
    learning_rate: float = Field(0.05, gt=0, description="Adam learning rate of the merge logits.")
    batch_size: int = Field(
        8, ge=1, description="Preference pairs per step, over all processes (also pairs per scoring pass)."
    )
    init_pull: float = Field(
        0.0, ge=0, description="Weight of the L2 pull of the logits towards their initial values (0: none)."
    )
    init_temperature: float = Field(
        1.0,
        gt=0,
        description="Temperature T of the routing-statistics initialisation: w ∝ a^(1/T); above 1 flattens "
        "towards uniform.",
    )
    routing_share: Literal["prob", "topk"] = Field(
        "prob",
        description="Routing statistic giving each routed expert's share: 'prob' (routed_prob_share, routing "
        "probability mass) or 'topk' (routed_topk_share, how often it is selected).",
    )
    eval_fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description=f"Share of the pairs held out to measure the merge before and after fitting (seeded by 'seed'); "
        f"unset: {DEFAULT_EVAL_FRACTION} unless eval_data or eval_split is given; 0 to fit on all pairs (the "
        "merge is then measured on the training pairs).",
    )
    seed: int = Field(0, description="Seed of the eval_fraction hold-out and of the batch order.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run: 'auto' takes what accelerate picks (CUDA when present)."
    )
    overwrite: bool = Field(False, description="Replace OUTPUT if it exists (only once the new folder is complete).")

    @model_validator(mode="after")
    def _one_eval_source(self) -> LearnMergeOptions:  # replaces DataOptions' rule: eval_fraction may be unset
        if self.eval_fraction and (self.eval_data or self.eval_split):
            raise ValueError("give eval_fraction or eval_data/eval_split, not both")
        return self

    def resolved(self) -> LearnMergeOptions:
        """A copy with ``eval_fraction`` set: the default share, or 0 when eval_data/eval_split is given."""
        if self.eval_fraction is not None:
            return self.model_copy()
        fraction = 0.0 if self.eval_data or self.eval_split else DEFAULT_EVAL_FRACTION
        return self.model_copy(update={"eval_fraction": fraction})


# ---------------------------------------------------------------------------------------------------------
# Routing statistics and the initial weights


def read_routing_stats(moe_dir: str | os.PathLike) -> dict[str, Any]:
    """``routing_stats.json`` of a trained MoE, checked for its format; :class:`UmmError` if missing or wrong."""
    from umm_tools.utils import read_json

    path = Path(moe_dir) / ROUTING_STATS_FILE
    if not path.is_file():
        raise UmmError(
            f"{path} not found: the routing-statistics initialisation needs the statistics `umm train` writes "
            "into the MoE folder. Run `umm train` on this MoE first, or use --mode uniform."
        )
    stats = read_json(path, what="routing statistics")
    if not isinstance(stats, dict) or stats.get("format") != ROUTING_STATS_FORMAT:
        found = stats.get("format") if isinstance(stats, dict) else type(stats).__name__
        raise UmmError(f"{path}: not a umm routing-statistics file (format {found!r}, expected "
                       f"{ROUTING_STATS_FORMAT!r}); rerun `umm train`, or use --mode uniform.")
    if not isinstance(stats.get("layers"), dict):
        raise UmmError(f"{path}: no 'layers' mapping; rerun `umm train`, or use --mode uniform.")
    return stats


def stats_init_weights(
    stats: Mapping[str, Any],
    layers: Sequence[int],
    *,
    shared_experts: int,
    routed_scale: float,
    shared_scale: float,
    share: Literal["prob", "topk"] = "prob",
    temperature: float = 1.0,
    where: str = ROUTING_STATS_FILE,
) -> dict[int, list[float]]:
    """Initial convex weights per layer from routing statistics (the formula of the module docstring).

    Returns ``{layer: [w_shared.0 … w_shared.S-1, w_routed.0 … w_routed.E-1]}`` summing to 1, for each of
    ``layers``. Raises :class:`UmmError` naming ``where`` when a layer is missing or malformed.
    """
    key = "routed_prob_share" if share == "prob" else "routed_topk_share"
    n_experts = stats.get("num_experts")
    out: dict[int, list[float]] = {}
    for lyr in layers:
        entry = stats["layers"].get(str(lyr))
        if not isinstance(entry, dict):
            raise UmmError(f"{where}: no statistics for layer {lyr}; they do not belong to this MoE. Rerun "
                           "`umm train`, or use --mode uniform.")
        pi, gate = entry.get(key), entry.get("shared_gate_mean")
        if not isinstance(pi, list) or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in pi):
            raise UmmError(f"{where}: layers.{lyr}.{key} must be a list of non-negative numbers, found {pi!r}")
        if n_experts is not None and len(pi) != n_experts:
            raise UmmError(f"{where}: layers.{lyr}.{key} has {len(pi)} entries, num_experts is {n_experts}")
        total = math.fsum(pi)
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            raise UmmError(f"{where}: layers.{lyr}.{key} sums to {total:.6g}, expected 1")
        if not isinstance(gate, int | float) or not 0.0 <= gate <= 1.0:
            raise UmmError(f"{where}: layers.{lyr}.shared_gate_mean must be in [0, 1], found {gate!r}")
        a = [shared_scale * gate] * shared_experts + [routed_scale * v / total for v in pi]
        top = max(a)
        if top <= 0:
            raise UmmError(f"{where}: layer {lyr}: every expert has zero routing mass; use --mode uniform.")
        logits = [math.log(max(v, _FLOOR * top)) / temperature for v in a]
        peak = max(logits)
        exp = [math.exp(v - peak) for v in logits]
        z = math.fsum(exp)
        out[lyr] = [v / z for v in exp]
    return out


# ---------------------------------------------------------------------------------------------------------
# The averaged dense model


class AveragedRM:
    """A dense RM whose averaged tensors are ``Σ_k softmax(logits[g])_k · stack_k``, differentiable in the logits.

    ``stacks[name]`` is the (K, ...) float32 stack of tensor ``name``'s K canonical experts (or models);
    ``group_of[name]`` the row of ``logits`` (G, K) that weights it; ``groups[g]`` that row's key
    ``(layer, key)``: ``(str(l), projection)``, ``(str(l), "*")`` or ``(None, "global")``. Every other tensor
    of ``model`` is fixed. Build one with :meth:`from_moe`, :meth:`from_models` or :func:`load_averaged_rm`.
    """

    def __init__(self, model: Any, tokenizer: Any, experts: list[str], stacks: dict[str, torch.Tensor],
                 group_of: dict[str, int], groups: list[tuple[str | None, str]], round_to: dict[str, Any],
                 source: str | list[str]):
        import torch

        self.model, self.tokenizer, self.experts = model, tokenizer, experts
        self.stacks, self.group_of, self.groups, self.round_to = stacks, group_of, groups, round_to
        self.source = source
        self.info: Any = None  # the MoE's umm block (from_moe only)
        # float64: a few hundred scalars, so the written weights are exact (stats mode: c/S to ~1e-16)
        self.logits = torch.nn.Parameter(torch.zeros(len(groups), len(experts), dtype=torch.float64,
                                                     device=self.device))

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_moe(cls, moe_dir: str | os.PathLike, granularity: str = "projection", device: Any = "cpu") -> AveragedRM:
        """The source dense RM of a umm MoE, its FFN tensors averaged over the canonical experts (logits 0)."""
        import torch

        from umm_tools.collapse import build_source_model, read_canonical_moe

        moe_dir = Path(moe_dir).absolute()
        moe = read_canonical_moe(moe_dir)
        model = build_source_model(moe.info, device="cpu")
        state = {name: t.float() for name, t in moe.fixed.items()}
        state.update({name: stack.mean(0) for name, (_, _, stack) in moe.merged.items()})  # placeholders
        _load_all(model, state, str(moe_dir))
        del state, moe.fixed
        groups: list[tuple[str | None, str]] = []
        group_of: dict[str, int] = {}
        for name, (lyr, p, _) in moe.merged.items():
            key = (str(lyr), p if granularity == "projection" else "*")
            if key not in groups:
                groups.append(key)
            group_of[name] = groups.index(key)
        stacks = {name: stack.to(device) for name, (_, _, stack) in moe.merged.items()}
        round_to = {name: getattr(torch, d) for name, d in moe.dtypes.items() if d != "float32"}
        avg = cls(_prepare(model, device), _tokenizer(moe_dir), moe.experts, stacks, group_of, groups, round_to,
                  str(moe_dir))
        avg.info = moe.info
        return avg

    @classmethod
    def from_models(cls, models: Sequence[str], granularity: str = "projection", device: Any = "cpu") -> AveragedRM:
        """Model 0's architecture with every tensor averaged over ``models`` (dense RMs, one architecture)."""
        import torch

        from umm_tools.evaluate import load_reward_model

        if len(models) < 2:
            raise UmmError(f"give at least two dense RMs to merge, got {len(models)}")
        base, tokenizer = load_reward_model(models[0], device="cpu", dtype="float32")
        names = {n: tuple(p.shape) for n, p in base.named_parameters()}
        tensors = {n: [p.detach()] for n, p in base.named_parameters()}
        vocab = tokenizer.get_vocab()
        for m in models[1:]:
            rm, tok = load_reward_model(m, device="cpu", dtype="float32")
            if type(rm) is not type(base):
                raise UmmError(f"{m} is a {type(rm).__name__}, {models[0]} a {type(base).__name__}; merged RMs "
                               "must share one architecture.")
            have = {n: tuple(p.shape) for n, p in rm.named_parameters()}
            if have != names:
                diff = sorted(set(have.items()) ^ set(names.items()))
                raise UmmError(f"{m} and {models[0]} differ in tensor {diff[0][0]} (shape or presence; "
                               f"{len(diff)} differences); merged RMs must have identical shapes.")
            if tok.get_vocab() != vocab:
                raise UmmError(f"{m} and {models[0]} have different tokenizers; averaging their embeddings would "
                               "mix unrelated tokens.")
            for n, p in rm.named_parameters():
                tensors[n].append(p.detach())
            del rm
        stacks = {n: torch.stack(ts).to(device) for n, ts in tensors.items()}
        del tensors
        groups: list[tuple[str | None, str]] = []
        group_of: dict[str, int] = {}
        for name in stacks:
            key = _model_group(name, granularity)
            if key not in groups:
                groups.append(key)
            group_of[name] = groups.index(key)
        stored = getattr(base.config, "dtype", None)
        stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
        round_to = {n: stored for n in stacks} if stored in (torch.bfloat16, torch.float16) else {}
        experts = [f"model.{i}" for i in range(len(models))]
        refs = [str(Path(m).absolute()) if Path(m).exists() else str(m) for m in models]
        return cls(_prepare(base, device), tokenizer, experts, stacks, group_of, groups, round_to, refs)

    # --- weights -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.stacks.values())).device

    @property
    def pad_token_id(self) -> int:
        from umm_tools.evaluate import reward_pad_token_id

        return reward_pad_token_id(self.model, self.tokenizer)

    def weights(self) -> torch.Tensor:
        """softmax(logits), float32 (G, K): what the forward pass uses."""
        return self.logits.softmax(dim=-1).float()

    def weight_lists(self) -> list[list[float]]:
        """softmax(logits) in float64, one list per group: what is written (each sums to 1 within 1e-12)."""
        return self.logits.detach().softmax(dim=-1).cpu().tolist()

    def set_weights(self, weights: Sequence[Sequence[float]]) -> None:
        """Logits ``log(w)`` per group (a zero weight stays exactly zero: logit -inf)."""
        import torch

        w = torch.tensor([list(v) for v in weights], dtype=torch.float64)
        with torch.no_grad():
            self.logits.copy_(w.log())

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, by source name (differentiable in the logits)."""
        import torch

        w = self.weights()  # (G, K)
        out = {}
        for name, stack in self.stacks.items():
            t = torch.tensordot(w[self.group_of[name]], stack, dims=1)  # (K,) · (K, ...) -> (...)
            dtype = self.round_to.get(name)
            if dtype is not None:  # what the written checkpoint holds; gradients pass straight through
                t = t + (t.to(dtype).float() - t).detach()
            out[name] = t
        return out

    def to_merge_weights(self, mode: str, meta: Mapping[str, Any] | None = None) -> MergeWeights:
        """The weights as a :class:`MergeWeights` (MoE: ``layers.{l}.{projection}``; several RMs: per layer,
        plus a ``tensors`` entry for every tensor outside the layers)."""
        lists = self.weight_lists()
        layers: dict[str, dict[str, list[float]]] = {}
        tensors: dict[str, list[float]] = {}
        for name, g in self.group_of.items():
            layer, key = self.groups[g]
            if layer is None:
                tensors[name] = lists[g]
            elif isinstance(self.source, str):  # a MoE: one entry per FFN projection
                layers.setdefault(layer, {})[name.split(".")[-2]] = lists[g]
            else:
                layers.setdefault(layer, {})[key] = lists[g]
        mw = MergeWeights(mode=mode, experts=self.experts, layers=layers, tensors=tensors, meta=dict(meta or {}))
        for name, g in self.group_of.items():  # the file gives every tensor exactly the weights used here
            if mw.weights_for(name, allow_default=False) != lists[g]:
                raise RuntimeError(f"internal error: {name} would be looked up with other weights")
        return mw

    # --- scoring -------------------------------------------------------------------------------------------
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (N,) float32 of the averaged dense RM, differentiable in the logits."""
        from torch.func import functional_call

        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                  "use_cache": False}
        logits = functional_call(self.model, self.averaged(), args=(), kwargs=kwargs).logits  # (N, 1)
        return logits[:, 0].float()

    def score_pairs(self, pairs: Any, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards, float32 CPU (N,), of pairs with ``chosen_ids``/``rejected_ids``."""
        import torch

        from umm_tools.data import iter_pair_batches

        chosen, rejected = [], []
        with torch.no_grad():
            for batch in iter_pair_batches(pairs, batch_size, self.pad_token_id):
                c, r = self.rewards(batch["input_ids"], batch["attention_mask"]).cpu().chunk(2)
                chosen.append(c)
                rejected.append(r)
        return torch.cat(chosen), torch.cat(rejected)


def _model_group(name: str, granularity: str) -> tuple[str | None, str]:
    m = _LAYER.match(name)
    if not m:
        return (None, "global")
    rest = m.group(2)
    for p in PROJECTIONS:
        if granularity == "projection" and rest == f"mlp.{p}.weight":
            return (m.group(1), p)
    return (m.group(1), "*")


def _load_all(model: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every parameter and persistent buffer of ``model`` from ``state``; nothing may be left unset."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UmmError(f"{where}: tensors do not match {type(model).__name__} (missing: {missing[:5]}, "
                       f"unexpected: {unexpected[:5]})")


def _prepare(model: Any, device: Any) -> Any:
    model.float().to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # no tokenizer files, or unreadable ones
        logger.debug("%s: no usable tokenizer (%s: %s)", folder, type(e).__name__, e)
        return None


def load_averaged_rm(source: str | os.PathLike | Sequence[str], merge_weights: str | os.PathLike | MergeWeights,
                     device: str = "cpu") -> AveragedRM:
    """The averaged dense RM that learn-merge fitted, rebuilt from its weights file, for scoring.

    ``source`` is the MoE folder (:func:`learn_merge`) or the list of dense RMs (:func:`learn_merge_models`).
    Its rewards are what ``umm collapse`` (or the mergekit YAML) produces from the same weights.
    """
    import torch

    mw = merge_weights if isinstance(merge_weights, MergeWeights) else load_merge_weights(merge_weights)
    if isinstance(source, str | os.PathLike):
        avg = AveragedRM.from_moe(source, "projection", device)
    else:
        avg = AveragedRM.from_models(list(source), "projection", device)
    if mw.experts != avg.experts:
        raise UmmError(f"the weights are over experts {mw.experts}; {source} has {avg.experts}")
    # One group per tensor, holding exactly the weights the file gives it.
    names = list(avg.stacks)
    avg.groups = [(_LAYER.match(n).group(1) if _LAYER.match(n) else None, n) for n in names]
    avg.group_of = {n: i for i, n in enumerate(names)}
    avg.logits = torch.nn.Parameter(torch.zeros(len(names), len(avg.experts), dtype=torch.float64,
                                                device=avg.device))
    avg.set_weights([mw.weights_for(n, allow_default=True) for n in names])
    return avg


# ---------------------------------------------------------------------------------------------------------
# Entry points


def learn_merge(moe_dir: str | os.PathLike, data: str | None, output: str | os.PathLike,
                opts: LearnMergeOptions | None = None) -> Path:
    """Learn merge weights for the umm MoE RM at ``moe_dir``; write them into the folder ``output``.

    ``data`` (preference pairs, as :func:`umm_tools.data.load_preference_data` reads them) is required for
    mode 'learned' and optional otherwise (with it, the merge is scored). ``output`` is a folder that appears
    only when complete, holding merge_weights.json, metrics.json and learn_merge_options.json (module doc).
    Returns ``output``.
    """
    opts = (opts or LearnMergeOptions()).resolved()
    moe_dir, out = Path(moe_dir).absolute(), Path(output).absolute()
    data = None if data is None else str(data)
    _check_request(data, out, opts)
    stats = read_routing_stats(moe_dir) if opts.mode in ("learned", "stats") else None
    acc = _accelerator(opts.device)
    try:
        avg = AveragedRM.from_moe(moe_dir, opts.granularity, acc.device)
        info = avg.info
        init = "uniform"
        if stats is not None:
            if stats.get("num_experts") not in (None, info.num_experts):
                raise UmmError(f"{moe_dir / ROUTING_STATS_FILE}: num_experts is {stats['num_experts']}, the MoE has "
                               f"{info.num_experts}; rerun `umm train`, or use --mode uniform.")
            layers = sorted({int(layer) for layer, _ in avg.groups})
            per_layer = stats_init_weights(
                stats, layers, shared_experts=info.shared_experts, routed_scale=info.routed_scale,
                shared_scale=info.shared_scale, share=opts.routing_share, temperature=opts.init_temperature,
                where=str(moe_dir / ROUTING_STATS_FILE))
            avg.set_weights([per_layer[int(layer)] for layer, _ in avg.groups])
            init = "routing_stats"
        record = {"stage": "learn-merge", "moe_dir": str(moe_dir), "data": data, "init": init}
        return _run(avg, data, out, opts, acc, record, _write_moe)
    finally:
        acc.end_training()


def learn_merge_models(models: Sequence[str], data: str | None, output: str | os.PathLike,
                       opts: LearnMergeOptions | None = None) -> Path:
    """Learn merge weights over several dense RMs of one architecture (WARM with learned weights).

    Initialised uniform; ``opts.mode`` is 'learned' (fit on ``data``) or 'uniform'. ``output`` is a folder
    holding merge_weights.json (experts ``model.0 … model.K-1`` in the order of ``models``), merge.yaml (a
    mergekit config with merge method ``umm_learned``: run it with ``umm mergekit`` /
    :func:`umm_tools.merge_method.run_mergekit_yaml`), metrics.json and learn_merge_options.json.
    """
    opts = (opts or LearnMergeOptions()).resolved()
    if opts.mode == "stats":
        raise UmmError("mode 'stats' needs the routing statistics of a MoE; several dense RMs have none. Use "
                       "--mode learned or --mode uniform.")
    out = Path(output).absolute()
    _check_request(data, out, opts)
    acc = _accelerator(opts.device)
    try:
        avg = AveragedRM.from_models(list(models), opts.granularity, acc.device)
        record = {"stage": "learn-merge", "models": avg.source, "data": data, "init": "uniform"}
        return _run(avg, data, out, opts, acc, record, _write_models)
    finally:
        acc.end_training()


def _check_request(data: str | None, out: Path, opts: LearnMergeOptions) -> None:
    if out.exists() and not opts.overwrite:
        raise UmmError(f"{out} already exists; choose another output folder or pass --overwrite to replace it.")
    if opts.mode == "learned" and not data:
        raise UmmError("mode 'learned' fits the weights on preference pairs: give DATA, or use --mode stats or "
                       "--mode uniform.")


def _accelerator(device: str) -> Any:
    import torch
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise UmmError("device 'cuda' was asked for, but torch sees no CUDA device; use device 'cpu' or 'auto'.")
    # Launched by torchrun without an accelerator, accelerate picks multi-CPU (gloo) DDP only when told
    # cpu=True; otherwise every process would believe it is alone and write OUTPUT.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = device == "cpu" or (world > 1 and not torch.accelerator.is_available())
    return Accelerator(cpu=cpu)


def _run(avg: AveragedRM, data: str | None, out: Path, opts: LearnMergeOptions, acc: Any, record: dict[str, Any],
         write: Any) -> Path:
    import torch

    from umm_tools.utils import atomic_output_dir, set_seed, write_json

    started = time.perf_counter()
    set_seed(opts.seed)
    pd = _load_data(avg, data, opts) if data else None
    eval_ds, eval_on = None, None
    if pd is not None:
        eval_ds, eval_on = (pd.eval, "eval") if pd.eval is not None else (pd.train, "train")
        if eval_on == "train":
            logger.info("no held-out pairs: the merge is measured on the training pairs")
    mode = opts.mode
    before = _measure(avg, eval_ds, opts.batch_size, acc) if eval_ds is not None else None
    curve: list[float] = []
    if mode == "learned" and opts.steps > 0:
        curve = _fit(avg, pd.train, opts, acc)
        after = _measure(avg, eval_ds, opts.batch_size, acc)
    else:
        after = before
    meta = {
        "source": avg.source, "init": record["init"], "granularity": opts.granularity,
        "routing_share": opts.routing_share if record["init"] == "routing_stats" else None,
        "init_temperature": opts.init_temperature if record["init"] == "routing_stats" else None,
        "steps": len(curve), "data": data, "eval_loss_before": before and before["loss"],
        "eval_loss_after": after and after["loss"],
    }
    mw = avg.to_merge_weights(mode, meta)
    metrics = {
        "mode": mode, "init": record["init"], "granularity": opts.granularity, "steps": len(curve),
        "experts": avg.experts, "num_processes": acc.num_processes, "eval_on": eval_on,
        "before": before, "after": after, "train_loss": curve,
        "layers": _summary(avg, mw),
        "data": pd.stats if pd is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if acc.is_main_process:
        import accelerate
        import transformers

        from umm_tools import __version__

        with atomic_output_dir(out, overwrite=opts.overwrite) as tmp:
            write(avg, mw, tmp, out)
            write_json(tmp / METRICS_FILE, metrics)
            write_json(tmp / OPTIONS_FILE, {
                **record, "options": opts.model_dump(mode="json"), "num_processes": acc.num_processes,
                "umm_version": __version__, "versions": {
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "accelerate": accelerate.__version__},
            })
        if before is not None:
            logger.info("merge %s -> %s: BT loss %.4f -> %.4f, accuracy %.4f -> %.4f on %d %s pairs", mode, out,
                        before["loss"], after["loss"], before["accuracy"], after["accuracy"], after["n_pairs"],
                        eval_on)
        else:
            logger.info("merge weights (%s) written to %s", mode, out)
    acc.wait_for_everyone()
    return out


def _write_moe(avg: AveragedRM, mw: MergeWeights, tmp: Path, out: Path) -> None:
    mw.save(tmp / WEIGHTS_FILE)


def _write_models(avg: AveragedRM, mw: MergeWeights, tmp: Path, out: Path) -> None:
    from umm_tools.merge_method import write_mergekit_yaml

    yaml_path = write_mergekit_yaml(avg.source, mw.layers, tmp / MERGEKIT_YAML, weights_path=tmp / WEIGHTS_FILE,
                                    default=None, tensors=mw.tensors, mode=mw.mode, meta=mw.meta)
    # The YAML names the weights file by absolute path: point it at where the folder will be.
    yaml_path.write_text(yaml_path.read_text(encoding="utf-8").replace(str(tmp), str(out)), encoding="utf-8")


def _summary(avg: AveragedRM, mw: MergeWeights) -> dict[str, Any]:
    """Per layer and key: shared/routed totals and the heaviest expert; plus the global vector, if any."""
    summary: dict[str, Any] = dict(mw.summary())
    if mw.tensors:
        w = next(iter(mw.tensors.values()))
        top = max(range(len(w)), key=w.__getitem__)
        summary["global"] = {"top": mw.experts[top], "top_weight": round(w[top], 6)}
    return summary


def _load_data(avg: AveragedRM, data: str, opts: LearnMergeOptions) -> Any:
    from umm_tools.data import DataOptions, load_preference_data

    if avg.tokenizer is None:
        raise UmmError(f"{avg.source}: no tokenizer files to tokenise {data} with; copy the source's tokenizer "
                       "into the folder.")
    positions = getattr(avg.model.config.get_text_config(), "max_position_embeddings", None)
    max_length = opts.max_length
    if positions and (max_length is None or max_length > positions):
        logger.info("max_length limited to the model's %d positions", positions)
        max_length = positions
    fields = {k: v for k, v in opts.model_dump().items() if k in DataOptions.model_fields}
    fields["max_length"] = max_length
    return load_preference_data(data, avg.tokenizer, DataOptions(**fields))


def _local_batches(chosen: list, rejected: list, indices: Sequence[int], batch_size: int, pad: int):
    from umm_tools.data import collate_pairs

    for i in range(0, len(indices), batch_size):
        part = indices[i:i + batch_size]
        yield collate_pairs([chosen[j] for j in part], [rejected[j] for j in part], pad)


def _measure(avg: AveragedRM, ds: Any, batch_size: int, acc: Any) -> dict[str, Any]:
    """BT loss and accuracy (ties count half) of the averaged RM on ``ds``, each process scoring a share."""
    import torch
    import torch.nn.functional as F

    from umm_tools.evaluate import wilson_interval

    chosen, rejected = ds["chosen_ids"], ds["rejected_ids"]
    n = len(chosen)
    sums = torch.zeros(5, dtype=torch.float64, device=acc.device)  # loss, wins, ties, margin, pairs
    mine = list(range(acc.process_index, n, acc.num_processes))
    with torch.no_grad():
        for batch in _local_batches(chosen, rejected, mine, batch_size, avg.pad_token_id):
            c, r = avg.rewards(batch["input_ids"], batch["attention_mask"]).double().chunk(2)
            sums += torch.stack([F.softplus(r - c).sum(), (c > r).sum(), (c == r).sum(), (c - r).sum(),
                                 torch.tensor(float(len(c)), device=c.device, dtype=c.dtype)])
    if acc.num_processes > 1:
        sums = acc.reduce(sums, reduction="sum")
    loss, wins, ties, margin, count = sums.tolist()
    correct = wins + 0.5 * ties
    lo, hi = wilson_interval(correct, int(count))
    return {"n_pairs": int(count), "loss": loss / count, "accuracy": correct / count, "ci95": [lo, hi],
            "wins": int(wins), "ties": int(ties), "losses": int(count - wins - ties), "mean_margin": margin / count}


def _fit(avg: AveragedRM, train: Any, opts: LearnMergeOptions, acc: Any) -> list[float]:
    """Adam on the logits; returns the BT loss of every step's batch (averaged over all processes)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from umm_tools.utils import progress

    chosen, rejected = train["chosen_ids"], train["rejected_ids"]
    n, world, rank = len(chosen), acc.num_processes, acc.process_index
    per_step = min(opts.batch_size, n)
    if per_step < world:
        raise UmmError(f"batch_size {opts.batch_size} (with {n} training pairs) is smaller than the {world} "
                       "processes; every process needs at least one pair per step.")
    pad = avg.pad_token_id
    init = avg.logits.detach().clone()
    optimizer = torch.optim.Adam([avg.logits], lr=opts.learning_rate)
    rng = np.random.default_rng(opts.seed)  # the same order on every process
    order: list[int] = []
    curve: list[float] = []
    bar = progress(range(opts.steps), desc="learn-merge", unit="step", disable=not acc.is_main_process)
    for _ in bar:
        while len(order) < per_step:
            order += rng.permutation(n).tolist()
        step, order = order[:per_step], order[per_step:]
        mine = step[rank::world]
        optimizer.zero_grad(set_to_none=True)
        batch = next(_local_batches(chosen, rejected, mine, len(mine), pad))
        c, r = avg.rewards(batch["input_ids"], batch["attention_mask"]).chunk(2)
        loss_sum = F.softplus(r - c).sum()  # -log σ(c - r), summed over this process's pairs
        (loss_sum / per_step).backward()
        total = loss_sum.detach()
        if world > 1:  # every process takes the same step
            avg.logits.grad = acc.reduce(avg.logits.grad, reduction="sum")
            total = acc.reduce(total, reduction="sum")
        if opts.init_pull > 0:
            (opts.init_pull * (avg.logits - init).pow(2).sum()).backward()
        optimizer.step()
        curve.append(total.item() / per_step)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
    return curve
