"""PPO of a causal-LM policy against a reward model, with a gold reward watched for reward hacking.

TRL removed its PPO trainer, so umm has its own compact PPO on :mod:`accelerate`. One step:

1. **rollouts**: sample ``batch_size`` responses to training prompts (temperature, top-p);
2. **scores**: the proxy RM scores prompt + response (re-tokenised with the RM's tokenizer when it differs
   from the policy's, ids reused when the vocabularies are identical); optional penalty for responses that
   never emit EOS; optional reward whitening (running mean/std) and clipping;
3. **per-token rewards**: ``r_t = -β · KL_t`` for every response token (KL to the frozen reference policy,
   estimator k1 = log π/π_ref or k3 = (ρ - 1) - log ρ with ρ = π_ref/π), plus the score on the last token;
   β fixed or adaptive (Ziegler et al. 2019: β ← β · (1 + clip(KL/target - 1, ±0.2) · batch/horizon));
4. **GAE**: ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γλ A_{t+1}``, returns ``A + V``; advantages
   whitened over all response tokens of the step (across processes);
5. **PPO epochs**: ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` rollouts, each
   split into ``gradient_accumulation_steps`` micro-batches; loss = clipped surrogate
   ``max(-A ρ, -A clip(ρ, 1±ε))`` + ``vf_coef`` · clipped value loss
   ``½ max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²)``, token means over the response.

Log-probabilities are those of the *sampling* distribution: logits divided by ``temperature`` (top-p is not
modelled). Dropout is switched off (the models stay in eval mode) so that the probability ratio is exactly 1
on the first minibatch.

**Critic.** A value head (linear, one output per token) on a transformer backbone. ``critic_init="reward"``
(the default) starts it from the reward model: backbone and score head are copied, so the critic predicts
values on the reward's scale from the first step and the early advantages are not dominated by a random
critic. It needs the RM to read the policy's token ids (same vocabulary); otherwise, and when the reward is
a Python function, umm falls back to ``"policy"``: the policy's backbone with a zero-initialised head.

**Evaluation.** Every ``eval_every`` steps (and before the first and after the last step) the policy answers
held-out prompts; by default *sampled* at the training temperature with a fixed seed, so the KL figure is
an honest Monte-Carlo estimate of KL(π‖π_ref), the rewards are those of the distribution being optimised,
and every evaluation sees the same random numbers (less noise between evaluations). ``eval_sampling=greedy``
is available. Mean proxy score, gold score, KL and response length go to ``metrics.jsonl``.

**Output folder.** Written in place, with a ``.incomplete`` marker created first and removed last: a
checkpoint (``checkpoint/``, every ``save_every`` steps) must survive a crash for ``resume`` to work, which
rules out :func:`umm_tools.utils.atomic_output_dir` (it deletes everything on failure). A folder with
``.incomplete`` is never mistaken for a finished run. At the end: ``policy/`` (LoRA merged into the weights,
loads with ``AutoModelForCausalLM``; the adapter alone also goes to ``adapter/``), ``plot.png``,
``summary.json`` (reward-hacking figures) and ``ppo_options.json`` (resolved options and provenance).

Multi-process: run under ``accelerate launch`` on GPUs, or ``torchrun --nproc_per_node N`` on CPUs (gloo;
``accelerate launch --cpu`` starts several processes only through MPI). DDP with
``find_unused_parameters=True``; ``batch_size`` and ``mini_batch_size`` count rollouts over all processes;
metrics are reduced across processes; only the main process writes files (each process adds its own RNG
state to a checkpoint); the process group is destroyed when :func:`ppo` returns.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from umm_tools.config import Options
from umm_tools.errors import UmmError
from umm_tools.utils import progress, read_json, write_json

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""``fn(prompts, responses) -> scores``: one float per (prompt, response) pair."""

INCOMPLETE = ".incomplete"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "plot.png"
OPTIONS_FILE = "ppo_options.json"
CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer_state.json"

# Options that may change between a run and its resume without changing what the run computes.
_RESUMABLE_CHANGES = {"resume", "overwrite", "total_steps", "total_episodes", "eval_every", "save_every"}

SUMMARY_KEYS = (
    "gold_peak", "gold_peak_step", "gold_final", "gold_drop", "proxy_final", "proxy_peak",
    "kl_final", "proxy_gold_spearman", "steps", "evaluations",
)


