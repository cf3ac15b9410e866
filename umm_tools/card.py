"""The model card ``umm push`` publishes with a reward model: Hub metadata plus a body that tells its story.

:func:`gather_card_inputs` reads what lies with the model (nothing is fetched from the network);
:func:`render_card` turns it into a ``huggingface_hub.ModelCard``. The metadata is built with
``ModelCardData`` / ``EvalResult``, so the ``model-index`` block is in the form the Hub validates.

Inputs, all optional (a plain dense RM gets a short card):

- ``config.json`` of the model; its ``umm`` block when it is a umm MoE (``umm.source``, E, k, S, c);
- ``umm_provenance.json`` (written by ``umm collapse``): source, MoE recipe, merge mode and weight summary;
  and, when the folders it names still exist here, the MoE folder's ``umm_upcycle.json``,
  ``train_options.json`` and ``metrics.json`` and the merge-weights folder's ``learn_merge_options.json`` and
  ``metrics.json`` (shown in the body as earlier stages' figures, never as this model's results);
- ``*_options.json`` in the model folder (a stage's resolved options: data sources are read from the keys
  ``data``, ``train_data``, ``dataset``, ``datasets``, ``eval_data``, ``prompts``, ``router_data``, at the top
  level or under ``options``; only the training keys go into the ``datasets`` metadata);
- evaluation reports of ``umm eval --output`` (``eval.json``, ``eval_results.json``, ``eval_*.json``,
  ``*_eval.json``), ``metrics.json``, and PPO ``summary.json`` (with the ``ppo_options.json`` beside it), found
  in the model folder and its direct subfolders, or given explicitly;
- an existing ``README.md`` in the model folder (only its license is reused; the card replaces it).

Card layout::

    ---  license, library_name: transformers, pipeline_tag: text-classification, tags, base_model,
         base_model_relation (merge for a collapsed RM), datasets, model-index (accuracy per evaluation
         data; PPO gold-reward drop, final gold / proxy reward and KL per PPO run)  ---
    # <name>                      what the model is, in one paragraph
    ## Usage                      scoring a (prompt, response) pair with plain transformers
    ## How it was made            lineage table (source, E, k, S, c, router init, data, merge mode, ...),
                                  merge-weight summary per layer, resolved options of each stage (folded)
    ## Evaluation                 umm eval reports (accuracy, 95% CI, margin, per subset), metrics.json
    ## Reward hacking (PPO)       one row per PPO run: proxy and gold reward, gold drop from its peak, KL
    ## About umm                  the method in three lines and the paper link

Local absolute paths are shown by their last component only (they mean nothing on the Hub and may say
more about the uploader's machine than intended); keys that look like secrets are never rendered.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from umm_tools.errors import UmmError

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2512.00724"
PROVENANCE_FILE = "umm_provenance.json"  # same name as umm_tools.collapse.PROVENANCE_FILE (not imported: heavy)
EVAL_GLOBS = ("eval.json", "eval_results.json", "eval_*.json", "*_eval.json")
DATA_KEYS = ("data", "train_data", "dataset", "datasets", "eval_data", "prompts", "router_data")
TRAIN_KEYS = ("data", "train_data", "dataset", "datasets")
_SECRET = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv", ".arrow")


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class EvalReport:
    """One ``umm eval`` report (format: :func:`umm_tools.evaluate.evaluate`)."""

    path: Path
    report: dict[str, Any]


@dataclass
class PPORun:
    """One PPO ``summary.json`` and, when found beside it, its ``ppo_options.json``."""

    path: Path
    summary: dict[str, Any]
    options: dict[str, Any] | None = None


@dataclass
class Metrics:
    """The numbers of a ``metrics.json``; ``own``: about this model (found in its folder), not an earlier stage's."""

    label: str
    numbers: dict[str, float]
    own: bool


