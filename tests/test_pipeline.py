"""umm run / umm validate: recipes, stage markers, skip / rerun / resume, and every shipped recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from umm_tools.cli import app

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates(recipe):
    r = _run("validate", str(recipe), "--no-show")
    assert r.exit_code == 0, r.output
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe opens with a comment: what it does, what it needs, the command"
    assert "umm run" in text.split("\n\n")[0] or "umm run" in text[:1500]


def test_recipe_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: out\nstages: [upcycle, train]\nupcycle: {num_expert: 3}\ntrain: {learning_rate: fast}\n")
    r = _run("validate", str(bad))
    assert r.exit_code == 2
    assert "upcycle.num_expert: unknown option" in r.output
    assert "train.learning_rate" in r.output
    order = tmp_path / "order.yaml"
    order.write_text("output_dir: out\nstages: [train, upcycle]\n")
    r = _run("validate", str(order))
    assert r.exit_code == 2 and "stages" in r.output and "order" in r.output
    r = _run("validate", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 1 and "not found" in r.output


FAST = ["--set", "train.max_steps=6", "--set", "learn-merge.steps=3", "--set", "ppo.total_steps=2",
        "--set", "ppo.eval_every=1"]


@pytest.mark.slow
def test_tiny_recipe_end_to_end_with_push(local_hub, tmp_path, monkeypatch):
    """Every stage runs; a rerun skips them all; a changed value reruns from its stage; push lands on the Hub."""
    from huggingface_hub import ModelCard

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = ["run", "recipes/tiny.yaml", "--set", f"output_dir={out}", "--set", "push.repo_id=org/tiny-umm",
            "--set", "push.dry_run=false", *FAST]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    for stage in ("upcycle", "train", "learn-merge", "collapse", "eval", "ppo", "push"):
        assert (out / stage / ".umm_stage.json").is_file(), stage
        assert f"[{stage}] running" in r.output
    assert json.loads((out / "collapse" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    card = ModelCard.load("org/tiny-umm")
    assert card.data.eval_results and "reward-model" in card.data.tags
    assert {r.dataset_name for r in card.data.eval_results} >= {"heldout.jsonl"}

    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert r.output.count("up to date, skipped") == 7

    r = _run(*args, "--set", "learn-merge.steps=2", "--dry-run")
    assert r.exit_code == 0
    assert "[train] up to date" in r.output and "[learn-merge] would run (options or inputs changed)" in r.output
    assert "[collapse] would run (learn-merge reruns)" in r.output

    r = _run(*args, "--set", "learn-merge.steps=2", "--until", "collapse")
    assert r.exit_code == 0, r.output
    assert "[train] up to date" in r.output and "[learn-merge] running" in r.output and "[collapse] running" in r.output
    assert "[eval]" not in r.output


def test_interrupted_stage_is_never_taken_for_finished(tmp_path, monkeypatch):
    import umm_tools.collapse as collapse_mod

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = ["run", "recipes/tiny.yaml", "--set", f"output_dir={out}", "--set", "learn-merge.mode=uniform",
            "--until", "collapse", *FAST]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(collapse_mod, "collapse", killed)
    r = _run(*args, "--set", "stages=[upcycle, learn-merge, collapse]")
    assert r.exit_code == 130
    assert (out / "learn-merge" / ".umm_stage.json").is_file()
    assert not (out / "collapse" / ".umm_stage.json").exists()
    monkeypatch.undo()
    monkeypatch.chdir(ROOT)
    r = _run(*args, "--set", "stages=[upcycle, learn-merge, collapse]")
    assert r.exit_code == 0, r.output
    assert "[upcycle] up to date" in r.output and "[collapse] running (not finished yet)" in r.output
    assert (out / "collapse" / ".umm_stage.json").is_file()
