"""Shared fixtures: tiny dense models built from a config once per session, the local Hub server."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import tiny  # noqa: E402
from hub_server import local_hub  # noqa: E402,F401  (fixture)


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory):
    """A factory of tiny dense models saved once per session: dense_models(model_type, head, **overrides)."""
    root = tmp_path_factory.mktemp("dense")
    cache: dict[str, str] = {}

    def make(model_type: str = "llama", head: str = "seqcls", **overrides) -> str:
        key = f"{model_type}-{head}-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        if key not in cache:
            path = root / key.replace("/", "_").replace(" ", "")
            tiny.make_dense(path, model_type, head, **overrides)
            cache[key] = str(path)
        return cache[key]

    return make
