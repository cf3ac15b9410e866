"""The ``umm`` command line: thin commands over the library functions.

Every stage's options are a pydantic model; its fields become the command's flags (help text from each
field's description, so it is written once). A command also takes ``--config FILE.yaml`` (that stage's
options, or a recipe whose section of that stage's name holds them) and ``--set key=value`` overrides;
explicit flags win over ``--set``, which wins over the file.

Exit codes: 0 success; 1 a user-facing failure (:class:`UmmError`, printed without a traceback); 2 a bad
option or config value (one ``field: message`` line per problem); 130 interrupted. Anything else is a bug
and keeps its traceback. Heavy libraries are imported inside the commands, so ``umm --help`` is instant.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import typer

from umm_tools import __version__
from umm_tools.errors import OptionsError, UmmError

app = typer.Typer(
    name="umm",
    help="umm: Upcycle-and-Merge MoE reward models. Upcycle a dense RM into a shared-expert MoE, train it, "
    "merge the experts back into one dense RM, and check with PPO that it is harder to reward-hack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

logger = logging.getLogger("umm_tools")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"umm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debugging detail.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")] = False,
) -> None:
    """Set up logging once for every command."""
    from umm_tools.utils import set_quiet

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[umm] %(message)s" if not verbose else "[%(name)s] %(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    set_quiet(quiet)
    import os

    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also silences transformers' bars
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------------------------
# Options models -> flags


def _flag_type(annotation: Any) -> Any | None:
    """The CLI type for a pydantic field annotation, or None if it can only be set via --config/--set."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else None
    if origin is Literal or annotation in (int, float, str, bool, Path):
        return annotation
    if origin is list and typing.get_args(annotation) and typing.get_args(annotation)[0] in (str, int, float):
        return annotation
    return None


def _load_section(path: str, stage: str) -> dict[str, Any]:
    from umm_tools.config import load_yaml
    from umm_tools.pipeline import STAGE_INPUTS

    data = load_yaml(path)
    section = data.get(stage)
    section = dict(section) if isinstance(section, dict) else data
    # A recipe section may also name the stage's inputs (for `umm run`); here the command line gives them.
    for key in STAGE_INPUTS.get(stage, ()):
        section.pop(key, None)
    return section


def print_validation_error(err: Any, source: str = "") -> None:
    """One ``field: message`` line per problem, on stderr."""
    prefix = f"{source}: " if source else ""
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(options)"
        msg = e["msg"]
        if e.get("type") == "extra_forbidden":
            msg = "unknown option (check the spelling; `umm <command> --help` lists them)"
        typer.echo(f"{prefix}{loc}: {msg}", err=True)


def run_safely(fn: Callable[[], Any]) -> Any:
    """Run a command body, mapping user-facing failures to exit codes (library code never exits)."""
    from pydantic import ValidationError

    try:
        return fn()
    except OptionsError as e:
        for line in e.lines:
            typer.echo(line, err=True)
        raise typer.Exit(2) from None
    except ValidationError as e:
        print_validation_error(e)
        raise typer.Exit(2) from None
    except UmmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing half-written was left in the output folder.", err=True)
        raise typer.Exit(130) from None


