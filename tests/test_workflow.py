"""The example release workflow parses and names a recipe and umm commands that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from umm_tools.cli import app

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release-rm.yml"


def test_release_workflow_is_valid_and_consistent():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get(True) or wf.get("on")  # YAML 1.1 reads the key `on` as True
    assert "push" in triggers and "workflow_dispatch" in triggers
    steps = wf["jobs"]["release"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    recipes = set(re.findall(r"recipes/[\w./-]+\.yaml", WORKFLOW.read_text()))
    assert recipes and all((ROOT / r).is_file() for r in recipes)
    import typer.main

    commands = set(typer.main.get_group(app).commands)
    used = set(re.findall(r"\bumm (\w[\w-]*)", runs))
    assert used and used <= commands, used - commands
    assert any("HF_TOKEN" in (s.get("env") or {}) for s in steps)
    for recipe in recipes:
        r = CliRunner().invoke(app, ["validate", str(ROOT / recipe), "--no-show"])
        assert r.exit_code == 0, r.output
