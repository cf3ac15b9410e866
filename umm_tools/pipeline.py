"""``umm run RECIPE.yaml``: the stages in order, each skipped when its finished output is still valid.

A recipe names the dense source model, the data, the stages to run and one section per stage holding that
stage's options (the same schema as the command's flags) and, where the stage needs them, its inputs::

    output_dir: runs/tiny
    model: path/or/hub-id          # the dense RM that upcycle starts from (and the dense baseline)
    data: prefs.jsonl              # training preference pairs (train, learn-merge)
    eval_data: heldout.jsonl       # eval stage (default: data)
    stages: [upcycle, train, learn-merge, collapse, eval, ppo, push]
    upcycle: {num_experts: 4, top_k: 2}
    train: {max_steps: 100}
    ppo: {policy: sft-policy, prompts: prompts.jsonl, gold_model: gold-rm}
    push: {repo_id: org/name}

Outputs go to ``output_dir/<stage>/``. When a stage finishes, a marker ``.umm_stage.json`` is written in
its folder with the hash of its resolved options and of its inputs (the markers of the stages it reads, or
the content of the files and folders it reads). A rerun skips a stage whose marker matches and reruns
from the first stage whose options or inputs changed; everything after it reruns too, since its inputs
changed. A stage killed in the middle has no marker, so it is never taken for finished: it reruns (train
and ppo resume from their last checkpoint when their options are unchanged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from umm_tools.errors import OptionsError, UmmError
from umm_tools.utils import write_json

logger = logging.getLogger(__name__)

STAGES = ("upcycle", "train", "learn-merge", "collapse", "eval", "ppo", "push")
MARKER = ".umm_stage.json"
# Options that do not change what a stage produces (or are secrets): left out of hashes and markers.
VOLATILE = {"overwrite", "resume", "resume_from", "token"}
STARTED = ".umm_stage_started.json"

# Inputs a stage takes besides its options; in a recipe section they sit beside the options.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "upcycle": ("source",),
    "train": ("model", "data"),
    "learn-merge": ("moe_dir", "data"),
    "collapse": ("moe_dir", "merge_weights"),
    "eval": ("model", "data"),
    "ppo": ("policy", "prompts"),
    "push": ("model_dir", "repo_id"),
}


def options_class(stage: str) -> type:
    """The options model of a stage (imported lazily: stage modules keep heavy imports inside functions)."""
    if stage == "upcycle":
        from umm_tools.upcycle import UpcycleOptions as cls
    elif stage == "train":
        from umm_tools.train import TrainOptions as cls
    elif stage == "learn-merge":
        from umm_tools.learn_merge import LearnMergeOptions as cls
    elif stage == "collapse":
        from umm_tools.collapse import CollapseOptions as cls
    elif stage == "eval":
        from umm_tools.evaluate import EvalOptions as cls
    elif stage == "ppo":
        from umm_tools.ppo import PPOOptions as cls
    elif stage == "push":
        from umm_tools.push import PushOptions as cls
    else:  # pragma: no cover - guarded by Recipe validation
        raise ValueError(stage)
    return cls


class Recipe(BaseModel):
    """A whole pipeline: where outputs go, the source model and data, the stages and their sections."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    output_dir: str = Field(description="Folder under which every stage writes output_dir/<stage>/.")
    model: str | None = Field(None, description="Dense source RM (folder or Hub id) for upcycle.")
    data: str | None = Field(None, description="Training preference data for train and learn-merge.")
    eval_data: str | None = Field(None, description="Preference data for the eval stage (default: data).")
    stages: list[str] = Field(description=f"Stages to run, in this order: {', '.join(STAGES)}.")
    upcycle: dict[str, Any] = Field(default_factory=dict, description="Options of umm upcycle.")
    train: dict[str, Any] = Field(default_factory=dict, description="Options of umm train.")
    learn_merge: dict[str, Any] = Field(default_factory=dict, alias="learn-merge",
                                        description="Options of umm learn-merge.")
    collapse: dict[str, Any] = Field(default_factory=dict, description="Options of umm collapse.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Options of umm eval.")
    ppo: dict[str, Any] = Field(default_factory=dict, description="Options of umm ppo, plus policy and prompts.")
    push: dict[str, Any] = Field(default_factory=dict, description="Options of umm push, plus repo_id.")

    @field_validator("stages")
    @classmethod
    def _known_and_ordered(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        if [s for s in STAGES if s in v] != v:
            raise ValueError(f"stages must keep the pipeline order: {', '.join(STAGES)}")
        return v

    def section(self, stage: str) -> dict[str, Any]:
        return dict(getattr(self, stage.replace("-", "_")))


@dataclass
class StagePlan:
    stage: str
    options: Any  # the validated options model
    inputs: dict[str, str]
    output: Path


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe (every section against its stage's schema); ``--set`` overrides apply first."""
    from umm_tools.config import apply_overrides, load_yaml

    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise OptionsError([f"{path}: {_loc(err)}: {err['msg']}" for err in e.errors()]) from None
    errors: list[str] = []
    for stage in STAGES:
        section = recipe.section(stage)
        opts = {k: v for k, v in section.items() if k not in STAGE_INPUTS[stage]}
        try:
            options_class(stage).model_validate(opts)
        except ValidationError as e:
            errors += [f"{path}: {stage}.{_loc(err)}: {err['msg']}" for err in e.errors()]
    if errors:
        raise OptionsError(errors)
    return recipe


def _loc(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(recipe)"
    return loc if err.get("type") != "extra_forbidden" else f"{loc}: unknown option (check the spelling)"


def _hash_path(path: Path) -> str:
    """Content hash of a file, or of a folder's files (names, sizes, modification times)."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        marker = path / MARKER
        if marker.is_file():  # an upstream stage: its marker already hashes everything it depends on
            h.update(marker.read_bytes())
        else:
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _hash_input(value: str) -> str:
    p = Path(value)
    return _hash_path(p) if p.exists() else hashlib.sha256(f"id:{value}".encode()).hexdigest()


def plan(recipe: Recipe) -> list[StagePlan]:
    """Resolve every selected stage's inputs (the previous stages' outputs) and options."""
    root = Path(recipe.output_dir)
    out = {s: root / s for s in STAGES}
    plans: list[StagePlan] = []
    chosen = set(recipe.stages)

    def need(value: str | None, what: str, stage: str) -> str:
        if not value:
            raise UmmError(f"recipe: stage {stage} needs {what}; set it in the recipe.")
        return value

    for stage in recipe.stages:
        section = recipe.section(stage)
        inputs = {k: section.pop(k) for k in list(section) if k in STAGE_INPUTS[stage]}
        opts_cls = options_class(stage)
        # The MoE that learn-merge and collapse read: the trained one if train runs (or ran), else the upcycled one.
        moe = str(out["train"]) if "train" in chosen or (out["train"] / MARKER).exists() else str(out["upcycle"])
        dense = str(out["collapse"])
        if stage == "upcycle":
            inputs.setdefault("source", need(recipe.model, "model (the dense source)", stage))
        elif stage == "train":
            inputs.setdefault("model", str(out["upcycle"]))
            inputs.setdefault("data", need(recipe.data, "data", stage))
        elif stage == "learn-merge":
            inputs.setdefault("moe_dir", moe)
            if section.get("mode", "learned") != "uniform" or recipe.data:
                inputs.setdefault("data", need(recipe.data, "data", stage))
        elif stage == "collapse":
            inputs.setdefault("moe_dir", moe)
            inputs.setdefault("merge_weights", str(out["learn-merge"] / "merge_weights.json"))
        elif stage == "eval":
            inputs.setdefault("model", dense)
            inputs.setdefault("data", need(recipe.eval_data or recipe.data, "eval_data or data", stage))
            section.setdefault("output", str(out["eval"] / "eval.json"))
        elif stage == "ppo":
            need(inputs.get("policy"), "ppo.policy (the policy to optimise)", stage)
            need(inputs.get("prompts"), "ppo.prompts", stage)
            section.setdefault("reward_model", dense)
        elif stage == "push":
            inputs.setdefault("model_dir", dense)
            need(inputs.get("repo_id"), "push.repo_id", stage)
            section.setdefault("card_output", str(out["push"] / "README.md"))
            if "eval" in chosen and "eval_results" in opts_cls.model_fields:
                section.setdefault("eval_results", [str(out["eval"] / "eval.json")])
            if "ppo" in chosen and "ppo_summary" in opts_cls.model_fields:
                section.setdefault("ppo_summary", [str(out["ppo"] / "summary.json")])
        plans.append(StagePlan(stage, opts_cls.model_validate(section), inputs, out[stage]))
    return plans


def _fingerprint(p: StagePlan) -> dict[str, str]:
    opts = p.options.model_dump(mode="json", exclude=VOLATILE & set(type(p.options).model_fields))
    cfg = hashlib.sha256(json.dumps({"stage": p.stage, "options": opts}, sort_keys=True).encode()).hexdigest()
    inputs = hashlib.sha256(
        json.dumps({k: _hash_input(v) for k, v in sorted(p.inputs.items())}, sort_keys=True).encode()
    ).hexdigest()
    return {"config_hash": cfg, "inputs_hash": inputs}


def status(p: StagePlan, fingerprint: dict[str, str]) -> str:
    """'done' (marker matches), 'changed' (marker differs) or 'missing' (never finished)."""
    marker = p.output / MARKER
    if not marker.is_file():
        return "missing"
    try:
        old = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "missing"
    same = all(old.get(k) == v for k, v in fingerprint.items())
    return "done" if same else "changed"


def _runner(stage: str) -> Callable[..., Any]:
    if stage == "upcycle":
        from umm_tools.upcycle import upcycle

        return lambda p: upcycle(p.inputs["source"], p.output, p.options)
    if stage == "train":
        from umm_tools.train import train

        return lambda p: train(p.inputs["model"], p.inputs["data"], str(p.output), p.options)
    if stage == "learn-merge":
        from umm_tools.learn_merge import learn_merge

        return lambda p: learn_merge(p.inputs["moe_dir"], p.inputs.get("data"), str(p.output), p.options)
    if stage == "collapse":
        from umm_tools.collapse import collapse

        return lambda p: collapse(p.inputs["moe_dir"], p.inputs["merge_weights"], p.output, p.options)
    if stage == "eval":
        from umm_tools.evaluate import evaluate

        def run_eval(p: StagePlan) -> Any:
            p.output.mkdir(parents=True, exist_ok=True)
            return evaluate(p.inputs["model"], p.inputs["data"], p.options)

        return run_eval
    if stage == "ppo":
        from umm_tools.ppo import ppo

        return lambda p: ppo(p.inputs["policy"], p.inputs["prompts"], str(p.output), p.options)
    if stage == "push":
        from umm_tools.push import push

        def run_push(p: StagePlan) -> Any:
            result = push(p.inputs["model_dir"], p.inputs["repo_id"], p.options)
            p.output.mkdir(parents=True, exist_ok=True)
            record = {k: v for k, v in vars(result).items() if k != "card_text"}
            write_json(p.output / "push.json", json.loads(json.dumps(record, default=str)))
            return result

        return run_push
    raise ValueError(stage)


def run(recipe: Recipe, from_stage: str | None = None, until_stage: str | None = None,
        dry_run: bool = False, echo: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Run (or, with ``dry_run``, only report) the recipe's stages; returns [(stage, what happened)]."""
    for name, value in (("--from", from_stage), ("--until", until_stage)):
        if value is not None and value not in recipe.stages:
            raise UmmError(f"{name} {value}: not one of this recipe's stages ({', '.join(recipe.stages)}).")
    plans = plan(recipe)
    report: list[tuple[str, str]] = []
    rerun_rest: str | None = None  # why every later stage reruns
    for p in plans:
        if from_stage and p.stage == from_stage:
            rerun_rest = "forced by --from"
        fp = _fingerprint(p)
        state = status(p, fp)
        if state == "done" and not rerun_rest:
            report.append((p.stage, "skip (up to date)"))
            echo(f"[{p.stage}] up to date, skipped")
        else:
            why = rerun_rest if rerun_rest and state == "done" else {
                "missing": "not finished yet", "changed": "options or inputs changed"}[state]
            report.append((p.stage, f"run ({why})"))
            rerun_rest = rerun_rest or f"{p.stage} reruns"  # every later stage reads this one's output
            if dry_run:
                echo(f"[{p.stage}] would run ({why})")
            else:
                echo(f"[{p.stage}] running ({why}) -> {p.output}")
                _run_stage(p, fp)
        if until_stage and p.stage == until_stage:
            break
    return report


def _run_stage(p: StagePlan, fp: dict[str, str]) -> None:
    started = p.output.parent / f".{p.stage}{STARTED}"
    resumable = "resume" in type(p.options).model_fields
    same_attempt = started.is_file() and json.loads(started.read_text()) == fp
    opts = p.options
    if p.output.exists():
        (p.output / MARKER).unlink(missing_ok=True)
        if resumable and same_attempt:
            opts = opts.model_copy(update={"resume": True})
            logger.info("%s: resuming the interrupted attempt", p.stage)
        elif p.stage in ("eval", "push"):
            pass  # these write single files into their folder
        else:
            shutil.rmtree(p.output)
    p.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(started, fp)
    t0 = time.time()
    _runner(p.stage)(StagePlan(p.stage, opts, p.inputs, p.output))
    kept = p.options.model_dump(mode="json", exclude=VOLATILE & set(type(p.options).model_fields))
    write_json(p.output / MARKER, {**fp, "stage": p.stage, "inputs": p.inputs, "options": kept,
                                   "seconds": round(time.time() - t0, 1), "finished": time.strftime("%FT%T")})
    started.unlink(missing_ok=True)


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every section's defaults filled in, as YAML (for --dry-run and umm validate)."""
    import yaml

    data = recipe.model_dump(by_alias=True, exclude_none=True)
    for stage in STAGES:
        section = recipe.section(stage)
        if stage not in recipe.stages and not section:
            data.pop(stage, None)
            continue
        inputs = {k: v for k, v in section.items() if k in STAGE_INPUTS[stage]}
        opts = options_class(stage).model_validate({k: v for k, v in section.items() if k not in inputs})
        data[stage] = {**inputs, **opts.model_dump(mode="json")}
    return yaml.safe_dump(data, sort_keys=False)
