"""``umm push``: publish a reward model folder to the Hugging Face Hub with a model card.

Order of work, so that nothing reaches the Hub unless everything checked out:

1. **check** the folder (:func:`check_model`): config, weights and tokenizer present; a one-output
   sequence-classification RM (``num_labels == 1``); not a umm MoE unless ``allow_moe``; the weights load
   (a real CPU load and one scored text for models up to ``full_check_max_gb``, else the model is built on
   the *meta* device and its tensor names and shapes are compared with the safetensors headers);
2. **card** (:mod:`umm_tools.card`): rendered in memory from what lies with the model (provenance, eval
   reports, PPO summaries, options files) and parsed back;
3. **upload** with ``huggingface_hub``: create the repo (``exist_ok``), create the branch ``revision`` when
   missing, then one commit holding every file of the folder plus the card as ``README.md``.

**The model folder is never written to.** The card is not staged on disk: it goes into the commit as bytes,
next to the folder's files, which are uploaded as they are (a ``README.md`` already in the folder is replaced
by the card in the upload; its license is kept). ``dry_run`` writes the card to ``card_output`` (default: a
new temporary folder, named in the result) and lists the files with their sizes, without any network access.

Network failures (connection errors, timeouts, HTTP 408/429/5xx) are retried ``max_attempts`` times with
exponential backoff (``retry_backoff`` seconds, doubled each time); then, and for any other Hub error, a
:class:`~umm_tools.errors.UmmError` says what failed. 401/403 say how to log in. A retried commit re-sends
only what the Hub does not have yet. The token is read from ``token``, else ``HF_TOKEN`` or the stored login
(``hf auth login``), and is never logged or written into the card.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field

from umm_tools.config import Options
from umm_tools.errors import UmmError
from umm_tools.hub import transport_errors

logger = logging.getLogger(__name__)

T = TypeVar("T")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Remote files that a re-push with another sharding must not leave behind (see delete_stale_weights).
STALE_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
LOGIN_HINT = (
    "Log in with `hf auth login` (or set HF_TOKEN) using a token with write access to the repo's namespace: "
    "https://huggingface.co/settings/tokens"
)


class PushOptions(Options):
    """Options of ``umm push``."""

    dry_run: bool = Field(
        False, description="Check the model, write the card and list the files with their sizes; no network access."
    )
    private: bool = Field(False, description="Create the repo as private (only when it does not exist yet).")
    revision: str | None = Field(
        None, description="Branch to push to; created from main when missing. Default: main."
    )
    create_pr: bool = Field(False, description="Open a pull request (against revision) instead of committing to it.")
    commit_message: str | None = Field(
        None, description="Commit title. Default: 'Upload reward model with umm push'."
    )
    token: str | None = Field(
        None,
        repr=False,
        description="Hub token with write access. Default: HF_TOKEN, else the stored login (hf auth login); "
        "prefer those to this flag, which shell history keeps.",
    )
    allow_moe: bool = Field(
        False, description="Allow pushing a umm MoE RM (normally refused: collapse it into a dense RM first)."
    )
    license: str | None = Field(
        None,
        description="License for the card, e.g. 'apache-2.0'. Default: the license of a README.md in the folder, "
        "else of the source model's card.",
    )
    base_model: str | None = Field(
        None, description="Hub id for the card's base_model. Default: the umm source when it is a Hub id; '' for none."
    )
    datasets: list[str] | None = Field(
        None, description="Hub dataset ids to list in the card, besides those the recipe files name."
    )
    tags: list[str] | None = Field(None, description="Extra tags for the card.")
    eval_results: list[str] | None = Field(
        None,
        description="Evaluation reports (JSON of `umm eval --output`) to put in the card, besides eval*.json and "
        "metrics.json found with the model.",
    )
    ppo_summary: list[str] | None = Field(
        None,
        description="PPO summary.json files to put in the card (reward-hacking figures), besides any found with "
        "the model; a ppo_options.json beside each is read too.",
    )
    card_output: str | None = Field(
        None, description="Also write the card to this file (dry run default: a new temporary folder)."
    )
    ignore_patterns: list[str] | None = Field(
        None, description="Files of the folder not to upload (fnmatch patterns on relative paths, e.g. '*.png')."
    )
    delete_stale_weights: bool = Field(
        True,
        description="Delete top-level weight files (*.safetensors, *.bin, their index) on the branch that this upload "
        "does not contain, so a re-push with another sharding leaves no stale shards.",
    )
    full_check_max_gb: float = Field(
        2.0,
        ge=0,
        description="Models with weights up to this many GB are loaded on the CPU and score one text before upload; "
        "larger ones are checked from their config and safetensors headers.",
    )
    max_attempts: int = Field(3, ge=1, description="Attempts per Hub request on network errors and HTTP 5xx/429.")
    retry_backoff: float = Field(2.0, ge=0, description="Seconds before the first retry, doubled for each next one.")


@dataclass
class PushResult:
    """What :func:`push` did (or, for a dry run, would do)."""

    repo_id: str
    revision: str
    files: list[tuple[str, int]]  # (path in repo, bytes), README.md (the card) included
    card_text: str
    dry_run: bool
    card_path: Path | None = None
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    deleted: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A short report for the screen."""
        total = sum(size for _, size in self.files)
        target = f"{self.repo_id}@{self.revision}"
        if self.dry_run:
            lines = [f"dry run: nothing uploaded; {len(self.files)} files ({human_size(total)}) for {target}:"]
        else:
            lines = [f"pushed {len(self.files)} files ({human_size(total)}) to {target}:"]
        width = max((len(p) for p, _ in self.files), default=0)
        lines += [f"  {p:<{width}}  {human_size(s):>10}" + ("  (model card)" if p == "README.md" else "")
                  for p, s in self.files]
        lines += [f"  deleted stale {p}" for p in self.deleted]
        if self.card_path:
            lines.append(f"model card written to {self.card_path}")
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        if self.pr_url:
            lines.append(f"pull request: {self.pr_url}")
        return "\n".join(lines)


