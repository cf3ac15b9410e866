"""Small helpers shared by every stage: progress bars, atomic output folders, seeding, JSON files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from umm_tools.errors import UmmError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar umm draws; the CLI's ``--quiet`` calls this."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET or os.environ.get("UMM_QUIET", "") not in ("", "0")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Iterator[T]:
    """A tqdm bar that honours ``--quiet``; same arguments as ``tqdm.tqdm``."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    disable = kwargs.pop("disable", False)
    return tqdm(iterable, disable=is_quiet() or disable, **kwargs)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``output_dir``; rename it into place only if the block succeeds.

    After an exception (Ctrl-C included) the temporary folder is removed and ``output_dir`` is untouched,
    so nothing half-written is ever found at ``output_dir``. An existing ``output_dir`` is refused unless
    ``overwrite`` is true, in which case it is replaced only once the new one is complete.
    """
    out = Path(output_dir).absolute()
    if out.exists() and not overwrite:
        raise UmmError(f"{out} already exists; choose another output folder or pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), pretty-printed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file, raising :class:`UmmError` that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UmmError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UmmError(f"{path} is not valid JSON ({e}); regenerate it or fix the file.") from e


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
