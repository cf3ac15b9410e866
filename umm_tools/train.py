"""``umm train``: train a reward model on preference pairs; for a MoE RM, with the router losses and routing statistics.

MODEL is either the Qwen2-MoE RM written by ``umm upcycle`` or any dense sequence-classification RM (or a
dense ``…ForCausalLM``, which gets a new one-output ``score`` head, seeded). Training is trl's
:class:`~trl.RewardTrainer` (Bradley–Terry loss ``-log σ(r_chosen - r_rejected)``) subclassed as
:class:`UmmRewardTrainer`, which, when the model has MoE layers, adds

* the router **load-balancing loss** (Switch Transformer): for every MoE layer ``l``, with ``P_{l,i}`` the mean
  softmax routing probability of expert ``i`` and ``f_{l,i}`` its share of the top-k selections, both over the
  batch's real tokens (padding excluded), ``aux = mean_l E · Σ_i f_{l,i} · P_{l,i}``; 1.0 when routing is uniform.
  Loss ``+= router_aux_coef · aux``. (transformers' own ``load_balancing_loss_func`` pools the layers before the
  product and lets ``f`` sum to k; umm balances each layer on its own, as each layer's experts are merged on
  their own.)
* the optional router **z-loss** (ST-MoE): ``z = mean_l mean_tokens logsumexp(router logits)²``, ``+= router_z_coef · z``.

Router logits are captured by forward hooks on every layer's ``mlp.gate`` (and ``mlp.shared_expert_gate``) while
the loss is computed, so the losses are part of the autograd graph and reach the routers' gradients. Logged
metrics: ``loss`` (total), ``bt_loss``, ``router_aux_loss``, ``router_z_loss`` and trl's ``accuracy``,
``margin``, rewards; in evaluation ``eval_accuracy`` (ties count half) and ``eval_margin`` are exact over all
evaluation pairs.

**Routing statistics** (``routing_stats.json``, read by learn-merge; fixed format ``umm-routing-stats/1``)::

    {"format": "umm-routing-stats/1", "num_experts": E, "top_k": k, "tokens": N,
     "layers": {"0": {"tokens": N, "routed_prob_share": [E], "routed_topk_share": [E], "shared_gate_mean": g}, ...}}

gathered over every training token the optimiser saw (padding excluded; evaluation not counted), summed on
every process and all-reduced at the end; they are saved with each checkpoint, so a resumed run counts the
whole training. ``routed_prob_share``: each expert's share of the softmax probability mass; ``routed_topk_share``:
its share of the top-k selections; ``shared_gate_mean``: mean of ``σ(shared_expert_gate(x))``.

**Frozen parameters.** A parameter the collapse cannot carry back into the source architecture
(``config.json``'s ``umm.source_model_type``) is frozen: for Llama/Mistral sources every bias (the upcycle writes
``qkv_bias=false``, so normally there is none: that is checked and logged); for Qwen2 every bias but q/k/v's.

**LoRA** (``lora=true``, peft): LoRA on attention (q/k/v/o_proj), the shared expert's projections and the
routed experts. transformers 5 stores a layer's routed experts as two fused 3D parameters
(``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I)) that peft's ``Linear`` LoRA cannot
wrap; peft (0.21 here) adapts them through ``target_parameters`` (one rank-r update per expert). peft cannot apply
dropout there, so ``lora_dropout`` must stay 0 while they are targets. The router (``mlp.gate``), the shared-expert
gate (``mlp.shared_expert_gate``) and the ``score`` head are trained in full (``modules_to_save``). The adapter is
saved in ``adapter/`` and merged into the weights of the model folder.

**Output folder** (written in place; a ``.incomplete`` marker is created first and removed last, so a crashed run
never looks finished; ``resume`` continues it from ``checkpoints/checkpoint-N``)::

    config.json (with its "umm" key), model*.safetensors, tokenizer files, umm_upcycle.json (copied if present)
    metrics.json          loss curve, eval curve, final eval (accuracy, loss, mean margin), expert load, data stats
    routing_stats.json    MoE only
    train_options.json    resolved options and provenance
    adapter/              LoRA only

The final files are written to a hidden folder first and moved into place; ``checkpoints/`` is deleted at the
end unless ``keep_checkpoints``. transformers also saves a checkpoint at the last step, so a run that crashes
while its final folder is written resumes with nothing left to train. Resuming loads the checkpoint's weights
through ``from_pretrained`` (see :meth:`UmmRewardTrainer._load_from_checkpoint`).

**Multi-process**: run under ``accelerate launch`` (GPUs; DeepSpeed or FSDP through an accelerate config, see
docs/distributed.md) or ``python -m torch.distributed.run --nproc_per_node N`` on CPUs (gloo). MoE models use
DDP with ``find_unused_parameters=True``; only the main process writes files; the process group is destroyed when
:func:`train` returns.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from umm_tools.data import DataOptions
from umm_tools.errors import UmmError
from umm_tools.utils import is_quiet, read_json, write_json

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ROUTING_STATS_FORMAT = "umm-routing-stats/1"
ROUTING_STATS_FILE = "routing_stats.json"
METRICS_FILE = "metrics.json"
OPTIONS_FILE = "train_options.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
INCOMPLETE = ".incomplete"
UPCYCLE_FILE = "umm_upcycle.json"
# Saved in each checkpoint folder: the routing statistics summed over all processes up to that step.
ROUTING_STATE_FILE = "umm_routing_state.json"

# Default eval hold-out when no evaluation data is named.
DEFAULT_EVAL_FRACTION = 0.05

LORA_TARGETS_MOE = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
    "experts.gate_up_proj", "experts.down_proj",
)
LORA_TARGETS_DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_FULL_MOE = ("mlp.gate", "mlp.shared_expert_gate", "score")
LORA_FULL_DENSE = ("score",)

_QKV_BIAS = re.compile(r"self_attn\.[qkv]_proj\.bias$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class TrainOptions(DataOptions):
    """Options of ``umm train``: how the pairs are read (every :class:`~umm_tools.data.DataOptions` field, flat:
    ``max_length``, column names, ``eval_data``, ``eval_fraction``, ``bad_row_threshold``, ...) plus training."""

    # --- schedule ------------------------------------------------------------------------------------------
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (fractions allowed); max_steps wins.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train for; overrides epochs when set."
    )
    learning_rate: float = Field(
        1e-5, gt=0, description="Peak learning rate (AdamW). Full fine-tuning: ~1e-5; LoRA usually wants ~1e-4."
    )
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = Field("linear", description="Learning-rate schedule after the warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables clipping).")
    batch_size: int = Field(8, ge=1, description="Pairs per device per step (each pair is 2 sequences).")
    eval_batch_size: int | None = Field(None, ge=1, description="Pairs per device per evaluation step (default: batch_size).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; the effective batch is batch_size × this × processes."
    )
    seed: int = Field(0, description="Seed of the data order, a new score head, LoRA and the eval_fraction hold-out.")
    eval_fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description=f"Share of the pairs held out for evaluation; unset: {DEFAULT_EVAL_FRACTION} unless eval_data or "
        "eval_split is given; 0 for no evaluation.",
    )

    # --- precision, memory, speed --------------------------------------------------------------------------
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Mixed precision of the compute (weights stay float32 while training). bf16 needs a GPU that "
        "supports it (or a CPU, slowly); fp16 needs a CUDA GPU.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, one more forward pass of compute."
    )
    experts_implementation: Literal["auto", "eager", "batched_mm", "grouped_mm"] = Field(
        "auto",
        description="How transformers runs the routed experts of a MoE: 'auto' is transformers' choice "
        "(grouped_mm where torch has it, else eager: a loop over experts). On CPU the two were within 5% of "
        "each other (benchmarks/train.py); batched_mm materialises a weight matrix per token and expert.",
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved weights; 'auto' keeps MODEL's dtype (float32 if it records none)."
    )

    # --- evaluation, checkpoints, logging ------------------------------------------------------------------
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps; unset: at the end of every epoch (and always at the end)."
    )
    eval_on_start: bool = Field(True, description="Evaluate once before the first step (a baseline in metrics.json).")
    save_steps: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept in OUTPUT_DIR/checkpoints (oldest deleted).")
    keep_checkpoints: bool = Field(False, description="Keep OUTPUT_DIR/checkpoints after a successful run.")
    logging_steps: int = Field(10, ge=1, description="Log the losses every N steps (they form the loss curve).")
    report_to: str = Field(
        "none", description="Experiment trackers, comma-separated (e.g. 'tensorboard,wandb'); 'none' for none."
    )

    # --- MoE losses ----------------------------------------------------------------------------------------
    router_aux_coef: float = Field(
        0.01,
        ge=0,
        description="Weight of the router load-balancing loss (per layer E·Σ f_i·P_i, 1.0 when balanced; MoE only).",
    )
    router_z_coef: float = Field(
        0.0, ge=0, description="Weight of the router z-loss (mean squared logsumexp of router logits; MoE only)."
    )
    center_rewards_coef: float | None = Field(
        None, ge=0, description="Weight of trl's reward-centring term mean((r_chosen + r_rejected)²); unset: off."
    )

    # --- LoRA ----------------------------------------------------------------------------------------------
    lora: bool = Field(
        False,
        description="Train LoRA adapters instead of all weights. MoE: LoRA on attention, the shared expert and the "
        "routed experts (peft target_parameters on the fused experts.gate_up_proj / experts.down_proj); the "
        "router, the shared-expert gate and the score head train in full. Dense: LoRA on attention and FFN, "
        "score head in full. The merged weights are saved; the adapter goes to OUTPUT_DIR/adapter.",
    )
    lora_rank: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input; must be 0 while the routed experts are targets (peft cannot apply "
        "it to a fused expert parameter).",
    )
    lora_targets: list[str] | None = Field(
        None,
        description="Module names (e.g. q_proj, shared_expert.up_proj) or fused expert parameter names "
        "(experts.gate_up_proj, experts.down_proj) that get LoRA; unset: "
        f"MoE {', '.join(LORA_TARGETS_MOE)}; dense {', '.join(LORA_TARGETS_DENSE)}.",
    )

    # --- output folder -------------------------------------------------------------------------------------
    resume: bool = Field(
        False,
        description="Continue the unfinished run in OUTPUT_DIR from its last checkpoint (a finished run is left "
        "as it is).",
    )
    resume_from: str | None = Field(
        None, description="Continue from this checkpoint folder (checkpoints/checkpoint-N); implies resume."
    )
    overwrite: bool = Field(False, description="Delete OUTPUT_DIR (finished or not) and train from scratch.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub MODEL.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> TrainOptions:  # replaces DataOptions' rule: eval_fraction may be unset
        if self.eval_fraction and (self.eval_data or self.eval_split):
            raise ValueError("give eval_fraction or eval_data/eval_split, not both")
        if (self.resume or self.resume_from) and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume keeps OUTPUT_DIR, overwrite replaces it")
        return self

    def data_options(self) -> DataOptions:
        """The :class:`DataOptions` part, with ``eval_fraction`` resolved."""
        values = {name: getattr(self, name) for name in DataOptions.model_fields}
        if values["eval_fraction"] is None:
            values["eval_fraction"] = 0.0 if (self.eval_data or self.eval_split) else DEFAULT_EVAL_FRACTION
        return DataOptions(**values)


# ---------------------------------------------------------------------------------------------------------
# Router losses and routing statistics


def router_losses(
    router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aux, z)`` averaged over layers; each layer's logits are (N, E) over the flattened batch.

    ``mask`` (N,) marks real tokens (1) and padding (0); None counts every row. ``aux`` is
    ``E · Σ_i f_i · P_i`` with ``P_i`` the mean routing probability of expert i and ``f_i`` its share of the
    top-k selections (no gradient through ``f``, as in the Switch Transformer), both over real tokens: 1.0 for
    uniform routing, up to E when one expert takes everything. ``z`` is the mean of ``logsumexp(logits)²``.
    """
    import torch

    aux_terms, z_terms = [], []
    for logits in router_logits:
        logits = logits.float()
        n_rows, n_experts = logits.shape
        m = torch.ones(n_rows, device=logits.device) if mask is None else mask.reshape(-1).to(logits.device).float()
        n = m.sum().clamp_min(1.0)
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        prob_mean = (probs * m[:, None]).sum(0) / n  # (E,)
        with torch.no_grad():
            chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
            counts = torch.zeros(n_experts, device=logits.device).scatter_add_(
                0, chosen.reshape(-1), m.repeat_interleave(top_k)
            )
            frac = counts / (n * top_k)  # (E,), sums to 1
        aux_terms.append(n_experts * (frac * prob_mean).sum())
        z_terms.append((torch.logsumexp(logits, dim=-1).square() * m).sum() / n)
    if not aux_terms:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack(aux_terms).mean(), torch.stack(z_terms).mean()


