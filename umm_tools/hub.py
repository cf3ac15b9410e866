"""Resolving Hub ids to local folders (download side). Upload and model cards live here too, later.

Everything goes through ``huggingface_hub``, so ``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and
``HF_ENDPOINT`` behave exactly as for every other Hugging Face tool.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from umm_tools.errors import UmmError
from umm_tools.utils import is_quiet

logger = logging.getLogger(__name__)

# What a model stage needs from a repo: config, weights and their index, tokenizer files.
MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template*",
    "umm_*.json",
    "*.jsonl",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP library huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    import contextlib
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            errors.append(getattr(mod, "TransportError", None) or mod.exceptions.ConnectionError)
    return tuple(errors)


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/")) and ".." not in text


def resolve_model(source: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder for ``source``: the folder itself, or a Hub snapshot fetched with progress.

    Only the files a model needs are fetched (``allow_patterns``, default :data:`MODEL_PATTERNS`).
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UmmError(f"{source} is a file; expected a model folder (config.json + weights) or a Hub id.")
        if revision:
            logger.warning("--revision %s is ignored for the local folder %s", revision, source)
        return path
    if not looks_like_repo_id(source):
        raise UmmError(f"{source}: no such folder, and it is not a Hub id of the form org/name.")
    return _download(source, revision, allow_patterns or MODEL_PATTERNS)


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    how = (
        "Pass a local folder instead (for example one made with `hf download ORG/NAME --local-dir DIR`), "
        "or set HF_ENDPOINT to a Hub mirror you can reach."
    )
    if is_quiet():
        disable_progress_bars()
    try:
        logger.info("fetching %s%s from the Hub", repo_id, f"@{revision}" if revision else "")
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except GatedRepoError as e:
        raise UmmError(f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN).") from e
    except RevisionNotFoundError as e:
        raise UmmError(f"{repo_id}: revision {revision!r} not found. Check the branch, tag or commit.") from e
    except RepositoryNotFoundError as e:
        raise UmmError(
            f"{repo_id}: repository not found on the Hub (or it is private and you are not logged in). "
            f"Check the id, log in with `hf auth login` or HF_TOKEN, or: {how}"
        ) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise UmmError(f"{repo_id}: cannot reach the Hub and no cached copy was found ({e.__class__.__name__}). {how}") from e
    except HfHubHTTPError as e:
        raise UmmError(f"{repo_id}: the Hub answered with an error: {e}. {how}") from e
    except (OSError, *transport_errors()) as e:
        raise UmmError(f"{repo_id}: network error while downloading ({e}). {how}") from e
    finally:
        if is_quiet():
            enable_progress_bars()
    return Path(folder)
