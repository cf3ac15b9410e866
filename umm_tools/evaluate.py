"""Accuracy of any one-output sequence-classification reward model on preference pairs (``umm eval``).

A pair is correct when the model gives the chosen response a higher reward than the rejected one; a tie
(exactly equal rewards) counts as half a correct pair. The 95% confidence interval is the Wilson score
interval of that accuracy over the n pairs. Works for dense RMs, umm's Qwen2-MoE RMs and third-party RMs
alike: anything ``AutoModelForSequenceClassification`` loads with ``num_labels == 1``.

:func:`score_batches` (and :func:`score_pairs`, :func:`score_texts`) are the scoring loop the other stages
reuse (learn-merge, the demo).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from umm_tools.data import PairOptions, is_local_file, iter_pair_batches, load_pairs, pad_sequences
from umm_tools.errors import UmmError
from umm_tools.utils import progress, write_json

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

logger = logging.getLogger(__name__)

TIE_RULE = "a tie (equal rewards) counts as half a correct pair"
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class EvalOptions(PairOptions):
    """Options of ``umm eval``: how the pairs are read (every :class:`~umm_tools.data.PairOptions` field, flat:
    ``split``, ``max_length``, column names, ...) plus how they are scored."""

    batch_size: int = Field(8, ge=1, description="Pairs per forward pass (each pass scores 2 x batch_size sequences).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run: 'auto' takes CUDA when present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype: 'auto' is float32 on CPU and the checkpoint's own dtype on CUDA (float32 if "
        "it records none). Rewards are compared in float32 either way.",
    )
    output: str | None = Field(None, description="Write the result as JSON to this file (atomically).")


# ---------------------------------------------------------------------------------------------------------
# Entry point


def evaluate(model: str, data: str, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Score every pair of ``data`` with the reward model ``model`` (folder or Hub id); return the report.

    The report holds ``n_pairs``, ``accuracy`` (ties count half), ``ci95`` (Wilson), ``wins`` / ``ties`` /
    ``losses``, ``mean_margin`` (chosen minus rejected reward), ``per_subset`` (empty without a subset
    column) and ``data_stats`` (rows read, skipped, truncated, dropped). See :func:`format_report`.
    """
    opts = opts or EvalOptions()
    started = time.perf_counter()
    rm, tokenizer = load_reward_model(model, device=opts.device, dtype=opts.dtype)
    pad_id = reward_pad_token_id(rm, tokenizer)

    positions = getattr(rm.config.get_text_config(), "max_position_embeddings", None)
    max_length = opts.max_length
    if positions and (max_length is None or max_length > positions):
        logger.info("%s: max_length limited to the model's %d positions", model, positions)
        max_length = positions
    pairs, stats = load_pairs(data, tokenizer, opts.model_copy(update={"max_length": max_length}))

    chosen, rejected = score_pairs(rm, pairs, opts.batch_size, pad_id)
    result: dict[str, Any] = {
        "model": model,
        "data": data,
        "split": None if is_local_file(data) else opts.split,
        **pairwise_accuracy(chosen, rejected),
        "mean_chosen_reward": chosen.mean().item(),
        "mean_rejected_reward": rejected.mean().item(),
        "tie_rule": TIE_RULE,
        "interval": "95% Wilson score interval",
        "per_subset": {},
        "data_stats": stats.to_dict(),
        "device": str(next(rm.parameters()).device),
        "dtype": str(next(rm.parameters()).dtype).removeprefix("torch."),
        "batch_size": opts.batch_size,
        "max_length": max_length,
    }
    if "subset" in pairs.column_names:
        import torch

        subsets = pairs["subset"]
        for name in sorted(set(subsets)):
            idx = torch.tensor([i for i, s in enumerate(subsets) if s == name])
            result["per_subset"][name] = pairwise_accuracy(chosen[idx], rejected[idx])
    result["seconds"] = round(time.perf_counter() - started, 3)
    if opts.output:
        write_json(opts.output, result)
        logger.info("wrote %s", opts.output)
    return result


# ---------------------------------------------------------------------------------------------------------
# Model loading and scoring (reused by learn-merge and the demo)


