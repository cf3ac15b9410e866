"""Preference pairs: load, normalise formats, tokenize for trl's ``RewardTrainer``, and batch for our loops.

Sources: a Hub dataset id (``owner/name``, with ``data_config`` and ``split``) or a local folder, both read
through ``datasets.load_dataset``; or a local ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, read here
row by row so that a malformed row is reported by its line instead of failing the whole file.

Formats (``PairOptions.format``; ``auto`` looks at the first row that has a ``chosen`` value):

- ``explicit``: ``prompt``, ``chosen`` and ``rejected`` strings. The sequence scored is
  ``prompt + response``, with ``prompt_separator`` in between when neither side has whitespace at the join.
- ``implicit``: ``chosen`` and ``rejected`` are whole dialogues sharing a prefix (Anthropic HH-RLHF's
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is the common prefix up to its last
  ``"\\n\\nAssistant:"``, or else the longest common prefix that ends at a word boundary.
- ``conversational``: ``chosen`` and ``rejected`` are lists of ``{"role", "content"}`` messages
  (UltraFeedback-binarized), optionally with a ``prompt`` column that is a string or a message list. Rendered
  with the tokenizer's chat template; a tokenizer without one gets plain ``role: content`` lines (logged).

What comes out (:func:`load_pairs`, :func:`load_preference_data`) is a ``datasets.Dataset`` with the columns

- ``chosen_ids``, ``rejected_ids``: token ids of the whole prompt+response sequence. These are the names trl
  1.16's ``RewardTrainer`` recognises as already tokenised: it then skips its own EOS-adding and
  tokenisation and feeds them to its ``DataCollatorForPreference`` as they are (only its own
  ``max_length`` filter still runs: give it a ``max_length`` no smaller than ours, or ``None``).
- ``prompt``, ``chosen``, ``rejected``: the texts, for reports (conversational pairs: the rendered texts;
  the ids may be truncated, the texts never are);
- ``subset``: present when the data has a subset column, for per-subset reports.

Plain-text sequences are tokenised with the tokenizer's special tokens (BOS where it adds one) and end with
its EOS token (``add_eos``), as trl does; chat-template renderings are tokenised as rendered.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from umm_tools.config import Options
from umm_tools.errors import UmmError
from umm_tools.utils import progress

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_SUFFIXES_TEXT = ".jsonl, .json, .parquet or .csv"
ASSISTANT_MARKER = "\n\nAssistant:"
# How many bad rows a log line or an error message lists.
_SHOWN_BAD_ROWS = 5
# Texts per tokenizer call: big enough for the fast tokenizer's batching, small enough for a live bar.
_TOKENIZE_CHUNK = 1000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class PairOptions(Options):
    """How one source of preference pairs is read and tokenised (also the data half of ``EvalOptions``)."""

    format: Literal["auto", "explicit", "implicit", "conversational"] = Field(
        "auto",
        description="Pair format: 'explicit' (prompt/chosen/rejected strings), 'implicit' (chosen and rejected "
        "are whole dialogues sharing a prompt prefix, as in HH-RLHF), 'conversational' (lists of "
        "{role, content} messages), or 'auto' to detect it from the first row.",
    )
    prompt_column: str = Field("prompt", description="Column holding the prompt (explicit and conversational).")
    chosen_column: str = Field("chosen", description="Column holding the preferred response or dialogue.")
    rejected_column: str = Field("rejected", description="Column holding the dispreferred response or dialogue.")
    subset_column: str | None = Field(
        None,
        description="Column naming each pair's subset or source, carried through for per-subset reports. "
        "Unset: a column named 'subset' is used when there is one.",
    )
    max_length: int | None = Field(
        1024, ge=2, description="Most tokens of a whole prompt+response sequence; null for no limit."
    )
    over_length: Literal["truncate", "drop"] = Field(
        "truncate",
        description="A pair longer than max_length: 'truncate' keeps the prompt and cuts response tokens from "
        "the end; 'drop' skips the pair. Either way it is counted. A pair whose prompt alone takes max_length "
        "tokens or more is always dropped and counted.",
    )
    add_eos: bool = Field(
        True, description="End plain-text sequences with the tokenizer's EOS token, as trl's RewardTrainer does."
    )
    prompt_separator: str = Field(
        " ",
        description="Text put between an explicit prompt and its response when neither has whitespace at the "
        "join (plain-text pairs only).",
    )
    bad_row_threshold: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of unusable rows (missing field, empty or non-string text, chosen identical "
        "to rejected) that is skipped with a warning; above it loading stops with the first bad rows listed.",
    )
    data_config: str | None = Field(None, description="Configuration name of a Hub dataset (load_dataset's name).")
    split: str = Field("train", description="Split of a Hub dataset or folder to read (a local file has one split).")
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows of each source (a quick trial).")


class DataOptions(PairOptions):
    """Training data: how pairs are read (:class:`PairOptions`) and where the evaluation pairs come from."""

    eval_data: str | None = Field(
        None, description="Separate evaluation data: a Hub dataset id or a local file, read like the training data."
    )
    eval_split: str | None = Field(
        None, description="Split to evaluate on: of eval_data if given, else of the training Hub dataset."
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of the pairs held out for evaluation (seeded by 'seed'); 0 for none."
    )
    seed: int = Field(0, description="Seed of the eval_fraction hold-out.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataOptions:
        if self.eval_fraction > 0 and (self.eval_data or self.eval_split):
            raise ValueError("give eval_fraction or eval_data/eval_split, not both")
        return self


@dataclass
class DataStats:
    """What happened to one source's rows; ``to_dict()`` goes into metrics.json."""

    source: str
    format: str = ""
    rows_read: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)  # reason -> count
    bad_row_examples: list[str] = field(default_factory=list)  # "line 7: 'chosen' is empty"
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_prompt_too_long: int = 0
    dropped_identical_after_truncation: int = 0
    held_out_for_eval: int = 0
    pairs: int = 0  # pairs in the returned dataset(s)

    @property
    def n_bad(self) -> int:
        return sum(self.bad_rows.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.rows_read} rows read ({self.format})", f"{self.pairs} pairs kept"]
        if self.n_bad:
            parts.append(f"{self.n_bad} bad rows skipped ({', '.join(f'{k}: {v}' for k, v in self.bad_rows.items())})")
        for name in ("truncated", "dropped_too_long", "dropped_prompt_too_long",
                     "dropped_identical_after_truncation", "held_out_for_eval"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        return f"{self.source}: " + "; ".join(parts)


@dataclass
class PreferenceData:
    """Training pairs, evaluation pairs (or None) and what loading them counted."""

    train: Dataset
    eval: Dataset | None
    train_stats: DataStats
    eval_stats: DataStats | None = None  # only when the eval pairs come from their own source

    @property
    def stats(self) -> dict[str, Any]:
        """Everything counted, as plain JSON for metrics.json."""
        return {
            "train_pairs": len(self.train),
            "eval_pairs": len(self.eval) if self.eval is not None else 0,
            "train": self.train_stats.to_dict(),
            "eval": self.eval_stats.to_dict() if self.eval_stats is not None else None,
        }


# ---------------------------------------------------------------------------------------------------------
# Entry points


def load_preference_data(source: str, tokenizer: Any, opts: DataOptions | None = None) -> PreferenceData:
    """Load, normalise and tokenise the training pairs of ``source`` and the evaluation pairs, if any.

    Evaluation pairs come from ``opts.eval_data`` / ``opts.eval_split``, or are a seeded ``eval_fraction``
    of the training pairs, or there are none. Raises :class:`UmmError` for anything the user can fix.
    """
    opts = opts or DataOptions()
    train, train_stats = load_pairs(source, tokenizer, opts)
    eval_ds, eval_stats = None, None
    if opts.eval_data or opts.eval_split:
        eval_source = opts.eval_data or source
        eval_split = opts.eval_split or opts.split
        if not opts.eval_data and is_local_file(source):
            raise UmmError(
                f"eval_split={opts.eval_split!r}: {source} is a local file and has no splits; pass the evaluation "
                "file with eval_data, or hold out a share of the pairs with eval_fraction."
            )
        if eval_source == source and eval_split == opts.split:
            raise UmmError(
                f"the evaluation data is the training data ({source}, split {eval_split!r}); choose another "
                "eval_split or eval_data, or use eval_fraction."
            )
        eval_ds, eval_stats = load_pairs(eval_source, tokenizer, opts, split=eval_split)
    elif opts.eval_fraction > 0:
        train, eval_ds = split_eval(train, opts.eval_fraction, opts.seed, what=source)
        train_stats.held_out_for_eval = len(eval_ds)
        train_stats.pairs = len(train)
    return PreferenceData(train=train, eval=eval_ds, train_stats=train_stats, eval_stats=eval_stats)


def load_pairs(
    source: str, tokenizer: Any, opts: PairOptions | None = None, split: str | None = None
) -> tuple[Dataset, DataStats]:
    """Read one source (``split`` of a Hub dataset; default ``opts.split``) into a tokenised pair dataset.

    Bad rows are skipped and counted; above ``opts.bad_row_threshold`` of the rows they stop the load with
    a :class:`UmmError` that lists the first ones. Over-long pairs are truncated or dropped and counted.
    """
    opts = opts or PairOptions()
    split = split or opts.split
    label, records, columns = _read_source(source, opts, split)
    stats = DataStats(source=label, rows_read=len(records))
    if not records:
        raise UmmError(f"{label} holds no rows; give a file with prompt/chosen/rejected pairs.")

    fmt = _detect_format(records, columns, opts, label)
    stats.format = fmt
    subset_col = _subset_column(columns, opts, label)
    chat = fmt == "conversational" and bool(getattr(tokenizer, "chat_template", None))
    if fmt == "conversational" and not chat:
        logger.warning(
            "%s: the tokenizer has no chat template; conversations are rendered as plain 'role: content' "
            "lines. Give a tokenizer with a chat template to score them the way the model was trained.", label
        )

    pairs: list[_Pair] = []
    bad: list[tuple[str, str, str]] = []  # (where, reason, detail)
    for rec in records:
        if rec.problem is not None:
            bad.append((rec.where, "malformed", rec.problem))
            continue
        try:
            pair = _normalise(rec.row, fmt, opts, tokenizer if chat else None)
        except _BadRow as e:
            bad.append((rec.where, e.reason, e.detail))
            continue
        if subset_col is not None:
            value = rec.row.get(subset_col)
            pair.subset = "(none)" if value is None else str(value)
        pairs.append(pair)
    _check_bad_rows(bad, stats, opts, label)
    if not pairs:
        raise UmmError(f"{label}: none of its {stats.rows_read} rows is a usable pair; first: "
                       f"{'; '.join(stats.bad_row_examples)}.")

    ds = _tokenize_pairs(pairs, tokenizer, opts, stats, plain=not chat, with_subset=subset_col is not None)
    stats.pairs = len(ds)
    if len(ds) == 0:
        raise UmmError(
            f"{label}: no pair is left after the length limit ({stats.summary()}); raise max_length "
            f"(now {opts.max_length}) or use over_length='truncate'."
        )
    logger.info("%s", stats.summary())
    return ds, stats


def split_eval(dataset: Dataset, fraction: float, seed: int, what: str = "data") -> tuple[Dataset, Dataset]:
    """Hold out ``fraction`` of the pairs (at least one) for evaluation; the same seed gives the same split."""
    import numpy as np

    n = len(dataset)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise UmmError(f"{what}: eval_fraction={fraction} of {n} pairs leaves none to train on; lower it.")
    order = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = sorted(order[:n_eval].tolist()), sorted(order[n_eval:].tolist())
    return dataset.select(train_idx), dataset.select(eval_idx)


def iter_pair_batches(
    dataset: Dataset | Sequence[dict[str, Any]],
    batch_size: int,
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of pairs for scoring, in dataset order.

    ``dataset`` has ``chosen_ids`` and ``rejected_ids`` (what :func:`load_pairs` returns, or a list of such
    dicts). Each batch is ``{"input_ids", "attention_mask"}``, both int64 of shape (2B, T): rows ``0..B-1``
    are the chosen sequences of pairs ``i..i+B-1`` and rows ``B..2B-1`` their rejected sequences in the same
    order, so ``rewards.chunk(2)`` gives (chosen, rejected) — the layout of trl's
    ``DataCollatorForPreference``. T is the batch's longest sequence; padding (``pad_token_id``, mask 0)
    goes on ``padding_side``. The last batch may hold fewer than ``batch_size`` pairs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns(["chosen_ids", "rejected_ids"])
    for start in range(0, len(dataset), batch_size):
        chunk = dataset[start : start + batch_size]
        if isinstance(chunk, dict):  # a datasets.Dataset slice: columns of lists
            chosen, rejected = chunk["chosen_ids"], chunk["rejected_ids"]
        else:
            chosen = [row["chosen_ids"] for row in chunk]
            rejected = [row["rejected_ids"] for row in chunk]
        yield collate_pairs(chosen, rejected, pad_token_id, padding_side)


def collate_pairs(
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """One padded batch, chosen rows first: ``input_ids`` / ``attention_mask`` of shape (2B, T)."""
    if len(chosen_ids) != len(rejected_ids):
        raise ValueError(f"{len(chosen_ids)} chosen but {len(rejected_ids)} rejected sequences")
    return pad_sequences([*chosen_ids, *rejected_ids], pad_token_id, padding_side)


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_token_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor]:
    """Token id lists -> ``input_ids`` / ``attention_mask``, int64 of shape (N, longest)."""
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        input_ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        attention_mask[i, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------------------
# Reading sources


@dataclass
class _Record:
    where: str  # "line 7" (jsonl, csv), "record 7" (json), "row 7" (parquet, Hub): 1-based
    row: dict[str, Any] | None
    problem: str | None = None  # set when the record itself could not be read


def is_local_file(source: str) -> bool:
    """Whether ``source`` names a local data file (existing, or by its suffix), not a folder or Hub id."""
    return Path(source).expanduser().is_file() or source.lower().endswith(LOCAL_SUFFIXES)


def _looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(LOCAL_SUFFIXES) and ".." not in source


def _read_source(source: str, opts: PairOptions, split: str) -> tuple[str, list[_Record], list[str]]:
    """(label for messages, records, column names) of a local file, a folder or a Hub dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise UmmError(
                f"{path}: unsupported data file type {suffix or '(none)'}; use a {_SUFFIXES_TEXT} file."
            )
        try:
            if suffix == ".parquet":
                records = _read_parquet(path)
            elif suffix == ".csv":
                records = _read_csv(path)
            else:
                records = _read_json(path, suffix)
        except UnicodeDecodeError as e:
            raise UmmError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8.") from e
        label = str(path)
    elif path.is_dir() or _looks_like_hub_id(source):
        records = _read_with_datasets(source, opts.data_config, split)
        label = f"{source} (split {split})" if not opts.data_config else f"{source} ({opts.data_config}, split {split})"
    else:
        raise UmmError(
            f"data not found: {source} is not a file or folder, and not a Hub dataset id (owner/name); "
            f"check the path. Local files may be {_SUFFIXES_TEXT}."
        )
    if opts.max_rows is not None:
        records = records[: opts.max_rows]
    columns: dict[str, None] = {}
    for rec in records:
        if rec.row is not None:
            columns.update(dict.fromkeys(rec.row))
    return label, records, list(columns)


def _read_json(path: Path, suffix: str) -> list[_Record]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first key
    if suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines under a .json name; read below
        if isinstance(data, dict):
            data = _records_of_json_object(data, path)
        if isinstance(data, list):
            return [
                _Record(f"record {i}", r) if isinstance(r, dict)
                else _Record(f"record {i}", None, f"not a JSON object ({type(r).__name__})")
                for i, r in enumerate(data, 1)
            ]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(_Record(f"line {lineno}", None, f"not valid JSON ({e.msg})"))
            continue
        if isinstance(row, dict):
            records.append(_Record(f"line {lineno}", row))
        else:
            records.append(_Record(f"line {lineno}", None, f"not a JSON object ({type(row).__name__})"))
    return records


def _records_of_json_object(data: dict[str, Any], path: Path) -> list[Any]:
    """A JSON object holding the rows: ``{"data": [rows]}`` or columns ``{"chosen": [...], ...}``."""
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
        return next(iter(lists.values()))
    if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
        keys = list(lists)
        return [dict(zip(keys, values, strict=True)) for values in zip(*lists.values(), strict=True)]
    raise UmmError(
        f"{path}: expected a list of rows, an object with one list of rows, or an object of equal-length "
        f"columns; found an object with keys {list(data)[:10]}."
    )


def _read_csv(path: Path) -> list[_Record]:
    records = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                row.pop(None, None)  # cells beyond the header
                records.append(_Record(f"line {reader.line_num}", row))
        except csv.Error as e:
            raise UmmError(f"{path}: line {reader.line_num} is not valid CSV ({e}).") from e
    return records


def _read_parquet(path: Path) -> list[_Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UmmError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e}).") from e
    return [_Record(f"row {i}", r) for i, r in enumerate(rows, 1)]


def _read_with_datasets(source: str, data_config: str | None, split: str) -> list[_Record]:
    import datasets

    try:
        ds = datasets.load_dataset(source, name=data_config, split=split)
    except Exception as e:  # network, missing repo, unknown config or split: all end with the same advice
        raise UmmError(
            f"could not load the dataset {source!r} (config {data_config!r}, split {split!r}): "
            f"{type(e).__name__}: {str(e).rstrip('.')}. Check the id, data_config and split; without network "
            f"access, download the data elsewhere and pass a local {_SUFFIXES_TEXT} file instead."
        ) from e
    return [_Record(f"row {i}", r) for i, r in enumerate(ds, 1)]


# ---------------------------------------------------------------------------------------------------------
# Formats


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Pair:
    prompt: str  # texts for reports
    chosen: str
    rejected: str
    full_chosen: str  # exactly the texts that are tokenised
    full_rejected: str
    subset: str | None = None


def _detect_format(records: list[_Record], columns: list[str], opts: PairOptions, label: str) -> str:
    for col, option in ((opts.chosen_column, "chosen_column"), (opts.rejected_column, "rejected_column")):
        if col not in columns:
            raise UmmError(
                f"{label}: no column {col!r}; the columns are {columns}. Name the right one with {option}."
            )
    has_prompt = opts.prompt_column in columns
    if opts.format == "explicit" and not has_prompt:
        raise UmmError(
            f"{label}: format 'explicit' needs a prompt column, but there is no column {opts.prompt_column!r} "
            f"(columns: {columns}); name it with prompt_column, or use format 'implicit'."
        )
    if opts.format != "auto":
        return opts.format
    for rec in records:
        value = rec.row.get(opts.chosen_column) if rec.row else None
        if isinstance(value, list):
            return "conversational"
        if isinstance(value, str):
            return "explicit" if has_prompt else "implicit"
    return "explicit" if has_prompt else "implicit"  # no usable row: they will all be reported as bad


def _subset_column(columns: list[str], opts: PairOptions, label: str) -> str | None:
    if opts.subset_column is None:
        return "subset" if "subset" in columns else None
    if opts.subset_column not in columns:
        raise UmmError(f"{label}: no subset column {opts.subset_column!r}; the columns are {columns}.")
    return opts.subset_column


def _text(row: dict[str, Any], column: str, allow_empty: bool = False) -> str:
    if column not in row or row[column] is None:
        raise _BadRow("missing_field", f"missing field {column!r}")
    value = row[column]
    if not isinstance(value, str):
        raise _BadRow("not_text", f"{column!r} is not a string ({type(value).__name__})")
    if not allow_empty and not value.strip():
        raise _BadRow("empty_text", f"{column!r} is empty")
    return value


def _normalise(row: dict[str, Any], fmt: str, opts: PairOptions, chat_tokenizer: Any) -> _Pair:
    """One row -> a pair of texts to tokenise; raises _BadRow with the reason when it is unusable."""
    if fmt == "conversational":
        return _normalise_conversation(row, opts, chat_tokenizer)
    chosen = _text(row, opts.chosen_column)
    rejected = _text(row, opts.rejected_column)
    if fmt == "explicit":
        prompt = _text(row, opts.prompt_column, allow_empty=True)
        if chosen.strip() == rejected.strip():
            raise _BadRow("identical", "chosen is identical to rejected")

        def join(response: str) -> str:
            if prompt and not prompt[-1].isspace() and not response[0].isspace():
                return prompt + opts.prompt_separator + response
            return prompt + response

        return _Pair(prompt, chosen, rejected, join(chosen), join(rejected))
    if chosen.strip() == rejected.strip():
        raise _BadRow("identical", "chosen is identical to rejected")
    cut = implicit_prompt_length(chosen, rejected)
    return _Pair(chosen[:cut], chosen[cut:], rejected[cut:], chosen, rejected)


def implicit_prompt_length(chosen: str, rejected: str) -> int:
    """Characters of the prompt two whole dialogues share (HH-RLHF style), leaving both responses non-empty.

    The end of the last ``"\\n\\nAssistant:"`` in their common prefix, else the longest common prefix that
    ends at a word boundary (0 when they share no whole word).
    """
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1

    def both_respond(cut: int) -> bool:
        return bool(chosen[cut:].strip()) and bool(rejected[cut:].strip())

    marker = chosen.rfind(ASSISTANT_MARKER, 0, common)
    while marker >= 0 and marker + len(ASSISTANT_MARKER) <= common:
        cut = marker + len(ASSISTANT_MARKER)
        if both_respond(cut):
            return cut
        marker = chosen.rfind(ASSISTANT_MARKER, 0, marker)

    def at_boundary(text: str, cut: int) -> bool:
        return cut == len(text) or text[cut].isspace() or text[cut - 1].isspace()

    for cut in range(common, 0, -1):
        if at_boundary(chosen, cut) and at_boundary(rejected, cut) and both_respond(cut):
            return cut
    return 0


def _messages(row: dict[str, Any], column: str) -> list[dict[str, str]]:
    if column not in row or row[column] is None:
        raise _BadRow("missing_field", f"missing field {column!r}")
    value = row[column]
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise _BadRow("bad_messages", f"{column!r} is not a list of {{role, content}} messages with string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _same_messages(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and x["content"].strip() == y["content"].strip() for x, y in zip(a, b, strict=True)
    )


def _normalise_conversation(row: dict[str, Any], opts: PairOptions, chat_tokenizer: Any) -> _Pair:
    chosen = _messages(row, opts.chosen_column)
    rejected = _messages(row, opts.rejected_column)
    raw_prompt = row.get(opts.prompt_column)
    if isinstance(raw_prompt, str):
        prompt = [{"role": "user", "content": raw_prompt}] if raw_prompt.strip() else []
    elif raw_prompt is None:
        prompt = []
    else:
        prompt = _messages(row, opts.prompt_column)
    if prompt:
        # UltraFeedback-binarized repeats the prompt at the head of chosen and rejected: strip it there.
        n = len(prompt)
        if _same_messages(chosen[:n], prompt) and _same_messages(rejected[:n], prompt):
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and _same_messages(chosen[n : n + 1], rejected[n : n + 1]):
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise _BadRow("empty_text", f"{name!r} has no response after the prompt")
    if _same_messages(chosen, rejected):
        raise _BadRow("identical", "chosen is identical to rejected")

    try:
        full_c = _render(chat_tokenizer, prompt + chosen)
        full_r = _render(chat_tokenizer, prompt + rejected)
        candidates = [_render(chat_tokenizer, prompt, True), _render(chat_tokenizer, prompt)] if prompt else [""]
    except Exception as e:  # jinja raises TemplateError (and others) for conversations a template refuses
        raise _BadRow("chat_template_error", f"the chat template failed: {type(e).__name__}: {e}") from e
    prompt_text = next((p for p in candidates if full_c.startswith(p) and full_r.startswith(p)), None)
    if prompt_text is None:  # a template that renders the prompt differently alone: use the shared prefix
        prompt_text = full_c[: implicit_prompt_length(full_c, full_r)]
    cut = len(prompt_text)
    return _Pair(prompt_text, full_c[cut:], full_r[cut:], full_c, full_r)


def _render(chat_tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """The chat template's text, or without one, plain ``role: content`` lines."""
    if chat_tokenizer is not None:
        return chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if generation_prompt else "")


# ---------------------------------------------------------------------------------------------------------
# Bad rows, tokenisation, length


def _check_bad_rows(bad: list[tuple[str, str, str]], stats: DataStats, opts: PairOptions, label: str) -> None:
    if not bad:
        return
    stats.bad_rows = dict(Counter(reason for _, reason, _ in bad))
    stats.bad_row_examples = [f"{where}: {detail}" for where, _, detail in bad[:_SHOWN_BAD_ROWS]]
    share = len(bad) / stats.rows_read
    shown = "; ".join(stats.bad_row_examples)
    if share > opts.bad_row_threshold:
        raise UmmError(
            f"{label}: {len(bad)} of {stats.rows_read} rows are unusable ({share:.1%}, above "
            f"bad_row_threshold={opts.bad_row_threshold:.1%}). First bad rows: {shown}. Fix or remove them, map "
            "the columns with prompt_column/chosen_column/rejected_column, or raise bad_row_threshold to skip them."
        )
    logger.warning("%s: skipped %d of %d rows (%.1f%%) that are unusable; first: %s",
                   label, len(bad), stats.rows_read, 100 * share, shown)


def _tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool, desc: str) -> list[list[int]]:
    out: list[list[int]] = []
    starts = range(0, len(texts), _TOKENIZE_CHUNK)
    # No bar for a single call. (Not progress(disable=...): utils.progress passes it twice when quiet.)
    for start in progress(starts, desc=desc, total=len(starts)) if len(starts) > 1 else starts:
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        out.extend(tokenizer(chunk, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize_pairs(
    pairs: list[_Pair], tokenizer: Any, opts: PairOptions, stats: DataStats, plain: bool, with_subset: bool
) -> Dataset:
    """Tokenise, apply max_length, and build the dataset (columns: see the module docstring)."""
    from datasets import Dataset, Features, List, Value

    prompts = _tokenize(tokenizer, [p.prompt for p in pairs], plain, "tokenizing prompts")
    chosen = _tokenize(tokenizer, [p.full_chosen for p in pairs], plain, "tokenizing chosen")
    rejected = _tokenize(tokenizer, [p.full_rejected for p in pairs], plain, "tokenizing rejected")
    eos = tokenizer.eos_token_id if (plain and opts.add_eos) else None
    limit = opts.max_length

    columns: dict[str, list[Any]] = {k: [] for k in ("prompt", "chosen", "rejected", "chosen_ids", "rejected_ids")}
    if with_subset:
        columns["subset"] = []
    for pair, p_ids, c_ids, r_ids in zip(pairs, prompts, chosen, rejected, strict=True):
        if eos is not None:
            c_ids = c_ids if c_ids and c_ids[-1] == eos else [*c_ids, eos]
            r_ids = r_ids if r_ids and r_ids[-1] == eos else [*r_ids, eos]
        if limit is not None:
            # The prompt's tokens are those it shares with each whole sequence (a merge across the join
            # shortens it by a token, never lengthens it).
            prompt_len = max(_common_prefix(p_ids, c_ids), _common_prefix(p_ids, r_ids))
            if prompt_len >= limit:
                stats.dropped_prompt_too_long += 1
                continue
            if len(c_ids) > limit or len(r_ids) > limit:
                if opts.over_length == "drop":
                    stats.dropped_too_long += 1
                    continue
                c_ids, r_ids = c_ids[:limit], r_ids[:limit]
                stats.truncated += 1
                if c_ids == r_ids:
                    stats.dropped_identical_after_truncation += 1
                    continue
        columns["prompt"].append(pair.prompt)
        columns["chosen"].append(pair.chosen)
        columns["rejected"].append(pair.rejected)
        columns["chosen_ids"].append(c_ids)
        columns["rejected_ids"].append(r_ids)
        if with_subset:
            columns["subset"].append(pair.subset)
    features = {k: Value("string") for k in columns} | {k: List(Value("int32")) for k in ("chosen_ids", "rejected_ids")}
    return Dataset.from_dict(columns, features=Features(features))