class MoeHooks:
    """Forward hooks on every MoE layer's router (``mlp.gate``) and shared-expert gate (``mlp.shared_expert_gate``).

    Outputs are kept only inside :meth:`capture`, so a recomputation in the backward pass (gradient
    checkpointing) or a forward outside the loss is never recorded.
    """

    def __init__(self, model: Any, blocks: list[tuple[int, Any]], num_experts: int, top_k: int):
        self.layers = [layer for layer, _ in blocks]
        self.num_experts, self.top_k = num_experts, top_k
        self.active = False
        self.logits: dict[int, torch.Tensor] = {}
        self.shared: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer, block in blocks:
            self._handles.append(block.gate.register_forward_hook(self._router_hook(layer)))
            if getattr(block, "shared_expert_gate", None) is not None:
                self._handles.append(block.shared_expert_gate.register_forward_hook(self._shared_hook(layer)))

    @classmethod
    def attach(cls, model: Any) -> MoeHooks | None:
        """Hooks on ``model`` (plain, peft-wrapped or DDP-wrapped), or None when it has no MoE layer."""
        blocks: list[tuple[int, Any]] = []
        for name, module in model.named_modules():
            if type(module).__name__.endswith("SparseMoeBlock") and hasattr(module, "gate"):
                m = _LAYER.search(name + ".")
                blocks.append((int(m.group(1)) if m else len(blocks), module))
        if not blocks:
            return None
        config = model.config
        num_experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))
        top_k = int(getattr(config, "num_experts_per_tok", 0))
        if not num_experts or not top_k:
            raise UmmError("the model has MoE layers but its config names no num_experts / num_experts_per_tok.")
        blocks.sort(key=lambda b: b[0])
        return cls(model, blocks, num_experts, top_k)

    def _router_hook(self, layer: int):
        def fn(_module, _args, output):
            if self.active:
                self.logits[layer] = output[0] if isinstance(output, tuple) else output  # (N, E)

        return fn

    def _shared_hook(self, layer: int):
        def fn(_module, _args, output):
            if self.active:
                self.shared[layer] = output  # (N, 1) logits of the shared-expert gate

        return fn

    @contextlib.contextmanager
    def capture(self) -> Iterator[MoeHooks]:
        self.logits, self.shared = {}, {}
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> tuple[list[torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(router logits in layer order, {layer: logits}, {layer: shared-gate logits}); forgets them."""
        logits, shared = self.logits, self.shared
        self.logits, self.shared = {}, {}
        missing = [layer for layer in self.layers if layer not in logits]
        if missing:
            raise RuntimeError(f"no router logits were captured for MoE layer(s) {missing}")
        return [logits[layer] for layer in self.layers], logits, shared

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class RoutingStats:
    """Running sums over training tokens (padding excluded) of every MoE layer's routing; see the module docstring."""

    def __init__(self, layers: Sequence[int], num_experts: int, top_k: int, device: Any = "cpu"):
        import torch

        self.layers, self.num_experts, self.top_k = list(layers), num_experts, top_k
        n = len(self.layers)
        kw = dict(dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(n, num_experts, **kw)  # (L, E) Σ softmax probabilities
        self.topk_sum = torch.zeros(n, num_experts, **kw)  # (L, E) top-k selection counts
        self.shared_sum = torch.zeros(n, **kw)  # (L,) Σ σ(shared gate)
        self.tokens = torch.zeros(n, **kw)  # (L,) tokens seen

    def update(self, logits: dict[int, torch.Tensor], shared: dict[int, torch.Tensor], mask: torch.Tensor | None):
        import torch

        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                lg = logits[layer].detach().float()  # (N, E)
                m = _row_mask(mask, lg.shape[0], lg.device)  # (N,)
                probs = torch.softmax(lg, dim=-1)
                self.prob_sum[i] += (probs * m[:, None]).sum(0).to(self.prob_sum)
                chosen = probs.topk(self.top_k, dim=-1).indices  # (N, k)
                counts = torch.zeros(self.num_experts, device=lg.device).scatter_add_(
                    0, chosen.reshape(-1), m.repeat_interleave(self.top_k)
                )
                self.topk_sum[i] += counts.to(self.topk_sum)
                self.tokens[i] += m.sum().to(self.tokens)
                if layer in shared:
                    gate = torch.sigmoid(shared[layer].detach().float().reshape(-1))  # (N,)
                    self.shared_sum[i] += (gate * m).sum().to(self.shared_sum)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.prob_sum, self.topk_sum, self.shared_sum, self.tokens]

    def reduced(self, accelerator: Any) -> RoutingStats:
        """The sums over every process (a collective: call it on all of them)."""
        out = RoutingStats(self.layers, self.num_experts, self.top_k, self.prob_sum.device)
        for dst, src in zip(out._tensors(), self._tensors(), strict=True):
            dst.copy_(accelerator.reduce(src.clone(), reduction="sum") if accelerator.num_processes > 1 else src)
        return out

    def state(self) -> dict[str, Any]:
        """Raw sums, JSON-able, for a checkpoint."""
        return {"layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "prob_sum": self.prob_sum.tolist(), "topk_sum": self.topk_sum.tolist(),
                "shared_sum": self.shared_sum.tolist(), "tokens": self.tokens.tolist()}

    def load_state(self, state: dict[str, Any]) -> None:
        import torch

        if (state.get("layers"), state.get("num_experts"), state.get("top_k")) != (
            self.layers, self.num_experts, self.top_k
        ):
            raise UmmError("the checkpoint's routing statistics are of another model (layers or experts differ).")
        for name in ("prob_sum", "topk_sum", "shared_sum", "tokens"):
            getattr(self, name).copy_(torch.tensor(state[name], dtype=torch.float64))

    def to_json(self) -> dict[str, Any]:
        """The ``umm-routing-stats/1`` document."""
        layers = {}
        for i, layer in enumerate(self.layers):
            n = float(self.tokens[i])
            layers[str(layer)] = {
                "tokens": int(round(n)),
                "routed_prob_share": _shares(self.prob_sum[i]),
                "routed_topk_share": _shares(self.topk_sum[i]),
                "shared_gate_mean": float(self.shared_sum[i]) / n if n else 0.5,
            }
        total = int(round(float(self.tokens[0]))) if len(self.layers) else 0
        return {"format": ROUTING_STATS_FORMAT, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": total, "layers": layers}


def _shares(row: torch.Tensor) -> list[float]:
    total = float(row.sum())
    if total <= 0:
        return [1.0 / row.numel()] * row.numel()
    return [float(x) / total for x in row]


def _row_mask(mask: torch.Tensor | None, n_rows: int, device: Any) -> torch.Tensor:
    """The attention mask flattened to the router's rows (B·T,), float; all ones when it does not fit."""
    import torch

    if mask is None or mask.numel() != n_rows:
        return torch.ones(n_rows, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# The trainer


@functools.cache
def trainer_class() -> type:
    """:class:`UmmRewardTrainer`, defined on first use so that importing this module does not import trl."""
    import torch
    from trl import RewardTrainer

    class UmmRewardTrainer(RewardTrainer):
        """trl's ``RewardTrainer`` plus, for MoE models, the router load-balancing and z losses, exact evaluation
        accuracy, and routing statistics saved with every checkpoint.

        Extra keyword arguments: ``router_aux_coef`` (default 0.01) and ``router_z_coef`` (default 0).
        """

        def __init__(self, *args: Any, router_aux_coef: float = 0.01, router_z_coef: float = 0.0, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.router_aux_coef, self.router_z_coef = router_aux_coef, router_z_coef
            self.moe = MoeHooks.attach(self.model)
            self.routing = (
                RoutingStats(self.moe.layers, self.moe.num_experts, self.moe.top_k, self.args.device)
                if self.moe is not None else None
            )
            self._eval_margins: list[torch.Tensor] = []

        def _send_telemetry(self) -> None:
            """No usage pings: umm works offline and reports nothing it was not asked to."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            training = self.model.training
            mask = inputs.get("attention_mask")
            if self.moe is None:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
                self._after_loss(training, outputs, {"bt_loss": loss.detach()})
                return (loss, outputs) if return_outputs else loss
            with self.moe.capture():
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
            logits, by_layer, shared = self.moe.take()
            aux, z = router_losses(logits, mask, self.moe.top_k)
            if training:
                self.routing.update(by_layer, shared, mask)
            logged = {"bt_loss": loss.detach(), "router_aux_loss": aux.detach(), "router_z_loss": z.detach()}
            if self.router_aux_coef:
                loss = loss + self.router_aux_coef * aux.to(loss.dtype)
            if self.router_z_coef:
                loss = loss + self.router_z_coef * z.to(loss.dtype)
            self._after_loss(training, outputs, logged)
            return (loss, outputs) if return_outputs else loss

        def _after_loss(self, training: bool, outputs: Any, logged: dict[str, torch.Tensor]) -> None:
            mode = "train" if training else "eval"
            for key, value in logged.items():  # batch means: averaged over processes
                self._metrics[mode][key].append(self.accelerator.gather(value.reshape(1)).mean().item())
            if not training:
                with torch.no_grad():
                    chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
                    self._eval_margins.append(self.accelerator.gather_for_metrics(chosen - rejected).cpu())

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if not self.model.training and self._eval_margins:
                # Exact over all pairs (trl averages per-batch accuracies); a tie counts half, as in umm eval.
                margins = torch.cat(self._eval_margins)
                self._eval_margins = []
                wins, ties = int((margins > 0).sum()), int((margins == 0).sum())
                self._metrics["eval"]["accuracy"] = [(wins + 0.5 * ties) / margins.numel()]
                self._metrics["eval"]["margin"] = [margins.mean().item()]
                self._metrics["eval"]["pairs"] = [float(margins.numel())]
            super().log(logs, start_time)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """Load a checkpoint's weights through ``from_pretrained``.

            transformers' Trainer reads them with a bare ``load_state_dict``, without the key conversion
            ``from_pretrained`` applies: a Qwen2-MoE's routed experts are saved one tensor per expert but live in
            memory as fused 3D parameters, so they would silently keep their initial values on resume.
            DeepSpeed, FSDP and peft checkpoints keep transformers' own path.
            """
            from accelerate.utils import is_peft_model

            model = self.model if model is None else model
            folder = Path(resume_from_checkpoint)
            saved = any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
            if not saved or self.is_deepspeed_enabled or self.is_fsdp_enabled or is_peft_model(model):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            dtype = next(model.parameters()).dtype
            loaded = type(model).from_pretrained(str(folder), dtype=dtype)
            try:
                model.load_state_dict(loaded.state_dict(), strict=True)
            except RuntimeError as e:
                raise UmmError(f"{folder} does not hold this model's weights ({e}); resume from a checkpoint of "
                               "this run or pass --overwrite.") from e
            del loaded

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.routing is None:
                return
            totals = self.routing.reduced(self.accelerator)  # collective: every process saves
            if self.is_world_process_zero():
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                write_json(folder / ROUTING_STATE_FILE, totals.state())

    return UmmRewardTrainer


def __getattr__(name: str) -> Any:
    if name == "UmmRewardTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Entry point


def train(
    model: str, data: str, output_dir: str | os.PathLike, opts: TrainOptions | None = None, *,
    callbacks: Sequence[Any] | None = None,
) -> Path:
    """Train the reward model MODEL (folder or Hub id; a ``umm upcycle`` MoE RM or a dense RM) on the preference
    pairs DATA (file, folder or Hub dataset) and write the trained RM and its reports to OUTPUT_DIR.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects. Returns OUTPUT_DIR. Raises
    :class:`UmmError` for anything the user can fix; see the module docstring for what is written.
    """
    import torch

    opts = opts or TrainOptions()
    out = Path(output_dir).absolute()
    if int(os.environ.get("RANK", "0")) > 0:  # one process reports; the others only warn
        logging.getLogger("umm_tools").setLevel(logging.WARNING)
    mode, checkpoint = _prepare_output(out, opts)
    if mode == "done":
        logger.info("%s holds a finished run; nothing to do (pass --overwrite to train again)", out)
        return out
    try:
        return _Run(model, data, out, opts, mode, checkpoint, list(callbacks or [])).run()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _prepare_output(out: Path, opts: TrainOptions) -> tuple[str, Path | None]:
    """Decide from what is on disk how to start: 'fresh' | 'resume' | 'done' (and the checkpoint). Reads only."""
    explicit = Path(opts.resume_from).absolute() if opts.resume_from else None
    if explicit is not None and not (explicit / "trainer_state.json").is_file():
        found = sorted(p.name for p in explicit.iterdir()) if explicit.is_dir() else []
        raise UmmError(f"resume_from {explicit} is not a training checkpoint (no trainer_state.json; found: "
                       f"{', '.join(found) or 'nothing'}); give a folder OUTPUT_DIR/{CHECKPOINTS}/checkpoint-N.")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return ("resume", explicit) if explicit else ("fresh", None)
    if not out.is_dir():
        raise UmmError(f"{out} exists and is not a folder; choose another output folder.")
    if opts.overwrite:
        return "fresh", None
    unfinished = (out / INCOMPLETE).exists()
    if opts.resume or explicit:
        if unfinished:
            if explicit:
                return "resume", explicit
            last = last_checkpoint(out / CHECKPOINTS)
            if last is not None:
                return "resume", last
            logger.warning("%s holds an unfinished run without a checkpoint; starting it again", out)
            return "fresh", None
        if (out / METRICS_FILE).is_file():
            return "done", None
        raise UmmError(f"{out} is not a umm train output folder (no {INCOMPLETE} marker nor {METRICS_FILE}); "
                       "choose another output folder or pass --overwrite.")
    if unfinished:
        raise UmmError(f"{out} holds an unfinished training run; pass --resume to continue it from its last "
                       "checkpoint, or --overwrite to start again.")
    raise UmmError(f"{out} already exists; choose another output folder or pass --overwrite to replace it.")


def last_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-N`` with the largest N that holds a ``trainer_state.json`` (a complete save), or None."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class _Run:
    def __init__(self, model: str, data: str, out: Path, opts: TrainOptions, mode: str, checkpoint: Path | None,
                 callbacks: list[Any]):
        self.model_src, self.data_src, self.out, self.opts = model, data, out, opts
        self.mode, self.checkpoint, self.callbacks = mode, checkpoint, callbacks

    def run(self) -> Path:
        import torch
        from transformers import AutoTokenizer

        from umm_tools.data import load_preference_data
        from umm_tools.hub import resolve_model

        opts = self.opts
        started = time.perf_counter()
        # Everything cheap is checked before a weight is read or OUTPUT_DIR is touched.
        folder = resolve_model(self.model_src, opts.revision)
        self.folder = folder
        for what, path in (("MODEL", folder), ("DATA", Path(self.data_src).expanduser())):
            inside = path.absolute()
            if path.exists() and (inside == self.out or self.out in inside.parents):
                raise UmmError(f"OUTPUT_DIR {self.out} holds {what} ({path}); training writes (and with --overwrite "
                               "deletes) OUTPUT_DIR. Choose another output folder.")
        cfg = _read_model_config(folder, self.model_src)
        self.umm_meta = cfg.get("umm") if isinstance(cfg.get("umm"), dict) else None
        if not torch.accelerator.is_available() and opts.precision == "fp16":
            raise UmmError("precision fp16 needs a CUDA GPU; use precision fp32 (or bf16) on the CPU.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise UmmError(f"could not load the tokenizer of {self.model_src}: {type(e).__name__}: {e}; the model "
                           "folder needs its tokenizer files.") from e
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UmmError(f"{self.model_src}: the tokenizer has neither a pad nor an EOS token; add a pad token.")
            tokenizer.pad_token = tokenizer.eos_token
        data_opts = opts.data_options()
        positions = cfg.get("max_position_embeddings")
        if positions and (data_opts.max_length is None or data_opts.max_length > positions):
            logger.info("max_length limited to the model's %d positions", positions)
            data_opts = data_opts.model_copy(update={"max_length": int(positions)})
        self.data_opts = data_opts
        self.data = load_preference_data(self.data_src, tokenizer, data_opts)

        trainer = self._make_trainer(cfg, tokenizer)
        acc = trainer.accelerator
        self.main = acc.is_main_process
        acc.wait_for_everyone()  # every process has read OUTPUT_DIR before the main one changes it
        if self.main:
            if self.mode == "fresh" and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / INCOMPLETE).touch()
            write_json(self.out / OPTIONS_FILE, self._options_record(acc))
        acc.wait_for_everyone()

        resume_from = None
        if self.mode == "resume":
            resume_from = str(self.checkpoint)
            logger.info("resuming from %s", self.checkpoint)
            self._load_routing_state(trainer)
        trainer.train(resume_from_checkpoint=resume_from)

        final_eval = None
        if trainer.eval_dataset is not None:
            last = [h for h in trainer.state.log_history if "eval_loss" in h]
            if last and last[-1].get("step") == trainer.state.global_step:
                final_eval = last[-1]
            else:
                final_eval = trainer.evaluate()
        routing = trainer.routing.reduced(acc) if trainer.routing is not None else None
        # Collective under DeepSpeed ZeRO-3 / FSDP (model_wrapped is the engine or the sharded module there).
        state_dict = None if opts.lora else acc.get_state_dict(trainer.model_wrapped)
        if self.main:
            self._finish(trainer, state_dict, routing, final_eval, time.perf_counter() - started)
        acc.wait_for_everyone()
        return self.out

    # --- model and trainer ---------------------------------------------------------------------------------

    def _make_trainer(self, cfg: dict[str, Any], tokenizer: Any) -> Any:
        import torch
        from trl import RewardConfig

        opts = self.opts
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cpu = not torch.accelerator.is_available()
        has_eval = self.data.eval is not None
        is_moe = _is_moe_config(cfg)
        args = RewardConfig(
            output_dir=str(self.out / CHECKPOINTS),
            num_train_epochs=opts.epochs,
            max_steps=opts.max_steps or -1,
            learning_rate=opts.learning_rate,
            lr_scheduler_type=opts.lr_scheduler,
            warmup_steps=opts.warmup_ratio,  # a float below 1 is a share of the steps
            weight_decay=opts.weight_decay,
            max_grad_norm=opts.max_grad_norm,
            per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=opts.eval_batch_size or opts.batch_size,
            gradient_accumulation_steps=opts.gradient_accumulation_steps,
            bf16=opts.precision == "bf16",
            fp16=opts.precision == "fp16",
            # Non-reentrant: the router logits captured inside a checkpointed layer keep their graph, so the
            # router losses still reach the routers.
            activation_checkpointing=opts.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if opts.gradient_checkpointing else None,
            eval_strategy=("steps" if opts.eval_steps else "epoch") if has_eval else "no",
            eval_steps=opts.eval_steps,
            eval_on_start=bool(opts.eval_on_start and has_eval and self.mode == "fresh"),
            save_strategy="steps",
            save_steps=opts.save_steps,
            save_total_limit=opts.save_total_limit,
            logging_strategy="steps",
            logging_steps=opts.logging_steps,
            logging_first_step=True,
            report_to=[r.strip() for r in opts.report_to.split(",") if r.strip()] or "none",
            seed=opts.seed,
            data_seed=opts.seed,
            use_cpu=cpu,
            ddp_backend="gloo" if cpu and world > 1 else None,
            ddp_find_unused_parameters=is_moe,
            disable_tqdm=is_quiet(),
            max_length=None,  # the pairs were cut to max_length when loaded; trl must not drop any
            dataset_num_proc=None,
            center_rewards_coefficient=opts.center_rewards_coef,
        )
        plugin = getattr(args, "deepspeed_plugin", None)
        if opts.lora and plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            raise UmmError("lora with DeepSpeed ZeRO-3 is not supported (the adapter is merged on the main process, "
                           "which needs whole weights); use ZeRO-2, FSDP or plain DDP, or train without --lora.")
        from umm_tools.utils import set_seed

        set_seed(opts.seed)  # a new score head and the LoRA matrices start the same on every process
        model = self._load_model(cfg, is_moe)
        self.frozen = _freeze_untransferable(model, self.umm_meta)
        peft_config = self._lora_config(model, is_moe) if opts.lora else None
        trainer = trainer_class()(
            model=model,
            args=args,
            train_dataset=self.data.train,
            eval_dataset=self.data.eval,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=self.callbacks or None,
            router_aux_coef=opts.router_aux_coef,
            router_z_coef=opts.router_z_coef,
        )
        if is_quiet():
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        elif not logger.isEnabledFor(logging.DEBUG) and trainer.pop_callback(_progress_callback_class()):
            # Live figures in the bar's postfix instead of a printed dict per logging step (all of them are
            # in metrics.json; --verbose restores transformers' printing).
            trainer.add_callback(_bar_with_figures())
        self.is_moe = trainer.moe is not None
        self.trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in trainer.model.parameters())
        logger.info("%s model: %s trainable parameters of %s (%.2f%%)%s", "MoE" if self.is_moe else "dense",
                    f"{self.trainable:,}", f"{self.total:,}", 100.0 * self.trainable / max(self.total, 1),
                    f"; frozen (not carried back by collapse): {', '.join(self.frozen)}" if self.frozen else "")
        return trainer

    def _load_model(self, cfg: dict[str, Any], is_moe: bool) -> Any:
        import torch
        from transformers import AutoModelForSequenceClassification

        archs = list(cfg.get("architectures") or [])
        causal = bool(archs) and all(a.endswith("ForCausalLM") for a in archs)
        kw: dict[str, Any] = {"dtype": torch.float32, "output_loading_info": True}
        if is_moe and self.opts.experts_implementation != "auto":
            kw["experts_implementation"] = self.opts.experts_implementation
        if causal:
            kw["num_labels"] = 1
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(str(self.folder), **kw)
        except ValueError as e:
            raise UmmError(f"{self.model_src} cannot be loaded as a sequence-classification model: {e}") from e
        except OSError as e:
            raise UmmError(f"could not load the weights of {self.model_src}: {e}") from e
        missing = sorted(info.get("missing_keys") or [])
        if causal and missing == ["score.weight"]:
            logger.info("%s is a %s: a new one-output score head is trained (seed %d)", self.model_src, archs[0],
                        self.opts.seed)
        elif missing:
            raise UmmError(f"{self.model_src} lacks weights the model needs ({', '.join(missing[:5])}); they would be "
                           "random. Re-download or re-create the model folder.")
        if is_moe:
            logger.info("routed experts run with experts_implementation=%s", model.config._experts_implementation)
        return model

    def _lora_config(self, model: Any, is_moe: bool) -> Any:
        import torch
        from peft import LoraConfig, TaskType

        opts = self.opts
        targets = list(opts.lora_targets or (LORA_TARGETS_MOE if is_moe else LORA_TARGETS_DENSE))
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        fused = [n for n, p in model.named_parameters() if p.ndim == 3]
        modules, parameters = [], []
        for t in targets:
            if any(n == t or n.endswith("." + t) for n in linear):
                modules.append(t)
            elif any(n == t or n.endswith("." + t) for n in fused):
                parameters.append(t)
            else:
                known = sorted({n.split(".")[-1] for n in linear} | {".".join(n.split(".")[-2:]) for n in fused})
                raise UmmError(f"lora_targets: {t!r} names no linear module nor fused expert parameter of "
                               f"{self.model_src}; choose among {', '.join(known)}.")
        if parameters and opts.lora_dropout:
            raise UmmError(f"lora_dropout={opts.lora_dropout} with the fused expert parameters "
                           f"{', '.join(parameters)} as LoRA targets: peft cannot apply dropout to them. Set "
                           "lora_dropout 0 or leave them out of lora_targets.")
        full = [m for m in (LORA_FULL_MOE if is_moe else LORA_FULL_DENSE)
                if any(n.endswith(m) for n, _ in model.named_modules())]
        logger.info("LoRA r=%d on %s; trained in full: %s", opts.lora_rank, ", ".join(modules + parameters),
                    ", ".join(full))
        return LoraConfig(
            r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
            target_modules=modules, target_parameters=parameters or None, modules_to_save=full,
            task_type=TaskType.SEQ_CLS, bias="none",
        )

    def _load_routing_state(self, trainer: Any) -> None:
        if trainer.routing is None or not trainer.accelerator.is_main_process:
            return
        path = self.checkpoint / ROUTING_STATE_FILE
        if path.is_file():
            trainer.routing.load_state(read_json(path, "routing state"))
        else:
            logger.warning("%s has no %s: routing_stats.json will count only the tokens trained after the resume",
                           self.checkpoint, ROUTING_STATE_FILE)

    # --- output --------------------------------------------------------------------------------------------

    def _options_record(self, acc: Any) -> dict[str, Any]:
        import accelerate
        import torch
        import transformers
        import trl

        return {
            "model": self.model_src,
            "data": self.data_src,
            "options": self.opts.model_dump(mode="json"),
            "resolved": {"eval_fraction": self.data_opts.eval_fraction, "max_length": self.data_opts.max_length},
            "kind": "moe" if self.is_moe else "dense",
            "num_processes": acc.num_processes,
            "effective_batch_pairs": self.opts.batch_size * self.opts.gradient_accumulation_steps * acc.num_processes,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "frozen_parameters": self.frozen,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "accelerate": accelerate.__version__},
        }

    def _finish(self, trainer: Any, state_dict: Any, routing: RoutingStats | None, final_eval: Any,
                seconds: float) -> None:
        staging = self.out / f".final-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            self._save_model(trainer, state_dict, staging)
            if routing is not None:
                write_json(staging / ROUTING_STATS_FILE, routing.to_json())
            else:
                logger.info("dense model: no routing statistics (routing_stats.json is not written)")
            write_json(staging / METRICS_FILE, self._metrics(trainer, routing, final_eval, seconds))
            write_json(staging / OPTIONS_FILE, self._options_record(trainer.accelerator))
            for item in staging.iterdir():
                target = self.out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                item.replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        (self.out / INCOMPLETE).unlink(missing_ok=True)  # the folder is now a finished run
        if not self.opts.keep_checkpoints:
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
        if final_eval:
            logger.info("eval accuracy %.4f, loss %.4f, mean margin %+.4f", final_eval.get("eval_accuracy", math.nan),
                        final_eval.get("eval_loss", math.nan), final_eval.get("eval_margin", math.nan))
        logger.info("trained reward model written to %s", self.out)

    def _save_model(self, trainer: Any, state_dict: Any, folder: Path) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.opts.lora:
            model.save_pretrained(str(folder / ADAPTER_DIR))
            model = model.merge_and_unload()
            state_dict = model.state_dict()
        dtype = _save_dtype(self.opts.save_dtype, self.folder)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.config.dtype = dtype
        model.save_pretrained(str(folder), state_dict=state_dict)
        trainer.processing_class.save_pretrained(str(folder))
        if (self.folder / UPCYCLE_FILE).is_file():
            shutil.copy2(self.folder / UPCYCLE_FILE, folder / UPCYCLE_FILE)
        saved = read_json(folder / "config.json", "saved config")
        if self.umm_meta is not None and saved.get("umm") != self.umm_meta:
            raise RuntimeError("the saved config.json lost or changed its 'umm' key")
        if saved.get("dtype") != str(dtype).removeprefix("torch."):
            saved["dtype"] = str(dtype).removeprefix("torch.")
            write_json(folder / "config.json", saved)

    def _metrics(self, trainer: Any, routing: RoutingStats | None, final_eval: Any, seconds: float) -> dict[str, Any]:
        history = trainer.state.log_history
        train_keys = ("loss", "bt_loss", "router_aux_loss", "router_z_loss", "accuracy", "margin", "learning_rate",
                      "grad_norm", "mean_reward")
        loss_curve = [{"step": h["step"], "epoch": h.get("epoch"), **{k: h[k] for k in train_keys if k in h}}
                      for h in history if "loss" in h and "train_runtime" not in h]
        eval_curve = [{"step": h["step"], "epoch": h.get("epoch"),
                       **{k.removeprefix("eval_"): v for k, v in h.items() if k.startswith("eval_")}}
                      for h in history if "eval_loss" in h]
        summary = next((h for h in reversed(history) if "train_runtime" in h), {})
        metrics: dict[str, Any] = {
            "model": self.model_src,
            "data": self.data_src,
            "kind": "moe" if self.is_moe else "dense",
            "global_step": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from": str(self.checkpoint) if self.mode == "resume" else None,
            "seconds": round(seconds, 3),
            "train_runtime": summary.get("train_runtime"),
            "train_loss": summary.get("train_loss"),
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "frozen_parameters": self.frozen,
            "loss_curve": loss_curve,
            "eval_curve": eval_curve,
            "eval": None,
            "expert_load": None,
            "data_stats": self.data.stats,
        }
        if final_eval:
            metrics["eval"] = {
                "pairs": int(final_eval.get("eval_pairs", 0)),
                "accuracy": final_eval.get("eval_accuracy"),
                "loss": final_eval.get("eval_loss"),
                "bt_loss": final_eval.get("eval_bt_loss"),
                "mean_margin": final_eval.get("eval_margin"),
                "tie_rule": "a tie (equal rewards) counts as half a correct pair",
            }
        if routing is not None:
            doc = routing.to_json()
            per_layer = {k: v["routed_topk_share"] for k, v in doc["layers"].items()}
            n = len(per_layer)
            mean = [sum(v[i] for v in per_layer.values()) / n for i in range(routing.num_experts)] if n else []
            metrics["expert_load"] = {
                "what": "each routed expert's share of the top-k selections over the training tokens",
                "mean_over_layers": mean,
                "max_share": max(max(v) for v in per_layer.values()) if n else None,
                "per_layer": per_layer,
                "shared_gate_mean": {k: v["shared_gate_mean"] for k, v in doc["layers"].items()},
            }
        return metrics


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _read_model_config(folder: Path, source: str) -> dict[str, Any]:
    """config.json of MODEL, checked to be a one-output reward model (or a causal LM to put a score head on)."""
    path = folder / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise UmmError(f"{folder}: config.json is missing (found: {', '.join(found) or 'nothing'}); is this a "
                       "transformers model folder?")
    cfg = read_json(path, "model config")
    archs = list(cfg.get("architectures") or [])
    seqcls = any(a.endswith("ForSequenceClassification") for a in archs)
    causal = any(a.endswith("ForCausalLM") for a in archs)
    if archs and not (seqcls or causal):
        raise UmmError(f"{source} is a {', '.join(archs)}; umm trains a …ForSequenceClassification reward model "
                       "(or a …ForCausalLM, which gets a new score head).")
    if seqcls:
        labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 1
        if labels != 1:
            raise UmmError(f"{source} has {labels} labels; a reward model gives one score per sequence "
                           "(num_labels=1). Start from its …ForCausalLM base or a one-output RM.")
    return cfg


def _is_moe_config(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("num_experts") or cfg.get("num_local_experts"))


def _freeze_untransferable(model: Any, umm_meta: dict[str, Any] | None) -> list[str]:
    """Freeze every parameter the collapse cannot carry back into the source architecture; return their names.

    Llama and Mistral sources have no biases at all; Qwen2 sources have q/k/v biases only. The upcycle writes
    ``qkv_bias=false`` for Llama/Mistral, so normally nothing is found; a bias that is there anyway (a config
    edited by hand) is frozen, and a warning says when it is not zero (the collapse would then refuse).
    """
    from umm_tools.arch import SUPPORTED

    if not umm_meta:
        return []
    source_type = umm_meta.get("source_model_type")
    arch = SUPPORTED.get(source_type)
    if arch is None:
        logger.warning("config.json names source_model_type %r, which umm does not know; nothing is frozen",
                       source_type)
        return []
    frozen = []
    for name, p in model.named_parameters():
        if not name.endswith(".bias") or (arch.qkv_bias and _QKV_BIAS.search(name)):
            continue
        p.requires_grad_(False)
        frozen.append(name)
        if bool(p.detach().abs().max() > 0):
            logger.warning("%s is not zero, and a %s source has no such tensor: it stays frozen, but the collapse "
                           "cannot carry it back", name, source_type)
    if not frozen:
        logger.info("%s source: every parameter of the MoE maps back onto it (no %s); nothing to freeze",
                    source_type, "bias tensors" if not arch.qkv_bias else "bias but q/k/v's")
    return frozen


def _save_dtype(choice: str, folder: Path) -> Any:
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    cfg = read_json(folder / "config.json", "model config")
    saved = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, saved) if saved in ("float32", "bfloat16", "float16") else torch.float32


def _progress_callback_class():
    from transformers.trainer_callback import ProgressCallback

    return ProgressCallback


def _bar_with_figures():
    """transformers' progress bar, showing the latest loss / accuracy / router loss as its postfix."""
    ProgressCallback = _progress_callback_class()
    shown = ("loss", "accuracy", "router_aux_loss", "eval_loss", "eval_accuracy")

    class BarWithFigures(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                figures = {k: f"{float(v):.4g}" for k, v in logs.items() if k in shown and isinstance(v, (int, float))}
                if figures:
                    self.training_bar.set_postfix(figures, refresh=False)

    return BarWithFigures()