def reward_model_config(model: str) -> Any:
    """The config of ``model`` (folder or Hub id), checked to be a one-output sequence-classification RM.

    Raises :class:`UmmError` when it cannot be read, names another kind of model (e.g. a causal LM, whose
    reward head would be random), or has ``num_labels != 1``. Reads no weights.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:  # OSError (missing folder/repo), ValueError (unknown model type), network errors
        raise UmmError(f"could not read the model config of {model!r}: {type(e).__name__}: {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UmmError(
            f"{model} is a {', '.join(archs)}, not a sequence-classification reward model; train a reward "
            "model from it first (umm train) or pass a reward-model checkpoint."
        )
    if config.num_labels != 1:
        raise UmmError(
            f"{model} has num_labels={config.num_labels}; a reward model gives one score per sequence "
            "(num_labels=1). Pass a reward-model checkpoint."
        )
    return config


def load_reward_model(model: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """Load a one-output sequence-classification RM and its tokenizer (folder or Hub id), in eval mode.

    Refuses with :class:`UmmError` what :func:`reward_model_config` refuses, and a checkpoint that lacks
    weights of the model (its score head would be random). ``device``: auto | cpu | cuda; ``dtype``: see
    :class:`EvalOptions`.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = reward_model_config(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UmmError("device 'cuda' was asked for, but torch sees no CUDA device; use device 'cpu' or 'auto'.")
    torch_dtype = _resolve_dtype(dtype, device, config)

    try:
        rm, info = AutoModelForSequenceClassification.from_pretrained(
            model, dtype=torch_dtype, output_loading_info=True
        )
    except ValueError as e:  # "Unrecognized configuration class ... for AutoModelForSequenceClassification"
        raise UmmError(f"{model} cannot be loaded as a sequence-classification model: {e}") from e
    except OSError as e:
        raise UmmError(f"could not load the weights of {model!r}: {e}") from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UmmError(
            f"{model} lacks weights the reward model needs ({', '.join(sorted(missing)[:5])}); they would be "
            "random. Pass a trained reward-model checkpoint."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise UmmError(f"could not load the tokenizer of {model!r}: {type(e).__name__}: {e}") from e
    rm.to(device)
    rm.eval()
    return rm, tokenizer


def _resolve_dtype(dtype: str, device: str, config: Any) -> torch.dtype:
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in (torch.bfloat16, torch.float16) else torch.float32


def reward_pad_token_id(model: Any, tokenizer: Any) -> int:
    """The pad id to batch with: the model's own (it locates each sequence's last token by it), else the
    tokenizer's pad or EOS id, which is then set on the model's config."""
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is not None:
        return int(text_config.pad_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UmmError(
            "neither the model nor its tokenizer defines a pad or EOS token; set pad_token_id in config.json."
        )
    logger.info("the model config has no pad_token_id; using the tokenizer's %d", pad)
    text_config.pad_token_id = int(pad)
    return int(pad)


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[Any]:
    """Eval mode and no gradients for the block; the model's train/eval mode is restored afterwards.
    Yields the model's device."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _rewards(model: Any, batch: dict[str, torch.Tensor], device: Any) -> torch.Tensor:
    """One forward pass: the reward of each row of ``batch``, float32 on the CPU, shape (N,)."""
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    logits = out.logits  # (N, 1)
    if logits.shape[-1] != 1:
        raise UmmError(f"the model gives {logits.shape[-1]} scores per sequence; a reward model gives 1.")
    return logits[:, 0].float().cpu()


def score_batches(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], *, total: int | None = None, desc: str = "scoring"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of batches laid out as :func:`umm_tools.data.iter_pair_batches` yields them (chosen rows
    first, then rejected), with a progress bar.

    Runs in eval mode under ``torch.no_grad`` on the model's device (its train/eval mode is restored
    afterwards). Returns ``(chosen_rewards, rejected_rewards)``, float32 CPU tensors of shape (N,).
    """
    import torch

    chosen, rejected = [], []
    with _inference(model) as device:
        for batch in progress(batches, total=total, desc=desc):
            if batch["input_ids"].shape[0] % 2:
                raise ValueError(f"a pair batch has an even number of rows, got {batch['input_ids'].shape[0]}")
            rewards = _rewards(model, batch, device)  # (2B,)
            half = rewards.shape[0] // 2
            chosen.append(rewards[:half])
            rejected.append(rewards[half:])
    if not chosen:
        return torch.empty(0), torch.empty(0)
    return torch.cat(chosen), torch.cat(rejected)


def score_pairs(
    model: Any, pairs: Dataset, batch_size: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards) of a dataset from :func:`umm_tools.data.load_pairs`, in its order."""
    batches = iter_pair_batches(pairs, batch_size, pad_token_id)
    return score_batches(model, batches, total=math.ceil(len(pairs) / batch_size), desc="scoring pairs")


def score_texts(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 8,
    max_length: int | None = None,
    add_eos: bool = True,
) -> torch.Tensor:
    """Rewards of whole texts, tokenised as :mod:`umm_tools.data` tokenises plain-text pairs (special tokens;
    EOS appended when ``add_eos``; the first ``max_length`` tokens kept). Float32 CPU tensor of shape (N,)."""
    import torch

    pad_id = reward_pad_token_id(model, tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id if add_eos else None
    if eos is not None:
        ids = [s if s and s[-1] == eos else [*s, eos] for s in ids]
    if max_length is not None:
        ids = [s[:max_length] for s in ids]
    rewards = []
    with _inference(model) as device:
        starts = range(0, len(ids), batch_size)
        for i in progress(starts, total=len(starts), desc="scoring texts"):
            rewards.append(_rewards(model, pad_sequences(ids[i : i + batch_size], pad_id), device))
    return torch.cat(rewards) if rewards else torch.empty(0)


# ---------------------------------------------------------------------------------------------------------
# Statistics and the report


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may be fractional)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return (max(0.0, center - half), min(1.0, center + half))


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, Any]:
    """n_pairs, wins / ties / losses, accuracy (ties count half), its 95% Wilson interval, mean margin."""
    n = int(chosen.numel())
    wins = int((chosen > rejected).sum())
    ties = int((chosen == rejected).sum())
    accuracy = (wins + 0.5 * ties) / n if n else float("nan")
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return {
        "n_pairs": n,
        "accuracy": accuracy,
        "ci95": [lo, hi],
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "mean_margin": (chosen - rejected).mean().item() if n else float("nan"),
    }


def format_report(result: dict[str, Any]) -> str:
    """The result of :func:`evaluate` as a small table for the screen."""
    stats = result.get("data_stats") or {}
    skipped = sum((stats.get("bad_rows") or {}).values())
    dropped = sum(stats.get(k, 0) for k in
                  ("dropped_too_long", "dropped_prompt_too_long", "dropped_identical_after_truncation"))
    lo, hi = result["ci95"]
    lines = [
        f"model     {result['model']}",
        f"data      {stats.get('source', result['data'])}: {result['n_pairs']} pairs; "
        f"{skipped} bad rows skipped, {stats.get('truncated', 0)} truncated, {dropped} dropped",
        f"accuracy  {result['accuracy']:.4f}   95% CI [{lo:.4f}, {hi:.4f}] (Wilson)",
        f"          {result['wins']} right, {result['ties']} ties, {result['losses']} wrong; {TIE_RULE}",
        f"margin    {result['mean_margin']:+.4f} mean (chosen - rejected reward)",
    ]
    per_subset = result.get("per_subset") or {}
    if per_subset:
        width = max(6, *(len(name) for name in per_subset))
        lines += ["", f"{'subset':<{width}}  {'pairs':>6}  {'accuracy':>8}  {'95% CI':<14}  {'margin':>8}"]
        for name, r in per_subset.items():
            ci = "[{:.3f}, {:.3f}]".format(*r["ci95"])
            lines.append(
                f"{name:<{width}}  {r['n_pairs']:>6}  {r['accuracy']:>8.4f}  {ci:<14}  {r['mean_margin']:>+8.4f}"
            )
    return "\n".join(lines)