@dataclass
class CardInputs:
    """Everything found with a model that the card reports."""

    model_dir: Path
    config: dict[str, Any]
    provenance: dict[str, Any] | None = None
    upcycle_record: dict[str, Any] | None = None  # umm_upcycle.json of the MoE, when its folder is here
    options_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> file content
    evals: list[EvalReport] = field(default_factory=list)
    metrics: list[Metrics] = field(default_factory=list)
    ppo_runs: list[PPORun] = field(default_factory=list)
    existing_card_license: dict[str, str] | None = None  # license (+ license_name/link) of a README.md here
    n_params: int | None = None

    @property
    def umm(self) -> dict[str, Any] | None:
        """The MoE recipe: the config's ``umm`` block (an MoE) or the provenance's ``moe_umm`` (collapsed)."""
        if isinstance(self.config.get("umm"), dict):
            return self.config["umm"]
        if self.provenance and isinstance(self.provenance.get("moe_umm"), dict):
            return self.provenance["moe_umm"]
        return None

    @property
    def kind(self) -> str:
        """'moe' (a umm MoE RM), 'collapsed' (dense, made by umm collapse) or 'dense' (anything else)."""
        if isinstance(self.config.get("umm"), dict):
            return "moe"
        return "collapsed" if self.provenance else "dense"

    @property
    def source(self) -> str | None:
        umm = self.umm or {}
        return (self.provenance or {}).get("source") or umm.get("source")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UmmError(f"{path} is not readable JSON ({e}); fix or remove it.") from e


def _try_read(path: Path) -> Any:
    """A file found with the model, not asked for: unreadable JSON is skipped with a warning."""
    try:
        return _read(path)
    except UmmError as e:
        logger.warning("%s; not used for the card", e)
        return None


def is_eval_report(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("accuracy"), int | float) and "n_pairs" in data


def is_ppo_summary(data: Any) -> bool:
    return isinstance(data, dict) and "steps" in data and any(k in data for k in ("gold_drop", "proxy_final"))