def stage_command(
    name: str,
    options_cls: Callable[[], type],
    arguments: list[tuple[str, str, bool | str]],
    run: Callable[..., Any],
    help: str,
    extra: list[tuple[str, Any]] | None = None,
) -> None:
    """Register ``umm NAME``: positional ``arguments`` (name, help, required), then one flag per option field.

    ``options_cls`` is a zero-argument function returning the model, so the module defining it is imported
    only when needed... but the fields must be known to build ``--help``: option modules keep heavy imports
    inside functions, so importing them is cheap.
    """
    cls = options_cls()
    params: list[inspect.Parameter] = []
    for arg, arg_help, required in arguments:
        if required == "variadic":
            ann = Annotated[list[str], typer.Argument(help=arg_help)]
        elif required:
            ann = Annotated[str, typer.Argument(help=arg_help)]
        else:
            ann = Annotated[Optional[str], typer.Argument(help=arg_help)]
        params.append(inspect.Parameter(arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann,
                                        default=None if required is False else inspect.Parameter.empty))
    option_names: list[str] = []
    for fname, field in cls.model_fields.items():
        ftype = _flag_type(field.annotation)
        if ftype is None or fname in {a for a, _, _ in arguments}:
            continue
        flag = "--" + fname.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if ftype is bool else flag
        default = field.default if field.default is not None and not callable(field.default) else None
        if ftype is bool:
            shown = "on" if default else "off"
        else:
            shown = default
        help_text = (field.description or "") + (f"  (default: {shown})" if shown is not None else "")
        ann = Annotated[Optional[ftype], typer.Option(decl, help=help_text, show_default=False)]
        params.append(inspect.Parameter(fname, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))
        option_names.append(fname)
    for pname, pann in extra or []:
        params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=pann))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", help=f"YAML file with these options (or a recipe: its '{name}' "
                                     "section is used). Flags override it.")]))
    params.append(inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[list[str]], typer.Option("--set", help="Override one option: --set key=value (repeatable; values "
                                          "are YAML, dotted keys reach nested options).")]))

    def impl(**kw: Any) -> Any:
        from umm_tools.config import apply_overrides

        def body() -> Any:
            from pydantic import ValidationError

            config, overrides = kw.pop("config"), kw.pop("overrides") or []
            positional = {a: kw.pop(a) for a, _, _ in arguments}
            positional.update({p: kw.pop(p) for p, _ in extra or []})
            data = _load_section(str(config), name) if config else {}
            apply_overrides(data, overrides)
            data.update({k: v for k, v in kw.items() if v is not None})
            try:
                opts = cls.model_validate(data)
            except ValidationError as e:
                print_validation_error(e, str(config) if config else "")
                raise typer.Exit(2) from None
            return run(opts=opts, **positional)

        return run_safely(body)

    impl.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    impl.__annotations__ = {p.name: p.annotation for p in params}
    impl.__doc__ = help
    app.command(name, help=help)(impl)


# --------------------------------------------------------------------------------------------------------
# Commands


def _upcycle_options():
    from umm_tools.upcycle import UpcycleOptions

    return UpcycleOptions


def _run_upcycle(source: str, output_dir: str, opts: Any) -> None:
    from umm_tools.upcycle import upcycle

    out = upcycle(source, output_dir, opts)
    typer.echo(f"MoE reward model written to {out}")


stage_command(
    "upcycle",
    _upcycle_options,
    [("source", "Dense RM to upcycle: a local folder or a Hub id (org/name).", True),
     ("output_dir", "Folder to write the Qwen2-MoE RM to (must not exist unless --overwrite).", True)],
    _run_upcycle,
    help="Turn a dense Llama/Mistral/Qwen2 RM (CausalLM or SequenceClassification) into a function-preserving "
    "shared-expert MoE RM in the standard Qwen2-MoE format.",
)


def _eval_options():
    from umm_tools.evaluate import EvalOptions

    return EvalOptions


def _run_eval(model: str, data: str, opts: Any) -> None:
    from umm_tools.evaluate import evaluate, format_report

    result = evaluate(model, data, opts)
    typer.echo(format_report(result))
    if opts.output:
        typer.echo(f"JSON report written to {opts.output}")


stage_command(
    "eval",
    _eval_options,
    [("model", "Reward model: a folder or Hub id (any one-output sequence-classification RM).", True),
     ("data", "Preference data: a Hub dataset id or a .jsonl/.json/.parquet/.csv file.", True)],
    _run_eval,
    help="Measure any reward model on preference pairs: pairwise accuracy with a 95% interval, mean margin, "
    "per-subset accuracy.",
)


def _train_options():
    from umm_tools.train import TrainOptions

    return TrainOptions


def _run_train(model: str, data: str, output_dir: str, opts: Any) -> None:
    from umm_tools.train import train

    out = train(model, data, output_dir, opts)
    extra = " and routing_stats.json" if (Path(out) / "routing_stats.json").is_file() else ""
    typer.echo(f"trained reward model, metrics.json{extra} written to {out}")


