"""Regenerate the tiny assets that recipes/tiny.yaml runs on (committed, so the recipe needs no network).

    python recipes/tiny/make_assets.py

Writes recipes/tiny/assets/: a tiny dense Llama RM (2 layers, width 64), a tiny causal-LM policy, a tiny
"gold" RM, and preference pairs / prompts of the learnable test task (chosen answers contain "good").
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

import tiny  # noqa: E402


def main() -> None:
    assets = HERE / "assets"
    shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir()
    tiny.make_dense(assets / "dense-rm", "llama", "seqcls", seed=0)
    tiny.make_dense(assets / "policy", "llama", "causal", seed=1)
    tiny.make_dense(assets / "gold-rm", "llama", "seqcls", seed=2)
    for name, n, seed in (("prefs.jsonl", 160, 0), ("heldout.jsonl", 40, 1)):
        rows = tiny.make_pairs(n, seed=seed)
        (assets / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"prompt": r["prompt"]} for r in tiny.make_pairs(24, seed=2)]
    (assets / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    print(f"wrote {assets}")


if __name__ == "__main__":
    main()