def _flat_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) JSON object, with dotted keys; two levels deep at most."""
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = value
        elif isinstance(value, dict) and not prefix:
            out.update(_flat_numbers(value, f"{name}."))
    return out


def _candidates(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Files matching ``patterns`` in ``folder`` and its direct (non-hidden) subfolders, sorted, no repeats."""
    found: dict[Path, None] = {}
    folders = [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in folders:
        for pattern in patterns:
            for p in sorted(sub.glob(pattern)):
                if p.is_file():
                    found[p] = None
    return list(found)


def gather_card_inputs(
    model_dir: str | Path,
    eval_results: list[str] | None = None,
    ppo_summary: list[str] | None = None,
    n_params: int | None = None,
) -> CardInputs:
    """Read what the card reports from ``model_dir`` (and the MoE folder its provenance names, if present).

    ``eval_results`` / ``ppo_summary``: explicit report files, added to those found with the model; an
    explicit file that is missing or of the wrong kind is a :class:`UmmError`, a found one is skipped with a
    log line.
    """
    model_dir = Path(model_dir)
    config = _read(model_dir / "config.json")
    inputs = CardInputs(model_dir=model_dir, config=config if isinstance(config, dict) else {}, n_params=n_params)

    prov = model_dir / PROVENANCE_FILE
    if prov.is_file():
        data = _read(prov)
        if isinstance(data, dict):
            inputs.provenance = data
        else:
            logger.warning("%s is not a JSON object; ignored", prov)

    # Earlier stages' folders, when they still exist here: the MoE (upcycle + train) and learn-merge's output.
    option_dirs = [model_dir]
    prov_data = inputs.provenance or {}
    moe_dir = Path(str(prov_data.get("moe_dir") or ""))
    mw_path = Path(str((prov_data.get("merge_weights") or {}).get("path") or ""))
    for folder, label in ((moe_dir, "the trained MoE, before merging"),
                          (mw_path.parent if mw_path.name else Path(""), "learn-merge (before and after fitting)")):
        if not folder.name or not folder.is_dir() or folder.resolve() in {d.resolve() for d in option_dirs}:
            continue
        option_dirs.append(folder)
        if (folder / "umm_upcycle.json").is_file() and inputs.upcycle_record is None:
            record = _try_read(folder / "umm_upcycle.json")
            inputs.upcycle_record = record if isinstance(record, dict) else None
        if (folder / "metrics.json").is_file():
            numbers = _flat_numbers(_try_read(folder / "metrics.json"))
            if numbers:
                inputs.metrics.append(Metrics(f"{label} (its metrics.json)", numbers, own=False))
    for folder in option_dirs:
        for path in sorted(folder.glob("*_options.json")):
            data = _try_read(path)
            if isinstance(data, dict):
                inputs.options_files.setdefault(path.name.removesuffix("_options.json"), data)

    seen: set[Path] = set()

    def report(path: Path, explicit: bool, kind: str) -> dict[str, Any] | None:
        """The file's JSON when it is a report of ``kind`` not seen yet; a wrong explicit file is an error."""
        if path.resolve() in seen:
            return None
        data = _read(path) if explicit else _try_read(path)
        if not (is_eval_report if kind == "eval" else is_ppo_summary)(data):
            what = ("an evaluation report of `umm eval --output` (no accuracy/n_pairs)" if kind == "eval"
                    else "a PPO summary.json of `umm ppo` (no steps/proxy_final/gold_drop)")
            if explicit:
                raise UmmError(f"{path} is not {what}.")
            logger.info("%s is not %s; not used for the card", path, what)
            return None
        seen.add(path.resolve())
        return data

    def add_eval(path: Path, explicit: bool) -> None:
        if (data := report(path, explicit, "eval")) is not None:
            inputs.evals.append(EvalReport(path, data))

    def add_ppo(path: Path, explicit: bool) -> None:
        if (data := report(path, explicit, "ppo")) is None:
            return
        options = None
        if (path.parent / "ppo_options.json").is_file():
            opt = _try_read(path.parent / "ppo_options.json")
            options = opt if isinstance(opt, dict) else None
        inputs.ppo_runs.append(PPORun(path, data, options))

    for name, paths, add in (("eval_results", eval_results, add_eval), ("ppo_summary", ppo_summary, add_ppo)):
        for p in paths or []:
            path = Path(p).expanduser()
            if not path.is_file():
                raise UmmError(f"{name}: file not found: {path}")
            add(path, True)
    for path in _candidates(model_dir, EVAL_GLOBS):
        add_eval(path, False)
    for path in _candidates(model_dir, ("metrics.json",)):
        data = _try_read(path)
        if is_eval_report(data):
            add_eval(path, False)
        elif numbers := _flat_numbers(data):
            inputs.metrics.append(Metrics(f"`{_rel(path, model_dir)}`", numbers, own=True))
    for path in _candidates(model_dir, ("summary.json",)):
        add_ppo(path, False)

    readme = model_dir / "README.md"
    if readme.is_file():
        inputs.existing_card_license = card_license(readme.read_text(errors="replace"))
    return inputs


def card_license(text: str) -> dict[str, str] | None:
    """``{"license": ..., ["license_name", "license_link"]}`` from a model card's metadata, or None."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a malformed card is only a missing license here
        return None
    if not data.get("license"):
        return None
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


def local_license(inputs: CardInputs) -> dict[str, str] | None:
    """The license found without the network: a README.md in the model folder, the config, or a local
    source folder's README.md / config.json."""
    if inputs.existing_card_license:
        return inputs.existing_card_license
    umm = inputs.umm or {}
    for cfg in (inputs.config, umm.get("source_config") or {}):
        if isinstance(cfg, dict) and isinstance(cfg.get("license"), str):
            return {"license": cfg["license"]}
    source = inputs.source
    if source and Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        if (folder / "README.md").is_file():
            found = card_license((folder / "README.md").read_text(errors="replace"))
            if found:
                return found
    return None


# ------------------------------------------------------------------------------------------ display helpers
def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def is_hub_id(text: Any) -> bool:
    """A Hub id of the form ``org/name`` that is not a local path or a data file here."""
    from umm_tools.hub import looks_like_repo_id

    if not isinstance(text, str) or "/" not in text or not looks_like_repo_id(text):
        return False
    if text.lower().endswith(_DATA_SUFFIXES):
        return False
    return not Path(text).expanduser().exists()


def _show(value: Any, link_kind: str = "") -> str:
    """A source for the card: a Hub id (linked), or a local path by its last component."""
    if isinstance(value, list):
        return ", ".join(_show(v, link_kind) for v in value) or "-"
    if value is None or value == "":
        return "-"
    text = str(value)
    if is_hub_id(text) and link_kind:
        prefix = "datasets/" if link_kind == "dataset" else ""
        return f"[{text}](https://huggingface.co/{prefix}{text})"
    if text.startswith(("/", "~", "./", "../")) or "\\" in text or Path(text).expanduser().exists():
        return f"`{Path(text).name or text}` (local)"
    return f"`{text}`"


def _same_dir(path: Any, folder: Path) -> bool:
    try:
        return isinstance(path, str) and Path(path).expanduser().resolve() == folder.resolve()
    except OSError:
        return False


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.3g}"
    return str(value)