stage_command(
    "train",
    _train_options,
    [("model", "RM to train: a MoE folder from `umm upcycle`, or any dense RM (the baseline), folder or Hub id.", True),
     ("data", "Preference data: a Hub dataset id or a .jsonl/.json/.parquet/.csv file.", True),
     ("output_dir", "Folder for the trained model, metrics.json, routing_stats.json and checkpoints.", True)],
    _run_train,
    help="Train a reward model on preference pairs (Bradley-Terry loss; for a MoE, plus the router load-balancing "
    "loss) with TRL's RewardTrainer; runs unchanged under `accelerate launch` / torchrun.",
)


def _learn_merge_options():
    from umm_tools.learn_merge import LearnMergeOptions

    return LearnMergeOptions


def _run_learn_merge(paths: list[str], models: list[str] | None, opts: Any) -> None:
    from umm_tools.learn_merge import learn_merge, learn_merge_models

    if models:
        names = [m for item in models for m in item.split(",") if m]
        if len(paths) not in (1, 2):
            raise UmmError("with --models give DATA OUTPUT (or only OUTPUT for --mode uniform).")
        data, output = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
        out = learn_merge_models(names, data, output, opts)
        typer.echo(f"merge weights and a mergekit YAML written to {out}; merge with: umm mergekit {out}/merge.yaml OUT")
        return
    if len(paths) not in (2, 3):
        raise UmmError("expected MOE_DIR DATA OUTPUT (or MOE_DIR OUTPUT for --mode uniform|stats without data).")
    moe_dir, data, output = (paths[0], paths[1], paths[2]) if len(paths) == 3 else (paths[0], None, paths[1])
    out = learn_merge(moe_dir, data, output, opts)
    typer.echo(f"merge weights written to {out}/merge_weights.json; next: umm collapse {moe_dir} "
               f"{out}/merge_weights.json DENSE_OUT")


stage_command(
    "learn-merge",
    _learn_merge_options,
    [("paths", "MOE_DIR DATA OUTPUT: the trained MoE RM folder, preference data (Hub id or file), and the output "
      "folder for merge_weights.json. DATA may be left out for --mode uniform or stats. With --models: DATA OUTPUT.",
      "variadic")],
    _run_learn_merge,
    help="Learn convex per-layer weights that merge the MoE's experts (or several dense RMs, with --models) into "
    "one dense FFN, fitted by the Bradley-Terry loss on the dense model they define.",
    extra=[("models", Annotated[Optional[list[str]], typer.Option(
        "--models", help="Learn weights over several dense RMs of one architecture instead (WARM with learned "
        "weights): repeat the flag or give a comma-separated list. Writes a mergekit YAML too.")])],
)


def _collapse_options():
    from umm_tools.collapse import CollapseOptions

    return CollapseOptions


def _run_collapse(moe_dir: str, merge_weights: str, output_dir: str, opts: Any) -> None:
    from umm_tools.collapse import collapse

    if Path(merge_weights).is_dir():
        merge_weights = str(Path(merge_weights) / "merge_weights.json")
    out = collapse(moe_dir, merge_weights, output_dir, opts)
    typer.echo(f"dense reward model written to {out}")


stage_command(
    "collapse",
    _collapse_options,
    [("moe_dir", "MoE RM folder written by `umm upcycle` (and trained with `umm train`).", True),
     ("merge_weights", "merge_weights.json written by `umm learn-merge` (or a folder holding it).", True),
     ("output_dir", "Folder for the dense RM in the source architecture.", True)],
    _run_collapse,
    help="Average the experts with the merge weights and write an ordinary dense RM of the source architecture "
    "(same size and cost as the model you started from).",
)


@app.command("mergekit")
def mergekit_cmd(
    config: Annotated[Path, typer.Argument(help="mergekit YAML config (may use merge_method: umm_learned).")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for the merged model.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT_DIR once the merge is complete.")] = False,
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="Copy the base model's tokenizer.")] = True,
) -> None:
    """Run a mergekit YAML with umm's learned-weight merge method registered (like mergekit-yaml)."""

    def body() -> None:
        from umm_tools.merge_method import run_mergekit_yaml

        out = run_mergekit_yaml(config, output_dir, overwrite=overwrite, copy_tokenizer=copy_tokenizer)
        typer.echo(f"merged model written to {out}")

    run_safely(body)


