"""The acceptance path of `umm train` + `umm eval` through the CLI, for each preference-data format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
from typer.testing import CliRunner

from umm_tools.cli import app

runner = CliRunner()


def _rows(fmt: str, n: int, seed: int) -> list[dict]:
    rows = []
    for r in tiny.make_pairs(n, seed=seed):
        if fmt == "explicit":
            rows.append(r)
        elif fmt == "implicit":  # HH-RLHF style: whole dialogues sharing the prompt prefix
            head = f"\n\nHuman: {r['prompt']}\n\nAssistant:"
            rows.append({"chosen": f"{head} {r['chosen']}", "rejected": f"{head} {r['rejected']}"})
        else:  # conversational: message lists, rendered with the chat template
            user = {"role": "user", "content": r["prompt"]}
            rows.append({"chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                         "rejected": [user, {"role": "assistant", "content": r["rejected"]}]})
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["explicit", "implicit", "conversational"])
def test_train_moe_and_dense_then_eval_each_format(dense_models, tmp_path, fmt):
    dense = dense_models("llama", "seqcls")
    moe = tmp_path / "moe"
    assert runner.invoke(app, ["-q", "upcycle", dense, str(moe)]).exit_code == 0
    train = _write(tmp_path / "train.jsonl", _rows(fmt, 160, seed=1))
    heldout = _write(tmp_path / "heldout.jsonl", _rows(fmt, 60, seed=2))
    flags = ["--max-steps", "40", "--learning-rate", "0.003", "--batch-size", "8", "--eval-fraction", "0.1",
             "--eval-steps", "40", "--save-steps", "1000", "--max-length", "64"]
    for name, model in (("moe", str(moe)), ("dense", dense)):
        out = tmp_path / f"{name}-trained"
        r = runner.invoke(app, ["-q", "train", model, train, str(out), *flags])
        assert r.exit_code == 0, r.output
        assert (out / "metrics.json").is_file()
        assert (out / "routing_stats.json").is_file() == (name == "moe")
        report = tmp_path / f"{name}-eval.json"
        r = runner.invoke(app, ["-q", "eval", str(out), heldout, "--output", str(report)])
        assert r.exit_code == 0, r.output
        result = json.loads(report.read_text())
        assert result["n_pairs"] == 60
        assert result["accuracy"] > 0.8, (name, fmt, result["accuracy"])
    stats = json.loads((tmp_path / "moe-trained" / "routing_stats.json").read_text())
    assert len(stats["layers"]) == 2
    for layer in stats["layers"].values():
        assert sum(layer["routed_prob_share"]) == pytest.approx(1.0, abs=1e-6)
        assert sum(layer["routed_topk_share"]) == pytest.approx(1.0, abs=1e-6)