def human_size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------ checks
@dataclass
class ModelCheck:
    """What :func:`check_model` learnt about the folder."""

    config: dict[str, Any]
    is_moe: bool
    weight_bytes: int
    n_params: int | None
    loaded: bool  # really loaded on the CPU and scored a text (else: meta device + headers)


def _found(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return (", ".join(names[:20]) + (", ..." if len(names) > 20 else "")) if names else "nothing"


def _safetensors_headers(model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """name -> shape of every tensor of the safetensors weights (headers only), or None without safetensors."""
    from safetensors import safe_open

    from umm_tools.utils import read_json

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, what="weight index")
        shards = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data, dict) else []
        if not shards:
            raise UmmError(f"{index} has no weight_map; re-save the model with save_pretrained.")
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return None
    out: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        path = model_dir / shard
        if not path.is_file():
            raise UmmError(f"{model_dir}: the weight index names the shard {shard}, which is missing.")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    out[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises several types for a damaged file
            raise UmmError(f"{path} is corrupt or not a safetensors file ({e}).") from e
    return out


def check_model(model_dir: str | os.PathLike, allow_moe: bool = False, full_check_max_gb: float = 2.0) -> ModelCheck:
    """Check that ``model_dir`` is a loadable one-output sequence-classification RM; :class:`UmmError` if not.

    A umm MoE (``umm`` key in config.json) is refused unless ``allow_moe``. Reads nothing from the network.
    """
    from umm_tools.evaluate import reward_model_config
    from umm_tools.utils import read_json

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UmmError(f"model folder not found: {model_dir}")
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any((model_dir / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (model.safetensors, or model.safetensors.index.json and its shards)")
    if not any((model_dir / f).is_file() for f in TOKENIZER_MARKERS):
        missing.append(f"a tokenizer ({', '.join(TOKENIZER_MARKERS)})")
    if missing:
        raise UmmError(
            f"{model_dir} is not a complete reward-model folder: missing {'; '.join(missing)}. Found: "
            f"{_found(model_dir)}. Push the folder written by umm collapse (or any save_pretrained RM with its "
            "tokenizer)."
        )
    raw = read_json(model_dir / "config.json", what="model config")
    if not isinstance(raw, dict):
        raise UmmError(f"{model_dir / 'config.json'} does not hold a JSON object.")
    is_moe = "umm" in raw
    if is_moe and not allow_moe:
        raise UmmError(
            f"{model_dir} is a umm MoE reward model ({raw.get('model_type')}, 'umm' key in config.json), not the "
            "dense RM that UMM-RM publishes. Run `umm learn-merge` and `umm collapse` to merge it into a dense RM "
            "and push that, or pass --allow-moe to push the MoE itself."
        )
    config = reward_model_config(str(model_dir))  # one-output sequence-classification, or UmmError

    headers = _safetensors_headers(model_dir)
    weight_bytes = sum(p.stat().st_size for p in model_dir.iterdir()
                       if p.is_file() and p.suffix in (".safetensors", ".bin"))
    n_params = None
    if headers is not None:
        n_params = 0
        for shape in headers.values():
            n = 1
            for d in shape:
                n *= d
            n_params += n
    loaded = headers is None or weight_bytes <= full_check_max_gb * 1e9
    if loaded:
        if headers is None and weight_bytes > full_check_max_gb * 1e9:
            logger.warning("%s has no safetensors weights: loading it fully to check it", model_dir)
        _load_and_score(model_dir)
    else:
        _check_against_headers(model_dir, config, headers)
        _check_tokenizer(model_dir)
    logger.info("checked %s: %s RM, %s of weights%s", model_dir, "MoE" if is_moe else "dense",
                human_size(weight_bytes), ", loaded and scored a text" if loaded else ", names and shapes match")
    return ModelCheck(raw, is_moe, weight_bytes, n_params, loaded)


def _load_and_score(model_dir: Path) -> None:
    import gc
    import math

    from umm_tools.evaluate import load_reward_model, score_texts

    try:
        rm, tokenizer = load_reward_model(str(model_dir), device="cpu")
    except UmmError:
        raise
    except Exception as e:  # a damaged checkpoint (size mismatch, bad dtype, ...) is the user's to fix
        raise UmmError(f"{model_dir} does not load as a reward model: {type(e).__name__}: {e}") from e
    try:
        reward = score_texts(rm, tokenizer, ["a quick check that the reward model scores text"], batch_size=1)
    except UmmError:
        raise
    except Exception as e:
        raise UmmError(f"{model_dir} loads but fails to score a text: {type(e).__name__}: {e}") from e
    if reward.numel() != 1 or not math.isfinite(float(reward[0])):
        raise UmmError(f"{model_dir} gives the reward {reward.tolist()} for a test text; the weights are broken.")
    del rm
    gc.collect()


def _check_against_headers(model_dir: Path, config: Any, headers: dict[str, tuple[int, ...]]) -> None:
    """Build the model on the meta device and compare its tensors with the safetensors headers."""
    import re

    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except Exception as e:  # an unknown model type / a config transformers cannot build
        raise UmmError(f"{model_dir} cannot be built as a sequence-classification model: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # MoE experts are fused in memory and stored per expert (or fused) on disk: check they exist per layer.
    experts = re.compile(r"(.*\.mlp\.experts)\.")
    want_experts = {m[1] for k in expected if (m := experts.match(k))}
    have_experts = {m[1] for k in headers if (m := experts.match(k))}
    missing = sorted(k for k in expected if not experts.match(k) and k not in headers)
    missing += sorted(f"{p}.*" for p in want_experts - have_experts)
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise UmmError(f"{model_dir} lacks weights the reward model needs: {shown}; they would be random.")
    wrong = [f"{k} {headers[k]} (expected {shape})" for k, shape in expected.items()
             if k in headers and headers[k] != shape]
    if wrong:
        raise UmmError(f"{model_dir}: tensors do not match config.json: {', '.join(wrong[:4])}.")
    unexpected = sorted(k for k in headers if k not in expected and not experts.match(k))
    if unexpected:
        logger.warning("%s holds %d tensor(s) the model does not use (e.g. %s)", model_dir, len(unexpected),
                       unexpected[0])


def _check_tokenizer(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise UmmError(f"could not load the tokenizer of {model_dir}: {type(e).__name__}: {e}") from e


def upload_files(model_dir: Path, ignore_patterns: list[str] | None = None) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every file to upload: all files of the folder, recursively, except hidden
    ones (``.git``, ``.cache``, temporary files), a top-level README.md (the card replaces it) and
    ``ignore_patterns``."""
    out = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == "README.md":
            continue
        if any(fnmatch.fnmatch(rel, pat) for pat in ignore_patterns or []):
            continue
        out.append((rel, path))
    return out


# ------------------------------------------------------------------------------------------ network
def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _server_says(e: BaseException) -> str:
    msg = getattr(e, "server_message", None) or str(e).strip().splitlines()[-1:] or [""]
    return msg if isinstance(msg, str) else msg[0]


def _call(what: str, fn: Callable[[], T], opts: PushOptions, endpoint: str) -> T:
    """Run one Hub request with retries on network errors; map failures to :class:`UmmError`."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    transport = transport_errors()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except OfflineModeIsEnabled as e:
            raise UmmError(f"{what}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push.") from e
        except (HfHubHTTPError, *transport) as e:
            status = _status(e)
            if status in (401, 403):
                raise UmmError(
                    f"{what}: the Hub at {endpoint} refused the request ({status}: {_server_says(e)}). {LOGIN_HINT}"
                ) from e
            retryable = status in RETRY_STATUS or (status is None and isinstance(e, transport))
            if not retryable:
                hint = LOGIN_HINT if status == 404 else "Nothing was committed."
                raise UmmError(f"{what}: the Hub answered {status}: {_server_says(e)}. {hint}") from e
            problem = f"HTTP {status}" if status else f"{type(e).__name__}: {e}"
            if attempt < opts.max_attempts:
                delay = opts.retry_backoff * 2 ** (attempt - 1)
                logger.warning("%s failed (%s); retrying in %.1f s (attempt %d of %d)", what, problem, delay,
                               attempt + 1, opts.max_attempts)
                time.sleep(delay)
                continue
            raise UmmError(
                f"{what} failed after {attempt} attempt(s): {problem}. Could not reach the Hub at {endpoint}: check "
                "the network connection and HF_ENDPOINT, then run the same command again (no commit was made; "
                "files the Hub already has are not sent twice)."
            ) from e


def _hub_license(api: Any, source: str) -> dict[str, str] | None:
    """The license on the source model's card (one request; any failure only means no license)."""
    try:
        data = api.model_info(source, expand=["cardData"]).card_data
    except Exception as e:  # noqa: BLE001 - optional lookup
        logger.info("could not read the license of %s from the Hub (%s)", source, type(e).__name__)
        return None
    data = data.to_dict() if data is not None and hasattr(data, "to_dict") else (data or {})
    if not data.get("license"):
        return None
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


# ------------------------------------------------------------------------------------------ push
def push(model_dir: str | os.PathLike, repo_id: str, opts: PushOptions | None = None) -> PushResult:
    """Check ``model_dir``, render its model card and upload both to the Hub repo ``repo_id``.

    Returns a :class:`PushResult` (commit and PR urls, files and sizes, the card). Raises :class:`UmmError`
    when a check fails (before any network access) or the Hub refuses; ``model_dir`` is never modified.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from umm_tools import __version__
    from umm_tools.card import base_model_of, gather_card_inputs, local_license, render_card

    opts = opts or PushOptions()
    model_dir = Path(model_dir).expanduser().absolute()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UmmError(f"{repo_id!r} is not a valid Hub repo id (ORG/NAME or NAME): {e}") from e
    if opts.revision and opts.revision.startswith("refs/") and not opts.revision.startswith("refs/pr/"):
        raise UmmError(f"revision {opts.revision!r}: give a branch name (or refs/pr/N to update an open PR).")
    revision = opts.revision or "main"

    check = check_model(model_dir, opts.allow_moe, opts.full_check_max_gb)
    files = upload_files(model_dir, opts.ignore_patterns)
    inputs = gather_card_inputs(model_dir, opts.eval_results, opts.ppo_summary, n_params=check.n_params)

    api = None
    license = {"license": opts.license} if opts.license else local_license(inputs)
    source = base_model_of(inputs, opts.base_model, warn=False)
    if license is None and not opts.dry_run and source:
        from huggingface_hub import HfApi

        api = HfApi(token=opts.token)
        license = _hub_license(api, source)
    if license is None:
        logger.warning("no license found for the card%s; pass --license (usually the source model's license)",
                       " (a real push also looks at the source's card on the Hub)" if opts.dry_run and source else "")
    def card_for(repo: str) -> str:
        return str(render_card(inputs, repo, license=license, base_model=opts.base_model, datasets=opts.datasets,
                               tags=opts.tags))

    card_text = card_for(repo_id)
    card_bytes = card_text.encode()
    listing = sorted([(rel, path.stat().st_size) for rel, path in files] + [("README.md", len(card_bytes))])

    card_path = None
    if opts.card_output or opts.dry_run:
        card_path = Path(opts.card_output).expanduser() if opts.card_output else \
            Path(tempfile.mkdtemp(prefix="umm-push-card-")) / "README.md"
        card_path.parent.mkdir(parents=True, exist_ok=True)
        card_path.write_bytes(card_bytes)
    if opts.dry_run:
        result = PushResult(repo_id, revision, listing, card_text, True, card_path)
        logger.info("dry run: %d files (%s) would go to %s@%s; card in %s", len(listing),
                    human_size(sum(s for _, s in listing)), repo_id, revision, card_path)
        return result

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from umm_tools.utils import is_quiet

    api = api or HfApi(token=opts.token)
    endpoint = api.endpoint or constants.ENDPOINT
    quiet = is_quiet()
    if quiet:
        disable_progress_bars()
    try:
        repo_url = _call(f"create repo {repo_id}", lambda: api.create_repo(
            repo_id, private=opts.private, exist_ok=True), opts, endpoint)
        if getattr(repo_url, "repo_id", None) and repo_url.repo_id != repo_id:  # 'name' resolves to 'user/name'
            repo_id = repo_url.repo_id
            card_text = card_for(repo_id)  # the usage snippet names the repo
            card_bytes = card_text.encode()
            listing = sorted([(p, n) for p, n in listing if p != "README.md"] + [("README.md", len(card_bytes))])
        if revision != "main" and not revision.startswith("refs/"):
            _call(f"create branch {revision}", lambda: api.create_branch(
                repo_id, branch=revision, exist_ok=True), opts, endpoint)
        operations: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
        deleted: list[str] = []
        if opts.delete_stale_weights:
            remote = _call(f"list files of {repo_id}@{revision}", lambda: api.list_repo_files(
                repo_id, revision=revision), opts, endpoint)
            ours = {rel for rel, _ in files}
            deleted = sorted(p for p in remote if p not in ours and "/" not in p and any(
                fnmatch.fnmatch(p, pat) for pat in STALE_WEIGHT_PATTERNS))
            operations += [CommitOperationDelete(path_in_repo=p) for p in deleted]
            if deleted:
                logger.info("deleting stale weight files on %s@%s: %s", repo_id, revision, ", ".join(deleted))
        message = opts.commit_message or "Upload reward model with umm push"
        description = (f"Pushed with umm {__version__}: {len(files)} files from {model_dir.name} and the model card."
                       + (f" Source: {inputs.source}." if inputs.source and source else ""))

        def commit() -> Any:
            try:
                return api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                                         revision=revision, create_pr=opts.create_pr)
            except ValueError as e:
                if "metadata" in str(e).lower():  # README.md validation by the Hub, before anything is uploaded
                    raise UmmError(f"the Hub rejected the model card's metadata: {e}. Fix it with --license, "
                                   "--base-model, --datasets or --tags (check it with --dry-run).") from e
                raise

        info = _call(f"commit to {repo_id}@{revision}", commit, opts, endpoint)
    finally:
        if quiet:
            enable_progress_bars()
    result = PushResult(repo_id, revision, listing, card_text, False, card_path, repo_url=str(repo_url),
                        commit_url=info.commit_url, commit_oid=info.oid, pr_url=info.pr_url, deleted=deleted)
    logger.info("pushed %s to %s", model_dir, info.pr_url or info.commit_url)
    return result