class PPOOptions(Options):
    """Options of ``umm ppo``."""

    # --- rewards -----------------------------------------------------------------------------------------
    reward_model: str | None = Field(
        None,
        description="Proxy reward model the policy is optimised against: folder or Hub id of a "
        "sequence-classification model with one output (num_labels=1). Required (the Python API may pass "
        "a reward_fn instead).",
    )
    gold_model: str | None = Field(
        None,
        description="Gold reward model, scored on the evaluation prompts for monitoring only (never trained "
        "on): folder or Hub id, num_labels=1. Without it (and without a gold_fn) no gold figures are reported.",
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0,
        description="Subtracted from the score of a response that reaches max_new_tokens without EOS.",
    )
    whiten_rewards: bool = Field(
        False, description="Normalise scores by a running mean and standard deviation over all steps so far."
    )
    reward_clip: float | None = Field(
        None, gt=0, description="Clip scores (after whitening) to [-reward_clip, reward_clip]."
    )
    # --- prompts -----------------------------------------------------------------------------------------
    prompt_column: str = Field("prompt", description="Column with the prompt as plain text.")
    messages_column: str = Field(
        "messages",
        description="Column with the prompt as chat messages (list of {role, content}), used when "
        "prompt_column is absent; rendered with the policy's chat template (add_generation_prompt=True).",
    )
    split: str = Field("train", description="Dataset split to read when PROMPTS is a Hub dataset or folder.")
    max_prompt_length: int = Field(256, ge=1, description="Prompts longer than this (tokens) keep their end.")
    # --- sampling ----------------------------------------------------------------------------------------
    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; log-probabilities use the logits divided by it."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1 = off); not modelled in log-probs.")
    # --- optimisation ------------------------------------------------------------------------------------
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate of the policy.")
    critic_learning_rate: float | None = Field(
        None, gt=0, description="AdamW learning rate of the critic (default: learning_rate)."
    )
    batch_size: int = Field(32, ge=1, description="Rollouts per PPO step, all processes together.")
    mini_batch_size: int = Field(
        8, ge=1, description="Rollouts per optimiser update, all processes together; divides batch_size."
    )
    ppo_epochs: int = Field(4, ge=1, description="Passes over each step's rollouts.")
    gradient_accumulation_steps: int = Field(
        1, ge=1,
        description="Micro-batches each minibatch is split into (memory); mini_batch_size must be a multiple "
        "of gradient_accumulation_steps × number of processes.",
    )
    total_steps: int = Field(100, ge=1, description="PPO steps (each of batch_size rollouts).")
    total_episodes: int | None = Field(
        None, ge=1,
        description="Rollouts in all; when set, overrides total_steps with ceil(total_episodes / batch_size).",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient-norm clipping (None = off).")
    # --- KL to the reference -------------------------------------------------------------------------------
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="Per-token KL estimator: k1 = log π - log π_ref (unbiased, can be negative), "
        "k3 = (ρ - 1) - log ρ with ρ = π_ref/π (unbiased, never negative, lower variance).",
    )
    kl_coef: float = Field(0.05, ge=0, description="β: weight of the per-token KL penalty (initial value if adaptive).")
    adaptive_kl: bool = Field(False, description="Adapt β towards kl_target (Ziegler et al. 2019); else fixed.")
    kl_target: float = Field(6.0, gt=0, description="Target KL per response (nats) of the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon (in rollouts) of the adaptive KL controller.")
    # --- advantages and losses ------------------------------------------------------------------------------
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the step's response tokens.")
    cliprange: float = Field(0.2, gt=0, description="ε of the clipped surrogate (ratio kept in [1-ε, 1+ε]).")
    cliprange_value: float = Field(0.2, gt=0, description="ε_v: how far a value may move from its rollout value.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    critic_init: Literal["reward", "policy"] = Field(
        "reward",
        description="Critic start: 'reward' copies the reward model (backbone and score head: values on "
        "the reward's scale from step one); 'policy' uses the policy's backbone with a zero-initialised "
        "head. 'reward' falls back to 'policy' (with a warning) when the RM's vocabulary differs from the "
        "policy's or the reward is a Python function.",
    )
    # --- LoRA --------------------------------------------------------------------------------------------
    lora_rank: int = Field(
        0, ge=0,
        description="LoRA rank of the policy (0 = full fine-tuning). With LoRA the reference policy is the "
        "policy with its adapter disabled (no second copy); the final policy/ has the adapter merged.",
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / rank).")
    lora_target_modules: list[str] | None = Field(
        None, description="Module names LoRA adapts (default: every linear layer but the output head)."
    )
    # --- evaluation --------------------------------------------------------------------------------------
    eval_every: int = Field(
        10, ge=0, description="Evaluate every this many steps (0: only before the first and after the last)."
    )
    eval_prompts: int | None = Field(
        None, ge=0, description="Held-out evaluation prompts, a count; overrides eval_fraction."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of the prompts held out for evaluation (at least one prompt if > 0)."
    )
    eval_sampling: Literal["sample", "greedy"] = Field(
        "sample",
        description="Evaluation responses: 'sample' at the training temperature with a fixed seed (honest KL "
        "estimate, same distribution as training) or 'greedy'.",
    )
    eval_batch_size: int = Field(32, ge=1, description="Prompts per generation call during evaluation.")
    # --- run ---------------------------------------------------------------------------------------------
    seed: int = Field(0, description="Random seed (prompt order, sampling, LoRA init).")
    overwrite: bool = Field(False, description="Replace an existing OUTPUT_DIR.")
    resume: bool = Field(
        False,
        description="Continue an unfinished run in OUTPUT_DIR from its last checkpoint (start afresh if it has "
        "none; return at once if the run is finished).",
    )
    save_every: int = Field(
        50, ge=0, description="Write a resumable checkpoint every this many steps (0 = never)."
    )

    @model_validator(mode="after")
    def _check(self) -> PPOOptions:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume keeps OUTPUT_DIR, overwrite replaces it")
        return self

    @property
    def num_steps(self) -> int:
        """PPO steps of the run: ``total_steps``, or ``ceil(total_episodes / batch_size)`` when set."""
        if self.total_episodes is not None:
            return math.ceil(self.total_episodes / self.batch_size)
        return self.total_steps


# ----------------------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    """One prompt: ``text`` as the policy sees it (rendered when it came as ``messages``)."""

    text: str
    messages: list[dict] | None = None


def _read_table(source: str, split: str):
    """A :class:`datasets.Dataset` from a local file, a dataset folder or a Hub id."""
    import datasets

    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    p = Path(source)
    if p.is_file():
        builder = builders.get(p.suffix.lower())
        if builder is None:
            raise UmmError(f"prompts file {p}: unsupported type {p.suffix!r}; use .jsonl, .json, .csv or .parquet")
        size = p.stat().st_size
        if size == 0 or (size < 1 << 16 and builder != "parquet" and not p.read_bytes().strip()):
            raise UmmError(f"prompts file {p} is empty; it needs one prompt per row (a 'prompt' or 'messages' column)")
        try:
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:
            if "no data" in str(e):  # datasets' words for a file with a header and no rows
                raise UmmError(f"prompts {p} has no rows; it needs one prompt per row") from e
            raise UmmError(f"cannot read prompts file {p}: {e}") from e
    try:
        if p.is_dir() and (p / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(p))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise UmmError(
            f"prompts {source!r}: not a .jsonl/.json/.csv/.parquet file, nor a dataset folder or Hub dataset "
            f"with a {split!r} split ({type(e).__name__}: {e})"
        ) from e


def load_prompts(source: str, opts: PPOOptions) -> list[str | list[dict]]:
    """Read PROMPTS; each row is a plain-text prompt (str) or a chat (list of {role, content})."""
    ds = _read_table(source, opts.split)
    if len(ds) == 0:
        raise UmmError(f"prompts {source} has no rows; it needs one prompt per row")
    cols = list(ds.column_names)
    if opts.prompt_column in cols:
        col = opts.prompt_column
    elif opts.messages_column in cols:
        col = opts.messages_column
    else:
        raise UmmError(
            f"prompts {source}: no {opts.prompt_column!r} column (plain text) nor {opts.messages_column!r} column "
            f"(chat messages); columns found: {', '.join(cols)}. Rename the column or set prompt_column / "
            "messages_column."
        )
    rows: list[Any] = []
    for i, value in enumerate(ds[col]):
        if isinstance(value, str):
            rows.append(value)
        elif isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in value):
            rows.append([{"role": m["role"], "content": m["content"]} for m in value])
        else:
            raise UmmError(
                f"prompts {source}, row {i}, column {col!r}: expected a string or a non-empty list of "
                f"{{role, content}} messages, found {type(value).__name__}: {str(value)[:80]!r}"
            )
    return rows