def _human_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def _sanitize(value: Any) -> Any:
    """Options for display: secrets dropped, local absolute paths shortened to their last component."""
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items() if not _SECRET.search(str(k))}
    if isinstance(value, list):
        return [_sanitize(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", value)):
        return f"<local>/{Path(value).name}"
    return value


def _data_sources(record: dict[str, Any]) -> dict[str, Any]:
    """Data-source keys of an options file, from its top level or its ``options`` block."""
    found: dict[str, Any] = {}
    for scope in (record, record.get("options") if isinstance(record.get("options"), dict) else {}):
        for key in DATA_KEYS:
            if scope.get(key) not in (None, "", []) and key not in found:
                found[key] = scope[key]
    return found


def training_data(inputs: CardInputs) -> list[tuple[str, str, Any]]:
    """(stage, key, source) for every data source the recipe files name, in stage order."""
    out = []
    records = dict(inputs.options_files)
    if inputs.upcycle_record:
        records = {"upcycle": inputs.upcycle_record, **records}
    meta = ((inputs.provenance or {}).get("merge_weights") or {}).get("meta") or {}
    if isinstance(meta, dict):
        records.setdefault("learn_merge", meta)
    for stage, record in records.items():
        for key, value in _data_sources(record).items():
            out.append((stage, key, value))
    return out


def hub_datasets(inputs: CardInputs, extra: list[str] | None = None) -> list[str]:
    """Hub dataset ids for the ``datasets`` metadata: the recipe's *training* data that are Hub ids.

    Evaluation data is left out on purpose (the Hub reads ``datasets`` as training data; listing a benchmark
    there would claim it was trained on); it is named in ``model-index`` instead."""
    ids: list[str] = []
    values: list[Any] = list(extra or [])
    for stage, key, value in training_data(inputs):
        if stage != "ppo" and key in TRAIN_KEYS:
            values.extend(value if isinstance(value, list) else [value])
    for v in values:
        if is_hub_id(v) and v not in ids:
            ids.append(v)
    return ids


# ------------------------------------------------------------------------------------------ metadata
def _dataset_identity(source: Any, default: str) -> tuple[str, str]:
    """(dataset type, dataset name) for model-index: the Hub id, or a local file's name."""
    if is_hub_id(source):
        return source, source
    if isinstance(source, str) and source:
        name = Path(source).name or source
        return name, name
    return default, default


def eval_results(inputs: CardInputs) -> list[EvalResult]:
    """model-index entries: accuracy per evaluation report and metrics.json, PPO figures per run."""
    from huggingface_hub import EvalResult

    results: list[EvalResult] = []
    seen: set[tuple] = set()

    def add(**kw: Any) -> None:
        r = EvalResult(**kw)
        key = (r.unique_identifier, r.metric_type)
        if key in seen:
            logger.warning("two results for %s of %s; the card's metadata keeps the first", r.metric_type, r.dataset_name)
            return
        seen.add(key)
        results.append(r)

    task = {"task_type": "text-classification", "task_name": "Reward modeling (pairwise preference accuracy)"}
    for ev in inputs.evals:
        rep = ev.report
        ds_type, ds_name = _dataset_identity(rep.get("data"), ev.path.stem)
        add(**task, dataset_type=ds_type, dataset_name=ds_name, dataset_split=rep.get("split"),
            metric_type="accuracy", metric_value=round(float(rep["accuracy"]), 6),
            metric_name="Pairwise accuracy (ties count half)")
    for m in inputs.metrics:
        if not m.own:
            continue  # an earlier stage's figures (the MoE, learn-merge) are not this model's results
        numbers = m.numbers
        for key in ("eval_accuracy", "accuracy", "eval.accuracy"):
            if key in numbers and 0 <= numbers[key] <= 1:
                add(**task, dataset_type="held-out-preference-pairs", dataset_name="held-out preference pairs",
                    metric_type="accuracy", metric_value=round(float(numbers[key]), 6),
                    metric_name="Pairwise accuracy")
                break
    for run in inputs.ppo_runs:
        s = run.summary
        prompts = ((run.options or {}).get("prompts"))
        ds_type, ds_name = _dataset_identity(prompts, "ppo-prompts")
        ppo_task = {"task_type": "reinforcement-learning", "task_name": "PPO against this reward model",
                    "dataset_type": ds_type, "dataset_name": ds_name}
        for key, metric_type, name in (
            ("gold_drop", "gold_reward_drop", "Gold reward drop from its peak (reward hacking; lower is better)"),
            ("gold_final", "gold_reward", "Gold reward at the end of PPO"),
            ("proxy_final", "proxy_reward", "Proxy (this RM's) reward at the end of PPO"),
            ("kl_final", "kl", "KL to the reference policy at the end of PPO"),
        ):
            value = s.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                add(**ppo_task, metric_type=metric_type, metric_value=round(float(value), 6), metric_name=name)
    return results


def base_model_of(inputs: CardInputs, override: str | None = None, warn: bool = True) -> str | None:
    """``base_model``: the explicit value ('' for none), else the umm source when it is a Hub id."""
    if override is not None:
        return override or None
    source = inputs.source
    if source and is_hub_id(source):
        return source
    if source and warn:
        logger.warning("base_model left out: the source %s is not a Hub id (pass --base-model ORG/NAME)", source)
    return None


def tags_of(inputs: CardInputs, extra: list[str] | None = None) -> list[str]:
    tags = ["reward-model", "umm"] if inputs.kind != "dense" else ["reward-model"]
    if inputs.kind == "moe":
        tags += ["mixture-of-experts", "qwen2_moe"]
    elif inputs.kind == "collapsed":
        tags += ["merge", "moe-merge"]
    model_type = inputs.config.get("model_type")
    if isinstance(model_type, str) and model_type not in tags:
        tags.append(model_type)
    for t in extra or []:
        if t not in tags:
            tags.append(t)
    return tags


# ------------------------------------------------------------------------------------------ body
def _usage(repo_id: str, chat: bool) -> list[str]:
    lines = [
        "## Usage",
        "",
        "A reward model gives one score per sequence (higher is better); compare the scores of two responses to "
        "the same prompt. Plain `transformers`, nothing from umm:",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}").eval()',
        "",
        "def reward(prompt: str, response: str) -> float:",
        "    # As umm trains and evaluates plain-text pairs: prompt, a space, response, then the EOS token.",
        '    ids = tokenizer(prompt + " " + response)["input_ids"]',
        "    if ids[-1] != tokenizer.eos_token_id:",
        "        ids.append(tokenizer.eos_token_id)",
        "    with torch.no_grad():",
        "        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()",
        "",
        'prompt = "How do I boil an egg?"',
        'chosen = reward(prompt, "Put it in boiling water for eight minutes, then cool it in cold water.")',
        'rejected = reward(prompt, "Eggs cannot be boiled.")',
        'print(f"chosen {chosen:.3f}  rejected {rejected:.3f}  prefers chosen: {chosen > rejected}")',
        "```",
    ]
    if chat:
        lines += [
            "",
            "For conversations, score the text of the tokenizer's chat template, as umm does for conversational "
            "pairs: `tokenizer.apply_chat_template(messages, tokenize=False)` with the assistant's answer as the "
            "last message, tokenised with `add_special_tokens=False`.",
        ]
    return lines


def _what_it_is(inputs: CardInputs, name: str) -> list[str]:
    umm = inputs.umm or {}
    source = _show(inputs.source, "model") if inputs.source else "its source model"
    arch = (inputs.config.get("architectures") or ["?"])[0]
    size = f" with {_human_params(inputs.n_params)} parameters" if inputs.n_params else ""
    recipe = ""
    if umm:
        recipe = (f" ({umm.get('shared_experts', '?')} shared + {umm.get('num_experts', '?')} routed experts, "
                  f"top-{umm.get('top_k', '?')}, shared share c = {_num(umm.get('shared_share'), 2)})")
    if inputs.kind == "collapsed":
        mode = ((inputs.provenance or {}).get("merge_weights") or {}).get("mode", "learned")
        text = (
            f"**{name}** is a dense reward model (`{arch}`{size}, one score per sequence) made with "
            f"[umm]({PAPER_URL}) (Upcycle-and-Merge MoE reward model, UMM-RM) from {source}: the source's "
            f"feed-forward layers were upcycled into a shared-expert mixture of experts{recipe}, trained on "
            f"preference pairs, and the experts were merged back into one feed-forward network per layer with "
            f"{mode} convex weights. It has exactly the source's architecture and inference cost: no MoE at "
            "inference, no ensemble."
        )
    elif inputs.kind == "moe":
        text = (
            f"**{name}** is a shared-expert mixture-of-experts reward model (`{arch}`{size}, one score per "
            f"sequence) upcycled with [umm]({PAPER_URL}) from {source}{recipe}. It is the MoE stage of UMM-RM, "
            "not yet merged: `umm learn-merge` and `umm collapse` turn it into a dense RM of the source's size."
        )
    else:
        text = (
            f"**{name}** is a reward model (`{arch}`{size}, one score per sequence). No umm provenance "
            f"(`{PROVENANCE_FILE}`) was found with it, so its lineage is not recorded here."
        )
    return [text]


def _lineage(inputs: CardInputs) -> list[str]:
    prov = inputs.provenance or {}
    umm = inputs.umm or {}
    if not prov and not umm:
        return []
    mw = prov.get("merge_weights") or {}
    rows: list[list[str]] = []

    def row(what: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            rows.append([what, value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else
                         _num(value)])

    row("source model", _show(inputs.source, "model") if inputs.source else None)
    if umm.get("source_revision"):
        row("source revision", f"`{umm['source_revision']}`")
    row("architecture", f"`{prov.get('source_architecture') or umm.get('source_architecture')}`")
    row("routed experts E", umm.get("num_experts"))
    row("active routed experts k", umm.get("top_k"))
    row("shared experts S", umm.get("shared_experts"))
    row("shared share c", umm.get("shared_share"))
    row("expert width", umm.get("intermediate_size"))
    row("router init", umm.get("router_init"))
    row("score head init", umm.get("score_init"))
    for stage, key, value in training_data(inputs):
        row(f"{key.replace('_', ' ')} ({stage})", _show(value, "dataset"))
    if mw:
        row("merge mode", f"`{mw.get('mode')}`" + {"learned": " (fitted by learn-merge on preference pairs)",
                                                  "stats": " (gating statistics, not fitted)",
                                                  "uniform": " (plain average)"}.get(mw.get("mode"), ""))
        row("merge weights sha256", f"`{mw['sha256']}`" if mw.get("sha256") else None)
        meta = mw.get("meta") or {}
        for key, value in meta.items() if isinstance(meta, dict) else ():
            if isinstance(value, int | float | str) and not _SECRET.search(key) and key not in (*DATA_KEYS, "source"):
                row(f"learn-merge {key}", _sanitize(value) if isinstance(value, str) else value)
    tensors = prov.get("tensors") or {}
    if tensors:
        row("tensors", f"{tensors.get('merged', '?')} merged, {tensors.get('copied', '?')} copied, "
                       f"{len(tensors.get('dropped') or [])} dropped (routers, shared-expert gates)")
    row("umm version", prov.get("umm_version") or umm.get("version"))
    row("created", prov.get("created"))
    lines = ["## How it was made", ""]
    if inputs.kind == "collapsed":
        lines += [
            "1. **upcycle**: every feed-forward layer of the source became a Qwen2-MoE layer whose shared and "
            "routed experts are copies of it, scaled so that the MoE scores exactly like the source at the start;",
            "2. **train**: the MoE reward model was trained on preference pairs (Bradley-Terry loss plus the "
            "router load-balancing loss);",
            "3. **learn-merge**: per layer and projection, convex weights over the experts were set (from the "
            "routers' gating statistics, then fitted on preference pairs, depending on the merge mode);",
            "4. **collapse**: the experts' parameters were averaged with those weights into one feed-forward "
            "network per layer, written in the source architecture.",
            "",
        ]
    lines += _table(["", "value"], rows)
    layers = prov.get("layers") or {}
    if layers:
        lines += ["", "### Merge weights", "",
                  "Per layer and projection: the total weight on the shared expert(s) (the rest is on the routed "
                  "experts) and the expert with the largest weight."]
        keys: list[str] = []
        for entry in layers.values():
            keys += [k for k in entry if k not in keys]
        order = ("gate_proj", "up_proj", "down_proj")
        keys.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
        table_rows = []
        shared_all = []
        for layer in sorted(layers, key=lambda s: int(s) if str(s).isdigit() else 0):
            cells = [str(layer)]
            for key in keys:
                info = layers[layer].get(key)
                if not isinstance(info, dict):
                    cells.append("-")
                    continue
                shared = info.get("shared")
                if isinstance(shared, int | float):
                    shared_all.append(shared)
                top = f"{info.get('top')} ({_num(info.get('top_weight'), 3)})"
                cells.append(f"shared {_num(shared, 3)}, top {top}" if shared is not None else f"top {top}")
            table_rows.append(cells)
        if shared_all:
            lines += ["", f"Mean weight on the shared expert(s): {_num(sum(shared_all) / len(shared_all), 3)} "
                      f"(min {_num(min(shared_all), 3)}, max {_num(max(shared_all), 3)})."]
        body = _table(["layer", *keys], table_rows)
        lines += [""] + (_folded(f"All {len(table_rows)} layers", body) if len(table_rows) > 8 else body)
    recipe = _recipe(inputs)
    if recipe:
        lines += ["", *_folded("Resolved options of each stage", ["```yaml", *recipe, "```"])]
    return lines


def _folded(summary: str, body: list[str]) -> list[str]:
    return ["<details>", f"<summary>{summary}</summary>", "", *body, "", "</details>"]


def _recipe(inputs: CardInputs) -> list[str]:
    import yaml

    stages: dict[str, Any] = {}
    umm = inputs.umm or {}
    if umm:
        stages["upcycle"] = {k: v for k, v in umm.items() if k not in ("source_config",)}
        if inputs.upcycle_record and isinstance(inputs.upcycle_record.get("options"), dict):
            stages["upcycle"] = {**stages["upcycle"], "options": inputs.upcycle_record["options"]}
    for stage, record in inputs.options_files.items():
        stages[stage] = record
    prov = inputs.provenance or {}
    if prov:
        mw = {k: v for k, v in (prov.get("merge_weights") or {}).items() if k not in ("used", "experts")}
        stages["collapse"] = {"options": prov.get("options"), "merge_weights": mw}
    if not stages:
        return []
    text = yaml.safe_dump(_sanitize(stages), sort_keys=False, default_flow_style=False, width=110)
    return text.rstrip("\n").splitlines()


def _evaluation(inputs: CardInputs) -> list[str]:
    if not inputs.evals and not inputs.metrics:
        return []
    lines = ["## Evaluation", ""]
    if inputs.evals:
        lines += ["Pairwise accuracy on preference pairs (`umm eval`): a pair is right when the chosen response "
                  "gets the higher reward; a tie counts as half. 95% Wilson interval.", ""]
        rows = []
        for ev in inputs.evals:
            r = ev.report
            ci = r.get("ci95") or [None, None]
            rows.append([_show(r.get("data"), "dataset"), r.get("split") or "-", _num(r.get("n_pairs")),
                         _num(r.get("accuracy")), f"[{_num(ci[0], 3)}, {_num(ci[1], 3)}]",
                         _num(r.get("mean_margin")), f"`{_rel(ev.path, inputs.model_dir)}`"])
        lines += _table(["data", "split", "pairs", "accuracy", "95% CI", "mean margin", "report"], rows)
        for ev in inputs.evals:
            subsets = ev.report.get("per_subset") or {}
            if subsets:
                lines += ["", f"Per subset of {_show(ev.report.get('data'), 'dataset')}:", ""]
                lines += _table(["subset", "pairs", "accuracy", "95% CI", "mean margin"], [
                    [name, _num(s.get("n_pairs")), _num(s.get("accuracy")),
                     "[{}, {}]".format(*(_num(x, 3) for x in (s.get("ci95") or [None, None]))),
                     _num(s.get("mean_margin"))] for name, s in subsets.items()])
    for m in inputs.metrics:
        table = _table(["metric", "value"], [[f"`{k}`", _num(v)] for k, v in m.numbers.items()])
        lines += [""] + (_folded(f"Metrics of {m.label}", table) if len(table) > 10
                         else [f"Metrics of {m.label}:", "", *table])
    return lines


def _ppo(inputs: CardInputs) -> list[str]:
    if not inputs.ppo_runs:
        return []
    lines = [
        "## Reward hacking (PPO)",
        "",
        "A policy was optimised with PPO against a proxy reward model while a *gold* reward was only watched. "
        "Reward hacking shows as the proxy score rising while the gold score falls: the **gold drop** (gold "
        "peak minus gold at the end) measures it; lower is better.",
        "",
    ]
    rows = []
    for run in inputs.ppo_runs:
        s, o = run.summary, run.options or {}
        opts = o.get("options") or {}
        proxy = opts.get("reward_model") or o.get("reward_fn")
        gold = opts.get("gold_model") or o.get("gold_fn")
        peak = f"{_num(s.get('gold_peak'))} (step {_num(s.get('gold_peak_step'))})" if s.get("gold_peak") is not None \
            else "-"
        proxy_shown = "this model" if _same_dir(proxy, inputs.model_dir) else _show(proxy, "model")
        rows.append([f"`{_rel(run.path, inputs.model_dir)}`", proxy_shown, _show(gold, "model"),
                     _num(s.get("steps")), _num(s.get("proxy_final")), peak, _num(s.get("gold_final")),
                     _num(s.get("gold_drop")), _num(s.get("kl_final")), _num(s.get("proxy_gold_spearman"), 3)])
    lines += _table(["run", "proxy RM", "gold", "steps", "proxy (final)", "gold peak", "gold (final)", "gold drop",
                     "KL (final)", "Spearman(proxy, gold)"], rows)
    return lines


def _about(inputs: CardInputs) -> list[str]:
    if inputs.kind == "dense":
        return []
    return [
        "## About umm",
        "",
        f"UMM-RM ([arXiv 2512.00724]({PAPER_URL})) upcycles a dense reward model into a mixture of experts with "
        "always-on shared experts (instruction-agnostic preference signal) and routed experts (fine-grained "
        "preferences), trains it, and merges the experts back into one dense model with learned convex weights. "
        "The merged model keeps the dense model's cost and is meant to be harder to reward-hack under PPO.",
    ]


def render_card(
    inputs: CardInputs,
    repo_id: str,
    *,
    license: dict[str, str] | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The model card of the model described by ``inputs`` for ``repo_id``.

    ``license``: ``{"license": ...}`` (plus ``license_name`` / ``license_link`` for 'other'); ``base_model``:
    overrides the source ('' for none); ``datasets`` / ``tags``: added to those found. The card is parsed
    back before it is returned, so malformed metadata is a :class:`UmmError` here, not on the Hub.
    """
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id.split("/")[-1]
    base = base_model_of(inputs, base_model)
    results = eval_results(inputs)
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": tags_of(inputs, tags),
        **(license or {}),
    }
    if base:
        meta["base_model"] = base
        if inputs.kind == "collapsed":
            meta["base_model_relation"] = "merge"
    ds = hub_datasets(inputs, datasets)
    if ds:
        meta["datasets"] = ds
    if results:
        meta["model_name"] = name
        meta["eval_results"] = results
    try:
        data = ModelCardData(**meta)
    except ValueError as e:
        raise UmmError(f"the model card metadata is invalid: {e}") from e

    chat = bool(_has_chat_template(inputs.model_dir))
    body = ["", f"# {name}", "", *_what_it_is(inputs, name), "", *_usage(repo_id, chat)]
    for section in (_lineage(inputs), _evaluation(inputs), _ppo(inputs), _about(inputs)):
        if section:
            body += ["", *section]
    text = f"---\n{data.to_yaml()}\n---\n" + "\n".join(body) + "\n"
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except ValueError as e:
        raise UmmError(f"the generated model card does not parse back ({e}); please report this.") from e
    parsed = card.data.eval_results or []
    if len(parsed) != len(results):
        raise UmmError(f"the model card's model-index holds {len(parsed)} results, {len(results)} were written; "
                       "please report this.")
    return card


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text()).get("chat_template"))
        except (OSError, json.JSONDecodeError):
            return False
    return False