def _ppo_options():
    from umm_tools.ppo import PPOOptions

    return PPOOptions


def _run_ppo(policy: str, prompts: str, output_dir: str, opts: Any) -> None:
    from umm_tools.ppo import ppo

    if not opts.reward_model:
        raise UmmError("--reward-model is required: the RM (folder or Hub id) whose score PPO maximises.")
    out = ppo(policy, prompts, output_dir, opts)
    typer.echo(f"PPO finished: policy, metrics.jsonl, plot.png and summary.json in {out}")


stage_command(
    "ppo",
    _ppo_options,
    [("policy", "Policy to optimise: a causal LM folder or Hub id.", True),
     ("prompts", "Prompts: a .jsonl/.json/.csv/.parquet file or Hub dataset with a prompt (or messages) column.",
      True),
     ("output_dir", "Folder for the policy, metrics.jsonl, plot.png and summary.json.", True)],
    _run_ppo,
    help="PPO against a reward model, with an optional gold RM only watched, to measure reward hacking "
    "(proxy rises while gold falls).",
)


def _push_options():
    from umm_tools.push import PushOptions

    return PushOptions


def _run_push(model_dir: str, repo_id: str, opts: Any) -> None:
    from umm_tools.push import push

    typer.echo(push(model_dir, repo_id, opts).format())


stage_command(
    "push",
    _push_options,
    [("model_dir", "Dense RM folder to publish (normally the output of umm collapse).", True),
     ("repo_id", "Hub repo to create or update: org/name (or name, for your own namespace).", True)],
    _run_push,
    help="Publish a reward model to the Hugging Face Hub with a model card carrying its lineage, merge weights, "
    "evaluation and reward-hacking results. Nothing is uploaded when a check fails; --dry-run only writes the card.",
)


def _demo_options():
    from umm_tools.demo.run import DemoOptions

    return DemoOptions


def _run_demo(opts: Any) -> None:
    from umm_tools.demo.run import run_demo

    out = run_demo(opts)
    results = Path(out) / "results.md"
    if results.is_file():
        typer.echo(results.read_text())
    typer.echo(f"demo output (table, results.json, gold_curves.png) in {out}")


stage_command(
    "demo",
    _demo_options,
    [],
    _run_demo,
    help="The built-in reward-hacking benchmark: no arguments, no network, ~10 minutes on 2 CPU cores. A synthetic "
    "world with a known gold reward and a planted spurious feature; a dense RM and a UMM-RM are trained on the same "
    "pairs and each drives PPO while the gold reward watches. Prints a table and writes a plot.",
)


STAGE_NAMES = "upcycle, train, learn-merge, collapse, eval, ppo, push"


@app.command("run")
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: output_dir, model, data, stages and one section a stage.")],
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a recipe value: --set train.learning_rate=1e-5 (repeatable; values are YAML).")] = None,
    from_stage: Annotated[Optional[str], typer.Option(
        "--from", help=f"Rerun from this stage on, even if up to date ({STAGE_NAMES}).")] = None,
    until_stage: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and which stages would run.")
                       ] = False,
) -> None:
    """Run a recipe's stages in order; finished stages whose options and inputs are unchanged are skipped."""

    def body() -> None:
        from umm_tools import pipeline

        r = pipeline.load_recipe(recipe, overrides or [])
        if dry_run:
            typer.echo(pipeline.resolved_yaml(r))
        pipeline.run(r, from_stage, until_stage, dry_run=dry_run, echo=typer.echo)

    run_safely(body)


@app.command("validate")
def validate_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML to check against every stage's options schema.")],
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value (key=value).")] = None,
    show: Annotated[bool, typer.Option("--show/--no-show", help="Print the resolved recipe with defaults.")] = True,
) -> None:
    """Check a recipe without running anything: one `field: message` line per problem (exit 2)."""

    def body() -> None:
        from umm_tools import pipeline

        r = pipeline.load_recipe(recipe, overrides or [])
        if show:
            typer.echo(pipeline.resolved_yaml(r))
        typer.echo(f"{recipe}: valid ({', '.join(r.stages)})")

    run_safely(body)


def entry() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    entry()