def _render(rows: list[Any], tok, source: str) -> list[Prompt]:
    out = []
    for row in rows:
        if isinstance(row, str):
            out.append(Prompt(row))
            continue
        if not getattr(tok, "chat_template", None):
            raise UmmError(
                f"prompts {source} come as chat messages but the policy's tokenizer has no chat template; give "
                "plain-text prompts (a 'prompt' column) or a policy whose tokenizer has a chat_template"
            )
        out.append(Prompt(tok.apply_chat_template(row, add_generation_prompt=True, tokenize=False), row))
    return out


# ----------------------------------------------------------------------------------------------------------
# models


def _load_config(path: str, role: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UmmError(
            f"{role} {path!r}: cannot read its config ({type(e).__name__}: {e}); give a model folder with "
            "config.json or a Hub model id"
        ) from e


def _check_policy_config(path: str):
    cfg = _load_config(path, "policy")
    archs = list(getattr(cfg, "architectures", None) or [])
    lm_suffixes = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if archs and not any(a.endswith(lm_suffixes) for a in archs):
        raise UmmError(
            f"policy {path!r} is not a causal language model (architectures: {', '.join(archs)}); PPO needs a "
            "model that generates text (…ForCausalLM). A sequence-classification model is a reward model: "
            "pass it as --reward-model."
        )
    return cfg


def _check_rm_config(path: str, role: str):
    from umm_tools.evaluate import reward_model_config

    try:
        return reward_model_config(path)
    except UmmError as e:
        raise UmmError(f"{role}: {e}") from e


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UmmError(f"policy {path!r}: cannot load its tokenizer ({type(e).__name__}: {e})") from e


def _load_causal_lm(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as e:
        raise UmmError(f"policy {path!r} cannot be loaded as a causal language model: {e}") from e


def _load_rm(path: str, role: str, device):
    """A frozen one-output RM and its tokenizer (weights checked complete by umm_tools.evaluate)."""
    from umm_tools.evaluate import load_reward_model

    try:
        rm, tok = load_reward_model(path, device="cpu", dtype="float32")
    except UmmError as e:
        raise UmmError(f"{role}: {e}") from e
    return rm.to(device).eval().requires_grad_(False), tok


def _same_vocab(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def _score_head(seqcls):
    """The single-output linear head of a sequence-classification model, or None."""
    import torch.nn as nn

    prefix = seqcls.base_model_prefix
    heads = [m for name, m in seqcls.named_children()
             if name != prefix and isinstance(m, nn.Linear) and m.out_features == 1]
    return heads[0] if len(heads) == 1 else None


@functools.cache
def _actor_critic_class():
    import torch.nn as nn

    class ActorCritic(nn.Module):
        """Policy and critic in one module, so DDP wraps (and one optimizer updates) both."""

        def __init__(self, policy, critic, value_head):
            super().__init__()
            self.policy = policy
            self.critic = critic
            self.value_head = value_head

        def forward(self, input_ids, attention_mask, position_ids, n_response: int, temperature: float):
            # input_ids: (B, T) = left-padded prompt (P) + response (R = n_response); position t predicts t+1.
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=n_response + 1, use_cache=False)
            logits = out.logits[:, :-1].float() / temperature  # (B, R, V)
            h = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state[:, -n_response - 1:-1]  # (B, R, H)
            values = self.value_head(h).squeeze(-1).float()  # (B, R)
            return logits, values

    return ActorCritic


# ----------------------------------------------------------------------------------------------------------
# scoring


class _ModelScorer:
    """Scores (prompt, response) pairs with a sequence-classification RM."""

    def __init__(self, model, tok, policy_tok, batch_size: int):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        from umm_tools.evaluate import reward_pad_token_id

        self.reuse_ids = _same_vocab(tok, policy_tok)
        self.same_template = getattr(tok, "chat_template", None) == getattr(policy_tok, "chat_template", None)
        self.pad_id = reward_pad_token_id(model, tok)  # the RM pools its last non-pad token

    def ids(self, prompt: Prompt, prompt_ids: list[int], response_ids: list[int], response_text: str) -> list[int]:
        if self.reuse_ids and (prompt.messages is None or self.same_template):
            return prompt_ids + response_ids
        if prompt.messages is not None and getattr(self.tok, "chat_template", None):
            chat = prompt.messages + [{"role": "assistant", "content": response_text.strip()}]
            return list(self.tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        return self.tok(prompt.text + response_text, add_special_tokens=prompt.messages is None)["input_ids"]

    def __call__(self, prompts, prompt_ids, response_ids, response_texts):
        import torch

        device = next(self.model.parameters()).device
        seqs = [self.ids(p, pi, ri, rt) for p, pi, ri, rt in zip(prompts, prompt_ids, response_ids, response_texts,
                                                                     strict=True)]
        scores = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):  # right padding: the RM pools its last non-pad token
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (b, 1)
            scores.append(logits[:, 0].float())
        return torch.cat(scores) if scores else torch.zeros(0, device=device)


class _FnScorer:
    """Scores (prompt, response) pairs with a Python function ``fn(prompts, responses) -> floats``."""

    def __init__(self, fn: RewardFn, role: str, device):
        self.fn, self.role, self.device = fn, role, device

    def __call__(self, prompts, prompt_ids, response_ids, response_texts):
        import torch

        if not prompts:
            return torch.zeros(0, device=self.device)
        values = list(self.fn([p.text for p in prompts], [r.strip() for r in response_texts]))
        if len(values) != len(prompts):
            raise UmmError(f"{self.role} returned {len(values)} scores for {len(prompts)} responses")
        out = torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
        if not torch.isfinite(out).all():
            raise UmmError(f"{self.role} returned a non-finite score")
        return out


# ----------------------------------------------------------------------------------------------------------
# PPO math (pure functions on tensors; the tests exercise them directly)


def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_per_token(logp, logp_ref, estimator: str):
    """Per-token KL(π‖π_ref) estimate from samples of π: k1 = log π - log π_ref; k3 = (ρ-1) - log ρ, ρ = π_ref/π."""
    if estimator == "k1":
        return logp - logp_ref
    log_ratio = logp_ref - logp
    return log_ratio.exp() - 1 - log_ratio


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens; ``mask`` is a prefix of ones per row.

    rewards, values, mask: (B, R). Values past the end of a response count as 0 (terminal state).
    Returns (advantages, returns), both (B, R) and zero past the end.
    """
    import torch

    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_v = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, cliprange, cliprange_value):
    """Clipped surrogate and clipped value loss (token means over ``mask``) and their statistics."""
    import torch

    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    stats = {
        "clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
        "vf_clipfrac": masked_mean(((values - returns) ** 2 < (v_clipped - returns) ** 2).float(), mask).item(),
        "approx_kl": (0.5 * masked_mean(log_ratio**2, mask)).item(),
        "ratio_mean": masked_mean(ratio, mask).item(),
        "ratio_dev": ((ratio - 1).abs() * mask).max().item(),
    }
    return pg_loss, vf_loss, stats


class KLController:
    """β of the KL penalty: fixed, or adaptive (Ziegler et al. 2019, proportional control towards a target)."""

    def __init__(self, value: float, adaptive: bool, target: float, horizon: int):
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, kl: float, n_rollouts: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_rollouts / self.horizon


class RunningMoments:
    """Running mean and variance (Chan et al. parallel update) of the scores, for reward whitening."""

    def __init__(self, count: float = 0.0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = count, mean, m2

    def update(self, xs: list[float]) -> None:
        n = len(xs)
        if n == 0:
            return
        mean = sum(xs) / n
        m2 = sum((x - mean) ** 2 for x in xs)
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined (n < 2 or a constant)."""

    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def summarize(records: list[dict], steps: int) -> dict:
    """Reward-hacking figures from the evaluation lines of ``metrics.jsonl``."""
    evals = [r for r in records if r.get("kind") == "eval"]
    proxy = [r["proxy"] for r in evals]
    gold = [r["gold"] for r in evals if r.get("gold") is not None]
    out: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    out["steps"], out["evaluations"] = steps, len(evals)
    if evals:
        out["proxy_final"] = proxy[-1]
        out["proxy_peak"] = max(proxy)
        out["kl_final"] = evals[-1]["kl"]
    if evals and len(gold) == len(evals):
        peak = max(range(len(gold)), key=lambda i: gold[i])
        out["gold_peak"] = gold[peak]
        out["gold_peak_step"] = evals[peak]["step"]
        out["gold_final"] = gold[-1]
        out["gold_drop"] = gold[peak] - gold[-1]
        out["proxy_gold_spearman"] = spearman(proxy, gold)
    return out


def plot_metrics(records: list[dict], path: Path) -> None:
    """Proxy and gold against step, KL on a second y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r["step"] for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["proxy"] for r in evals], "o-", color="tab:blue", label="proxy reward")
    if evals and all(r.get("gold") is not None for r in evals):
        ax.plot(steps, [r["gold"] for r in evals], "s-", color="tab:green", label="gold reward")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("mean reward (evaluation prompts)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["kl"] for r in evals], "--", color="tab:gray", label="KL to reference")
    ax2.set_ylabel("KL (nats per response)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    ax.set_title("PPO: proxy vs gold reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class _Batch:
    """Rollouts of one process. P = padded prompt length, R = response length (after padding)."""

    prompts: list[Prompt]
    input_ids: Any  # (B, P+R)
    attention_mask: Any  # (B, P+R)
    position_ids: Any  # (B, P+R)
    response_ids: Any  # (B, R)
    mask: Any  # (B, R) float: 1 on response tokens up to and including EOS
    ended: Any  # (B,) bool: the response emitted EOS
    prompt_ids: list[list[int]]
    response_lists: list[list[int]]
    response_texts: list[str]


def _prepare_output(out: Path, opts: PPOOptions) -> tuple[str, Path | None]:
    """Decide, from what is on disk, how to start: 'fresh' | 'resume' | 'done'. Reads only."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "fresh", None
    if not out.is_dir():
        raise UmmError(f"{out} exists and is not a folder; choose another output folder")
    unfinished = (out / INCOMPLETE).exists()
    if opts.overwrite:
        return "fresh", None
    if opts.resume:
        if unfinished:
            for name in (CHECKPOINT, CHECKPOINT + ".old"):
                if (out / name / TRAINER_STATE).is_file():
                    return "resume", out / name
            logger.warning("%s holds an unfinished run without a checkpoint; starting it again", out)
            return "fresh", None
        if (out / SUMMARY).is_file():
            return "done", None
        raise UmmError(f"{out} is not a umm ppo output folder (no {INCOMPLETE} marker nor {SUMMARY}); "
                       "choose another output folder or pass --overwrite")
    if unfinished:
        raise UmmError(f"{out} holds an unfinished PPO run; pass --resume to continue it from its last "
                       "checkpoint or --overwrite to start again")
    raise UmmError(f"{out} already exists; choose another output folder or pass --overwrite to replace it")


def ppo(
    policy: str,
    prompts: str,
    output_dir: str,
    opts: PPOOptions,
    gold_fn: RewardFn | None = None,
    *,
    reward_fn: RewardFn | None = None,
    callback: Callable[[dict], None] | None = None,
) -> Path:
    """Optimise POLICY with PPO against ``opts.reward_model`` on PROMPTS; write the run to OUTPUT_DIR.

    ``gold_fn(prompts, responses) -> scores`` replaces ``opts.gold_model`` as the gold reward (monitoring
    only). ``reward_fn`` (same signature) replaces the proxy RM; the critic then starts from the policy.
    ``callback(stats)`` is called on every process after every step with that step's statistics (the
    ``metrics.jsonl`` train line: ``step``, ``kl``, ``ratio_dev_first_minibatch``, ``score``, losses, ...).
    Returns OUTPUT_DIR.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if reward_fn is None and not opts.reward_model:
        raise UmmError("no reward: set reward_model (--reward-model) to a sequence-classification RM")
    if reward_fn is not None and opts.reward_model:
        raise UmmError("give either reward_model or reward_fn, not both")
    if gold_fn is not None and opts.gold_model:
        raise UmmError("give either gold_model or gold_fn, not both")

    import torch

    # Launched by torchrun on a machine without an accelerator: accelerate only picks multi-CPU (gloo) DDP
    # when told cpu=True; without it every process would believe it is alone and write OUTPUT_DIR.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    try:
        return _Run(accelerator, policy, prompts, Path(output_dir).absolute(), opts, gold_fn, reward_fn,
                    callback).run()
    finally:
        accelerator.end_training()  # destroys the process group under DDP


class _Run:
    def __init__(self, accelerator, policy, prompts, out, opts, gold_fn, reward_fn, callback):
        self.acc = accelerator
        self.policy_src, self.prompts_src, self.out, self.opts = policy, prompts, out, opts
        self.gold_fn, self.reward_fn, self.callback = gold_fn, reward_fn, callback
        self.main = accelerator.is_main_process
        self.nproc = accelerator.num_processes

    # --- setup -------------------------------------------------------------------------------------------

    def run(self) -> Path:
        opts, acc = self.opts, self.acc
        mode, ckpt = _prepare_output(self.out, opts)
        if mode == "done":
            logger.info("%s holds a finished run; nothing to do (pass --overwrite to run again)", self.out)
            return self.out
        if opts.batch_size % self.nproc or opts.mini_batch_size % (self.nproc * opts.gradient_accumulation_steps):
            raise UmmError(
                f"with {self.nproc} processes, batch_size ({opts.batch_size}) must be a multiple of the process "
                f"count and mini_batch_size ({opts.mini_batch_size}) a multiple of processes × "
                f"gradient_accumulation_steps ({self.nproc * opts.gradient_accumulation_steps})"
            )
        # Validate everything cheap before loading any weights.
        _check_policy_config(self.policy_src)
        if opts.reward_model:
            _check_rm_config(opts.reward_model, "reward model")
        if opts.gold_model:
            _check_rm_config(opts.gold_model, "gold model")
        rows = load_prompts(self.prompts_src, opts)
        self._setup_tokenizer_and_prompts(rows)

        acc.wait_for_everyone()  # every process has read OUTPUT_DIR before the main process changes it
        if self.main:
            if mode == "fresh":
                if self.out.exists():
                    shutil.rmtree(self.out)
                self.out.mkdir(parents=True)
                (self.out / INCOMPLETE).write_text("PPO run in progress or crashed; resume with --resume.\n")
            self._write_options(mode)
        acc.wait_for_everyone()

        self._setup_models()
        self.start_step = 0
        self.kl_ctl = KLController(opts.kl_coef, opts.adaptive_kl, opts.kl_target, opts.kl_horizon)
        self.moments = RunningMoments()
        if mode == "resume":
            self._load_checkpoint(ckpt)
        else:
            from accelerate.utils import set_seed

            set_seed(opts.seed + acc.process_index)  # different samples on every process
        if self.main:  # drop metrics of steps after the checkpoint: they are recomputed
            kept = [r for r in read_metrics(self.out / METRICS) if self.start_step > 0 and r["step"] <= self.start_step]
            (self.out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._train()
        self._finish()
        return self.out

    def _write_options(self, mode: str) -> None:
        import accelerate
        import torch
        import transformers

        path = self.out / OPTIONS_FILE
        record = {
            "policy": self.policy_src, "prompts": self.prompts_src,
            "reward_fn": getattr(self.reward_fn, "__name__", repr(self.reward_fn)) if self.reward_fn else None,
            "gold_fn": getattr(self.gold_fn, "__name__", repr(self.gold_fn)) if self.gold_fn else None,
            "options": self.opts.model_dump(mode="json"),
            "num_processes": self.nproc,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__},
        }
        if mode == "resume" and path.is_file():
            old = read_json(path, "PPO options").get("options", {})
            changed = sorted(k for k, v in record["options"].items()
                             if k not in _RESUMABLE_CHANGES and k in old and old[k] != v)
            if changed:
                logger.warning("resuming with changed options: %s", ", ".join(f"{k}: {old[k]!r} -> "
                               f"{record['options'][k]!r}" for k in changed))
        write_json(path, record)

    def _setup_tokenizer_and_prompts(self, rows) -> None:
        import random

        opts = self.opts
        tok = _load_tokenizer(self.policy_src)
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise UmmError(f"policy {self.policy_src!r}: its tokenizer has neither a pad nor an EOS token")
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        self.tok = tok
        prompts = _render(rows, tok, self.prompts_src)
        ids, truncated = [], 0
        for i, p in enumerate(prompts):
            x = list(tok(p.text, add_special_tokens=p.messages is None)["input_ids"])
            if not x:
                if tok.bos_token_id is None:
                    raise UmmError(f"prompts {self.prompts_src}, row {i}: the prompt is empty")
                x = [tok.bos_token_id]
            if len(x) > opts.max_prompt_length:
                truncated += 1
                x = x[-opts.max_prompt_length:]
            ids.append(x)
        if truncated:
            logger.warning("%d prompts longer than max_prompt_length=%d tokens keep their end",
                           truncated, opts.max_prompt_length)
        n = len(prompts)
        if opts.eval_prompts is not None:
            n_eval = opts.eval_prompts
        else:
            n_eval = math.ceil(opts.eval_fraction * n) if opts.eval_fraction > 0 else 0
        if n_eval >= n:
            raise UmmError(f"prompts {self.prompts_src}: {n} prompts, {n_eval} held out for evaluation; at least "
                           "one must remain for training (lower eval_prompts / eval_fraction)")
        order = list(range(n))
        random.Random(opts.seed).shuffle(order)
        self.prompts, self.prompt_ids = prompts, ids
        self.eval_idx, self.train_idx = order[:n_eval], order[n_eval:]
        if n_eval == 0:
            logger.warning("no evaluation prompts: metrics.jsonl will hold training statistics only")
        logger.info("%d training prompts, %d evaluation prompts", len(self.train_idx), n_eval)

    def _setup_models(self) -> None:
        import copy

        import torch

        opts, acc = self.opts, self.acc
        device = acc.device
        from accelerate.utils import set_seed

        set_seed(opts.seed)  # identical initialisation on every process (LoRA A matrices)
        policy = _load_causal_lm(self.policy_src)
        policy.config.use_cache = True
        eos = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        gen_eos = policy.generation_config.eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if not eos:
            raise UmmError(f"policy {self.policy_src!r} has no EOS token; responses could never end")
        self.eos_ids = sorted(eos)

        # proxy reward
        self.rm_tok = None
        if opts.reward_model:
            rm, self.rm_tok = _load_rm(opts.reward_model, "reward model", device)
            self.proxy = _ModelScorer(rm, self.rm_tok, self.tok, opts.eval_batch_size)
        else:
            self.proxy = _FnScorer(self.reward_fn, "reward_fn", device)
        self.gold = None
        if opts.gold_model:
            gm, gold_tok = _load_rm(opts.gold_model, "gold model", device)
            self.gold = _ModelScorer(gm, gold_tok, self.tok, opts.eval_batch_size)
        elif self.gold_fn is not None:
            self.gold = _FnScorer(self.gold_fn, "gold_fn", device)

        # critic
        init = opts.critic_init
        if init == "reward" and self.rm_tok is None:
            logger.info("the reward is a Python function: the critic starts from the policy")
            init = "policy"
        elif init == "reward" and not _same_vocab(self.rm_tok, self.tok):
            logger.warning("critic_init='reward' needs a reward model that reads the policy's token ids "
                           "(same vocabulary); the critic starts from the policy instead")
            init = "policy"
        head = None
        if init == "reward":
            from transformers import AutoModelForSequenceClassification

            seqcls = AutoModelForSequenceClassification.from_pretrained(opts.reward_model, dtype=torch.float32)
            critic = getattr(seqcls, seqcls.base_model_prefix)
            head = _score_head(seqcls)
            if head is None:
                logger.warning("reward model %s has no single linear score head; the critic starts from the "
                               "policy instead", opts.reward_model)
                init = "policy"
        if init == "policy":
            critic = copy.deepcopy(policy.base_model)  # the transformer under the LM head
            hidden = critic.config.get_text_config().hidden_size
            head = torch.nn.Linear(hidden, 1, bias=False)
            torch.nn.init.zeros_(head.weight)  # values start at 0: no made-up value estimates
        self.critic_init = init
        logger.info("critic initialised from the %s", "reward model" if init == "reward" else "policy")

        # LoRA policy, or a frozen copy as the reference
        self.ref = None
        if opts.lora_rank:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=0.0,
                             target_modules=opts.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
            policy = get_peft_model(policy, cfg)
        else:
            self.ref = copy.deepcopy(policy).to(device).eval().requires_grad_(False)

        model = _actor_critic_class()(policy, critic, head).eval()
        policy_params = [p for p in model.policy.parameters() if p.requires_grad]
        critic_params = list(model.critic.parameters()) + list(model.value_head.parameters())
        optimizer = torch.optim.AdamW([
            {"params": policy_params, "lr": opts.learning_rate},
            {"params": critic_params, "lr": opts.critic_learning_rate or opts.learning_rate},
        ])
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)

    # --- checkpoints -------------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int) -> None:
        acc = self.acc
        final, tmp, old = self.out / CHECKPOINT, self.out / (CHECKPOINT + ".tmp"), self.out / (CHECKPOINT + ".old")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # model, optimizer, RNG of every process
        acc.wait_for_everyone()
        if self.main:
            write_json(tmp / TRAINER_STATE, {
                "step": step, "kl_coef": self.kl_ctl.value, "num_processes": self.nproc,
                "reward_moments": [self.moments.count, self.moments.mean, self.moments.m2],
            })
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: Path) -> None:
        state = read_json(path / TRAINER_STATE, "checkpoint state")
        if state["num_processes"] != self.nproc:
            raise UmmError(f"checkpoint {path} was written by {state['num_processes']} processes; resume with the "
                           f"same number (now {self.nproc})")
        self.acc.load_state(str(path))
        self.start_step = int(state["step"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.moments = RunningMoments(*state["reward_moments"])
        logger.info("resumed from %s at step %d", path, self.start_step)

    # --- rollouts ----------------------------------------------------------------------------------------

    def _generate(self, idx: list[int], sample: bool, chunk: int) -> _Batch:
        import torch
        from transformers import GenerationConfig

        opts, tok, device = self.opts, self.tok, self.acc.device
        policy = self.unwrapped.policy
        prompt_ids = [self.prompt_ids[i] for i in idx]
        width = max(len(x) for x in prompt_ids)
        gen = GenerationConfig(
            max_new_tokens=opts.max_new_tokens, do_sample=sample, num_beams=1,
            temperature=opts.temperature if sample else 1.0, top_p=opts.top_p if sample else 1.0,
            top_k=0 if sample else 50, min_length=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
            eos_token_id=self.eos_ids, pad_token_id=tok.pad_token_id,
        )
        parts = []
        for start in range(0, len(idx), chunk):
            rows = prompt_ids[start:start + chunk]
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for i, x in enumerate(rows):  # left padding: responses start at the same column
                ids[i, width - len(x):] = torch.tensor(x)
                attn[i, width - len(x):] = 1
            out = policy.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen)
            parts.append((attn, out[:, width:].cpu()))
        n_resp = max(r.shape[1] for _, r in parts)
        resp = torch.full((len(idx), n_resp), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), n_resp))
        ended = torch.zeros(len(idx), dtype=torch.bool)
        attn = torch.cat([a for a, _ in parts])
        row = 0
        eos = torch.tensor(self.eos_ids)
        for _, r in parts:
            for x in r:
                is_eos = torch.isin(x, eos)
                length = int(is_eos.nonzero()[0, 0]) + 1 if is_eos.any() else len(x)
                ended[row] = bool(is_eos.any())
                resp[row, :length] = x[:length]
                mask[row, :length] = 1
                row += 1
        full_attn = torch.cat([attn, mask.long()], dim=1)
        pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
        input_ids = torch.cat([torch.stack([torch.tensor([tok.pad_token_id] * (width - len(x)) + x)
                                            for x in prompt_ids]), resp], dim=1)
        resp_lists = [resp[i, :int(mask[i].sum())].tolist() for i in range(len(idx))]
        texts = []
        for x, r in zip(prompt_ids, resp_lists, strict=True):  # text of the response as it continues the prompt
            head = tok.decode(x, skip_special_tokens=True)
            full = tok.decode(x + r, skip_special_tokens=True)
            texts.append(full[len(head):] if full.startswith(head) else tok.decode(r, skip_special_tokens=True))
        return _Batch(
            prompts=[self.prompts[i] for i in idx], input_ids=input_ids.to(device),
            attention_mask=full_attn.to(device), position_ids=pos.to(device), response_ids=resp.to(device),
            mask=mask.to(device), ended=ended.to(device), prompt_ids=prompt_ids, response_lists=resp_lists,
            response_texts=texts,
        )

    def _logprobs_values(self, b: _Batch, chunk: int | None = None):
        """Old log-probs, reference log-probs and values of a batch, no gradients. Each (B, R)."""
        import torch

        n_resp = b.response_ids.shape[1]
        n = b.input_ids.shape[0]
        chunk = chunk or n
        logps, refs, values = [], [], []
        with torch.no_grad():
            for s in range(0, n, chunk):
                sl = slice(s, s + chunk)
                args = (b.input_ids[sl], b.attention_mask[sl], b.position_ids[sl])
                logits, v = self.unwrapped(*args, n_response=n_resp, temperature=self.opts.temperature)
                logps.append(_gather_logp(logits, b.response_ids[sl]))
                values.append(v)
                refs.append(self._ref_logp(*args, b.response_ids[sl], n_resp))
        return torch.cat(logps), torch.cat(refs), torch.cat(values)

    def _ref_logp(self, input_ids, attention_mask, position_ids, response_ids, n_resp):
        if self.ref is not None:
            logits = self.ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=n_resp + 1, use_cache=False).logits
        else:
            policy = self.unwrapped.policy
            with policy.disable_adapter():
                logits = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                logits_to_keep=n_resp + 1, use_cache=False).logits
        return _gather_logp(logits[:, :-1].float() / self.opts.temperature, response_ids)

    def _score(self, scorer, b: _Batch):
        import torch

        with torch.no_grad():
            return scorer(b.prompts, b.prompt_ids, b.response_lists, b.response_texts)

    # --- training ----------------------------------------------------------------------------------------

    def _step_indices(self, step: int) -> list[int]:
        """This process's prompt indices at ``step``: a fresh permutation of the training prompts per epoch,
        a function of (seed, step) only, so a resumed run sees the same prompts."""
        import torch

        n, bsz = len(self.train_idx), self.opts.batch_size
        out = []
        for pos in range((step - 1) * bsz, step * bsz):
            epoch = pos // n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + epoch)
                self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = torch.randperm(n, generator=g).tolist()
            out.append(self.train_idx[self._perms[epoch][pos % n]])
        local = bsz // self.nproc
        return out[self.acc.process_index * local:(self.acc.process_index + 1) * local]

    def _reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        import torch

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], device=self.acc.device)
        t = self.acc.reduce(t, reduction="mean") if self.nproc > 1 else t
        return dict(zip(keys, t.tolist(), strict=True))

    def _reduce_sum(self, t):
        return self.acc.reduce(t, reduction="sum") if self.nproc > 1 else t

    def _reduce_max(self, x: float) -> float:
        import torch

        t = torch.tensor([x], device=self.acc.device)
        return float(self.acc.gather(t).max()) if self.nproc > 1 else x

    def _train(self) -> None:
        opts = self.opts
        self._perms: dict[int, list[int]] = {}
        total = opts.num_steps
        self.bar = progress(total=total, initial=self.start_step, desc="ppo") if self.main else _NullBar()
        self.last_eval: dict | None = None
        if self.start_step == 0:
            self._evaluate(0)
        for step in range(self.start_step + 1, total + 1):
            stats = self._ppo_step(step)
            if self.callback is not None:
                self.callback(dict(stats))
            self._log(stats)
            if step == total or (opts.eval_every and step % opts.eval_every == 0):
                self._evaluate(step)
            if opts.save_every and step % opts.save_every == 0 and step < total:
                self._save_checkpoint(step)
            self.bar.update(1)
            post = {"score": f"{stats['score']:.3g}", "kl": f"{stats['kl']:.3g}"}
            if self.last_eval:
                post["proxy"] = f"{self.last_eval['proxy']:.3g}"
                if self.last_eval.get("gold") is not None:
                    post["gold"] = f"{self.last_eval['gold']:.3g}"
            self.bar.set_postfix(post)
        self.bar.close()

    def _ppo_step(self, step: int) -> dict:
        import torch

        opts, acc = self.opts, self.acc
        t0 = time.perf_counter()
        idx = self._step_indices(step)
        b = self._generate(idx, sample=True, chunk=len(idx))
        micro = opts.mini_batch_size // self.nproc // opts.gradient_accumulation_steps
        old_logp, ref_logp, old_values = self._logprobs_values(b, chunk=micro)
        mask = b.mask
        raw = self._score(self.proxy, b)  # (B,)
        score = raw.clone()
        if opts.missing_eos_penalty is not None:
            score = score - opts.missing_eos_penalty * (~b.ended).float()
        if opts.whiten_rewards:
            self.moments.update(acc.gather(score).tolist() if self.nproc > 1 else score.tolist())
            score = (score - self.moments.mean) / (self.moments.std + 1e-8)
        if opts.reward_clip is not None:
            score = score.clamp(-opts.reward_clip, opts.reward_clip)

        kl_tok = kl_per_token(old_logp, ref_logp, opts.kl_estimator) * mask  # (B, R)
        rewards = -self.kl_ctl.value * kl_tok
        last = mask.sum(1).long() - 1  # index of each response's last token
        rewards[torch.arange(len(idx), device=rewards.device), last] += score
        adv, returns = gae(rewards, old_values, mask, opts.gamma, opts.lam)
        if opts.whiten_advantages:
            sums = self._reduce_sum(torch.stack([(adv * mask).sum(), mask.sum()]))
            mean = sums[0] / sums[1]
            var = self._reduce_sum(((adv - mean) ** 2 * mask).sum()) / sums[1]
            adv = (adv - mean) * torch.rsqrt(var + 1e-8) * mask

        # PPO epochs over shuffled minibatches; each minibatch = gradient_accumulation_steps micro-batches.
        local, mb = len(idx), opts.mini_batch_size // self.nproc
        n_resp = b.response_ids.shape[1]
        acc_stats: dict[str, float] = {}
        n_micro = 0
        first_dev = 0.0
        for epoch in range(opts.ppo_epochs):
            perm = torch.randperm(local).to(acc.device)
            for m_start in range(0, local, mb):
                mb_idx = perm[m_start:m_start + mb]
                for u_start in range(0, mb, micro):
                    sel = mb_idx[u_start:u_start + micro]
                    with acc.accumulate(self.model):
                        logits, values = self.model(b.input_ids[sel], b.attention_mask[sel], b.position_ids[sel],
                                                    n_response=n_resp, temperature=opts.temperature)
                        logp = _gather_logp(logits, b.response_ids[sel])
                        pg_loss, vf_loss, st = ppo_losses(
                            logp, old_logp[sel], adv[sel], values, old_values[sel], returns[sel], mask[sel],
                            opts.cliprange, opts.cliprange_value)
                        loss = pg_loss + opts.vf_coef * vf_loss
                        acc.backward(loss)
                        if acc.sync_gradients and opts.max_grad_norm is not None:
                            acc.clip_grad_norm_(self.model.parameters(), opts.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    with torch.no_grad():
                        probs = logits.softmax(-1)
                        entropy = -(probs * logits.log_softmax(-1)).sum(-1)  # (b, R)
                        st["entropy"] = masked_mean(entropy, mask[sel]).item()
                    st.update(pg_loss=pg_loss.item(), vf_loss=vf_loss.item())
                    if epoch == 0 and m_start == 0:  # before the first optimiser update: ratio must be 1
                        first_dev = max(first_dev, st["ratio_dev"])
                    st.pop("ratio_dev")
                    for k, v in st.items():
                        acc_stats[k] = acc_stats.get(k, 0.0) + v
                    n_micro += 1

        seq_kl = kl_tok.sum(1)  # (B,) KL per response
        stats = {k: v / n_micro for k, v in acc_stats.items()}
        stats.update(
            score=raw.mean().item(),
            shaped_score=score.mean().item(),
            kl=seq_kl.mean().item(),
            non_score_reward=(-self.kl_ctl.value * seq_kl).mean().item(),
            response_length=mask.sum(1).mean().item(),
            ended=b.ended.float().mean().item(),
            values=masked_mean(old_values, mask).item(),
            returns=masked_mean(returns, mask).item(),
        )
        stats = self._reduce_mean(stats)
        stats["ratio_dev_first_minibatch"] = self._reduce_max(first_dev)
        stats["kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(stats["kl"], opts.batch_size)
        stats["seconds"] = time.perf_counter() - t0
        return {"kind": "train", "step": step, **stats}

    # --- evaluation and output -----------------------------------------------------------------------------

    def _evaluate(self, step: int) -> None:
        import torch

        if not self.eval_idx:
            return
        opts, acc = self.opts, self.acc
        local = self.eval_idx[acc.process_index::self.nproc]
        sums = torch.zeros(5, device=acc.device)  # proxy, gold, kl, length, count
        if local:
            devices = [acc.device] if acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(opts.seed + 7919 + acc.process_index)  # same random numbers at every eval
                b = self._generate(local, sample=opts.eval_sampling == "sample", chunk=opts.eval_batch_size)
            logp, ref, _ = self._logprobs_values(b, chunk=opts.eval_batch_size)
            kl = (kl_per_token(logp, ref, opts.kl_estimator) * b.mask).sum(1)
            proxy = self._score(self.proxy, b)
            gold = self._score(self.gold, b) if self.gold is not None else torch.zeros_like(proxy)
            sums += torch.stack([proxy.sum(), gold.sum(), kl.sum(), b.mask.sum(), torch.tensor(float(len(local)),
                                                                                               device=acc.device)])
        sums = self._reduce_sum(sums).tolist()
        n = sums[4]
        rec = {"kind": "eval", "step": step, "proxy": sums[0] / n,
               "gold": sums[1] / n if self.gold is not None else None,
               "kl": sums[2] / n, "response_length": sums[3] / n, "prompts": int(n)}
        self.last_eval = rec
        gold_txt = f", gold {rec['gold']:.4g}" if rec["gold"] is not None else ""
        logger.info("step %d eval: proxy %.4g%s, KL %.4g, length %.1f", step, rec["proxy"], gold_txt, rec["kl"],
                    rec["response_length"])
        self._log(rec)

    def _log(self, record: dict) -> None:
        if self.main:
            with (self.out / METRICS).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _finish(self) -> None:
        acc, opts = self.acc, self.opts
        lora = bool(opts.lora_rank)
        state_dict = None if lora else acc.get_state_dict(self.model)  # collective under ZeRO-3 / FSDP
        if self.main:
            from transformers import AutoTokenizer

            policy_dir = self.out / "policy"
            shutil.rmtree(policy_dir, ignore_errors=True)
            policy = self.unwrapped.policy
            if lora:
                adapter_dir = self.out / "adapter"
                shutil.rmtree(adapter_dir, ignore_errors=True)
                policy.save_pretrained(str(adapter_dir))
                policy.merge_and_unload().save_pretrained(str(policy_dir))
            else:
                sd = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
                policy.save_pretrained(str(policy_dir), state_dict=sd)
            AutoTokenizer.from_pretrained(self.policy_src).save_pretrained(str(policy_dir))
            records = read_metrics(self.out / METRICS)
            plot_metrics(records, self.out / PLOT)
            summary = summarize(records, opts.num_steps)
            summary["critic_init"] = self.critic_init
            write_json(self.out / SUMMARY, summary)
            shutil.rmtree(self.out / CHECKPOINT, ignore_errors=True)
            (self.out / INCOMPLETE).unlink(missing_ok=True)  # last: the folder is now a finished run
            logger.info("PPO finished: %s", self.out)
        acc.wait_for_everyone()


class _NullBar:
    """Stands in for the progress bar on processes other than the main one."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, *args, **kwargs) -> None: ...

    def close(self) -> None: ...


def _gather_logp(logits, ids):
    """log p(ids) under ``logits`` (B, R, V) -> (B, R)."""
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
