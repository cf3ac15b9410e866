"""``umm demo``: the whole UMM-RM pipeline on a synthetic world whose gold reward is known.

Per seed (each seed draws its own data, models and PPO samples)::

    [1/9] world: word-level tokenizer, training pairs (length bias + label noise), held-out and shift pairs
    [2/9] pretrain the tiny policy (causal LM) on the world's language
    [3/9] RM source: the policy's backbone + one score head, as ...ForSequenceClassification
    [4/9] train the dense RM                      (umm train, the same pairs and steps as the MoE)
    [5/9] upcycle the RM source into a shared-expert MoE (umm upcycle, k-means routers on the prompts)
    [6/9] train the MoE RM                        (umm train)
    [7/9] learn-merge (learned and uniform weights) and collapse each into a dense RM (umm learn-merge, collapse)
    [8/9] accuracy of the four RMs on held-out and shift pairs (vs gold labels); scoring cost
    [9/9] PPO of the policy against each RM with the gold reward watched (umm ppo)

Then ``results.json`` (every figure of every seed, and mean/std over seeds), ``results.md`` (the table)
and ``gold_curves.png`` (gold reward during PPO, one line per RM, mean over seeds with a ±1 std band)
are written to the output folder, beside one ``seed_<n>/`` folder per seed with every model and run.

A PPO run counts as *hacked* when its gold reward ends more than :data:`HACK_MARGIN` below its peak while
the proxy reward ends above its value at the gold peak: the policy kept climbing the proxy after the
gold reward started to fall.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from umm_tools.config import Options
from umm_tools.demo.world import World
from umm_tools.errors import UmmError
from umm_tools.utils import atomic_output_dir, progress, write_json

logger = logging.getLogger(__name__)

HACK_MARGIN = 0.05  # gold units; see the module docstring

ROWS: dict[str, str] = {
    "dense": "dense RM",
    "moe": "MoE RM (unmerged)",
    "uniform": "uniform merge",
    "umm": "UMM-RM (learned merge)",
}
# The table's columns: (key in a row's figures, header, number format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("acc_heldout", "acc. held-out", ".3f"),
    ("acc_shift", "acc. shift", ".3f"),
    ("gold_peak", "gold peak", ".3f"),
    ("gold_end", "gold end", ".3f"),
    ("gold_drop", "drop (peak−end)", ".3f"),
    ("proxy_end", "proxy end", ".2f"),
    ("time_ratio", "time/batch vs dense", ".2f"),
    ("param_ratio", "params vs dense", ".2f"),
)
STAGES = 9
PPO_PROMPTS = 384  # prompts written for PPO, of which EVAL_PROMPTS are held out to measure gold and proxy
EVAL_PROMPTS = 128
COST_PAIRS = 32  # held-out pairs in the batch whose scoring is timed
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
_WORLD = World()  # the defaults of the world's knobs


class DemoOptions(Options):
    """Options of ``umm demo``. The defaults take a few minutes on 2 CPU cores (one seed)."""

    output: str = Field(
        "umm_demo_output",
        description="Folder for results.md, results.json, gold_curves.png and one seed_<n>/ folder of models and runs "
        "per seed.",
    )
    overwrite: bool = Field(False, description="Replace the output folder if it exists (once the new one is complete).")
    seeds: int = Field(1, ge=1, description="How many seeds to run (seed, seed+1, ...); the table shows mean ± std.")
    seed: int = Field(0, ge=0, description="The first seed.")
    quick: bool = Field(
        False,
        description="A much smaller run (about a minute) for CI: fewer pairs and steps. Sizes set explicitly still win.",
    )
    # --- the world -------------------------------------------------------------------------------------
    train_pairs: int = Field(3000, ge=16, description="Training preference pairs (both RMs train on the same ones).")
    eval_pairs: int = Field(500, ge=16, description="Held-out pairs, and as many shift pairs (gold labels).")
    spurious_rate: float = Field(
        _WORLD.spurious_rate, ge=0.0, le=1.0,
        description="Share of training pairs whose chosen answer is the longer one (the planted spurious feature); "
        "the shift pairs have the opposite share.",
    )
    label_noise: float = Field(
        _WORLD.label_noise, ge=0.0, lt=0.5, description="Share of training pairs with chosen and rejected swapped."
    )
    length_penalty: float = Field(
        _WORLD.length_penalty, ge=0.0, description="Gold reward lost per answer word beyond long_len."
    )
    long_len: int = Field(_WORLD.long_len, ge=3, description="Answers longer than this many words lose gold reward.")
    # --- models ----------------------------------------------------------------------------------------
    hidden_size: int = Field(64, ge=8, description="Width of the policy and of the RMs (4 attention heads).")
    num_layers: int = Field(2, ge=1, description="Decoder layers of the policy and of the RMs.")
    lm_steps: int = Field(600, ge=1, description="Pretraining steps of the policy on the world's language.")
    rm_steps: int = Field(400, ge=1, description="Training steps of the dense RM and of the MoE RM (the same).")
    rm_batch_size: int = Field(32, ge=1, description="Pairs per RM training step.")
    rm_learning_rate: float = Field(1e-3, gt=0, description="Learning rate of both RMs.")
    num_experts: int = Field(4, ge=1, description="Routed experts per MoE layer (the world has 4 regimes).")
    top_k: int = Field(2, ge=1, description="Routed experts active per token.")
    shared_share: float = Field(0.5, gt=0, lt=1, description="Share of the FFN carried by the shared expert at upcycle.")
    merge_steps: int = Field(100, ge=1, description="Optimisation steps of learn-merge (fitting the merge weights).")
    # --- PPO -------------------------------------------------------------------------------------------
    ppo_steps: int = Field(60, ge=1, description="PPO steps against each RM.")
    ppo_batch_size: int = Field(32, ge=4, description="Rollouts per PPO step (4 minibatches).")
    ppo_learning_rate: float = Field(2e-4, gt=0, description="PPO learning rate (policy and critic).")
    kl_coef: float = Field(0.02, ge=0, description="Weight of the KL penalty to the pretrained policy.")
    max_new_tokens: int = Field(24, ge=2, description="Longest PPO answer, in tokens.")
    eval_every: int = Field(5, ge=1, description="PPO steps between two measurements of gold and proxy reward.")
    ppo_workers: int = Field(
        2, ge=1,
        description="PPO runs at a time, each in its own process with one thread; 1 runs them one after the other "
        "in this process.",
    )

    @model_validator(mode="after")
    def _check(self) -> DemoOptions:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most num_experts ({self.num_experts})")
        if self.ppo_batch_size % 4:
            raise ValueError(f"ppo_batch_size ({self.ppo_batch_size}) must be a multiple of 4 (the minibatches)")
        return self


# Used for quick=True, for every knob not set explicitly.
QUICK: dict[str, Any] = dict(
    train_pairs=600, eval_pairs=128, lm_steps=150, rm_steps=60, merge_steps=20, ppo_steps=6, ppo_batch_size=16,
    max_new_tokens=16, eval_every=3, ppo_workers=1,
)


def resolve(opts: DemoOptions) -> DemoOptions:
    """The options the run uses: with ``quick``, the :data:`QUICK` sizes for every knob not set explicitly."""
    if not opts.quick:
        return opts
    return opts.model_copy(update={k: v for k, v in QUICK.items() if k not in opts.model_fields_set})


def world_of(opts: DemoOptions) -> World:
    return World(spurious_rate=opts.spurious_rate, label_noise=opts.label_noise,
                 length_penalty=opts.length_penalty, long_len=opts.long_len)


# ----------------------------------------------------------------------------------------------------------
# entry point


def run_demo(opts: DemoOptions | None = None) -> Path:
    """Run the demo (every seed) and write the report to ``opts.output``; returns that folder."""
    import torch

    opts = resolve(opts or DemoOptions())
    out = Path(opts.output).absolute()
    if out.exists() and not opts.overwrite:
        raise UmmError(f"{out} already exists; choose another folder with --output or pass --overwrite.")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    started = time.perf_counter()
    try:
        with _library_bars_off(), atomic_output_dir(out, overwrite=opts.overwrite) as tmp:
            per_seed = {}
            for seed in range(opts.seed, opts.seed + opts.seeds):
                per_seed[seed] = _run_seed(opts, seed, tmp / f"seed_{seed}")
            report = build_report(opts, per_seed, time.perf_counter() - started)
            write_json(tmp / "results.json", report)
            (tmp / "results.md").write_text(format_markdown(report))
            plot_gold_curves(report, tmp / "gold_curves.png")
    finally:
        torch.set_num_threads(threads)
    logger.info("demo finished in %.0f s: %s", time.perf_counter() - started, out)
    return out


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """Silence the progress bars transformers and datasets draw for every model load and save (dozens per
    seed, each a fraction of a second); the demo draws its own."""
    import datasets.utils.logging as datasets_logging
    import transformers.utils.logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled(), datasets_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            transformers_logging.enable_progress_bar()
        if was[1]:
            datasets_logging.enable_progress_bar()


def _stage(seed: int, opts: DemoOptions, k: int, text: str) -> None:
    prefix = f"[seed {seed}] " if opts.seeds > 1 else ""
    logger.info("%s[%d/%d] %s", prefix, k, STAGES, text)


def _run_seed(opts: DemoOptions, seed: int, root: Path) -> dict[str, Any]:
    """Every stage for one seed, in ``root``; returns that seed's figures per row and its gold curves."""
    from umm_tools.utils import set_seed

    root.mkdir(parents=True)
    world = world_of(opts)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 2)
        t0 = now

    _stage(seed, opts, 1, f"world: tokenizer, {opts.train_pairs} training pairs, {opts.eval_pairs} held-out and "
           f"{opts.eval_pairs} shift pairs")
    set_seed(seed)
    files = write_world(world, opts, seed, root / "world")
    lap("world")

    _stage(seed, opts, 2, f"pretraining the policy on the world's language ({opts.lm_steps} steps)")
    policy = pretrain_policy(world, opts, seed, files["tokenizer"], root / "policy")
    lap("pretrain")

    _stage(seed, opts, 3, "RM source: the policy's backbone with a score head")
    source = make_rm_source(policy, seed, root / "rm_source")
    lap("rm_source")

    _stage(seed, opts, 4, f"training the dense RM ({opts.rm_steps} steps)")
    rms: dict[str, Path] = {}
    rms["dense"] = train_rm(source, files["train"], root / "dense_rm", opts, seed)
    lap("train_dense")

    _stage(seed, opts, 5, f"upcycling the RM source: {opts.num_experts} routed experts (top {opts.top_k}) + 1 shared")
    from umm_tools.upcycle import UpcycleOptions, upcycle

    moe_init = upcycle(str(source), root / "moe_init", UpcycleOptions(
        num_experts=opts.num_experts, top_k=opts.top_k, shared_share=opts.shared_share, router_init="kmeans",
        router_data=str(files["train"]), seed=seed))
    lap("upcycle")

    _stage(seed, opts, 6, f"training the MoE RM ({opts.rm_steps} steps)")
    rms["moe"] = train_rm(moe_init, files["train"], root / "moe_rm", opts, seed)
    lap("train_moe")

    _stage(seed, opts, 7, "learn-merge (learned and uniform weights) and collapse into dense RMs")
    rms["uniform"] = merge_and_collapse(rms["moe"], files["train"], root, "uniform", opts, seed)
    rms["umm"] = merge_and_collapse(rms["moe"], files["train"], root, "learned", opts, seed)
    lap("merge")

    _stage(seed, opts, 8, "accuracy on held-out and shift pairs; scoring cost")
    figures = {row: {} for row in ROWS}
    for row, rm in rms.items():
        figures[row]["acc_heldout"] = accuracy(rm, files["heldout"])
        figures[row]["acc_shift"] = accuracy(rm, files["shift"])
    for row, cost in scoring_cost(rms, files["heldout"]).items():
        figures[row].update(cost)
    lap("eval")

    _stage(seed, opts, 9, f"PPO against each of the {len(rms)} RMs ({opts.ppo_steps} steps each), gold watched")
    runs = run_ppos(policy, files["prompts"], rms, root, opts, seed, world)
    curves = {}
    for row, run_dir in runs.items():
        summary, curve = read_ppo(run_dir)
        figures[row].update(summary)
        curves[row] = curve
    lap("ppo")
    return {"figures": figures, "curves": curves, "seconds": timings}


# ----------------------------------------------------------------------------------------------------------
# stages


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_world(world: World, opts: DemoOptions, seed: int, folder: Path) -> dict[str, Path]:
    """The tokenizer and the data files of one seed: train/heldout/shift pairs, PPO prompts, LM texts."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    files = {
        "train": _write_jsonl(folder / "train.jsonl", world.train_pairs(opts.train_pairs, rng)),
        "heldout": _write_jsonl(folder / "heldout.jsonl", world.heldout_pairs(opts.eval_pairs, rng)),
        "shift": _write_jsonl(folder / "shift.jsonl", world.shift_pairs(opts.eval_pairs, rng)),
        "prompts": _write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in world.prompts(PPO_PROMPTS, rng)]),
    }
    make_tokenizer(world, folder / "tokenizer")
    files["tokenizer"] = folder / "tokenizer"
    write_json(folder / "world.json", {"world": world.__dict__, "seed": seed})
    return files


def make_tokenizer(world: World, path: Path):
    """A word-level tokenizer of the world's vocabulary, trained with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(world.vocabulary())], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def model_config(opts: DemoOptions, vocab_size: int):
    """The tiny Llama of the policy and of every RM."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=opts.hidden_size, intermediate_size=2 * opts.hidden_size,
        num_hidden_layers=opts.num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )


def pretrain_policy(world: World, opts: DemoOptions, seed: int, tokenizer_dir: Path, out: Path) -> Path:
    """Pretrain a tiny causal LM on ``prompt answer</s>`` texts of the world (next-token loss on every token)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from umm_tools.data import pad_sequences

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed + 1)
    texts = world.lm_texts(max(2000, 16 * opts.lm_steps), rng)
    ids = [x + [tok.eos_token_id] for x in tok(texts, add_special_tokens=False)["input_ids"]]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(opts, len(tok)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = max(1, opts.lm_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / opts.lm_steps)))
    batch_size = 32
    order: list[int] = []
    bar = progress(range(opts.lm_steps), desc="pretrain policy")
    for _ in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(ids)), len(ids))
        batch = pad_sequences([ids[i] for i in order[:batch_size]], tok.pad_token_id)
        del order[:batch_size]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_json(out / "pretrain.json", {"steps": opts.lm_steps, "final_loss": loss.item(), "texts": len(texts)})
    return out


def make_rm_source(policy: Path, seed: int, out: Path) -> Path:
    """The policy's backbone under a one-output score head (normal(0, initializer_range), seeded), saved as
    ``LlamaForSequenceClassification``: the starting point of the dense RM *and* of the upcycled MoE."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    lm = LlamaForCausalLM.from_pretrained(str(policy), dtype=torch.float32)
    cfg = lm.config
    cfg.num_labels = 1
    cfg.architectures = None
    rm = LlamaForSequenceClassification(cfg)
    rm.model.load_state_dict(lm.model.state_dict())  # strict: every backbone tensor is copied
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=gen) * cfg.initializer_range)
    rm.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(policy)).save_pretrained(str(out))
    return out


def train_rm(model: Path, data: Path, out: Path, opts: DemoOptions, seed: int) -> Path:
    """``umm train`` with the demo's steps, batch and learning rate (the same for the dense RM and the MoE)."""
    from umm_tools.train import TrainOptions, train

    train_opts = TrainOptions(max_steps=opts.rm_steps, batch_size=opts.rm_batch_size, learning_rate=opts.rm_learning_rate,
                              seed=seed, eval_fraction=0.0, eval_on_start=False, save_steps=opts.rm_steps + 1,
                              logging_steps=max(1, opts.rm_steps // 20))
    return Path(train(str(model), str(data), str(out), train_opts))


def merge_and_collapse(moe: Path, data: Path, root: Path, mode: str, opts: DemoOptions, seed: int) -> Path:
    """``umm learn-merge`` in ``mode`` (learned | uniform), then ``umm collapse`` into a dense RM."""
    from umm_tools.collapse import CollapseOptions, collapse
    from umm_tools.learn_merge import LearnMergeOptions, learn_merge

    name = "umm" if mode == "learned" else mode
    merge_opts = LearnMergeOptions(mode=mode, steps=opts.merge_steps, batch_size=16, seed=seed, device="cpu")
    merge_dir = learn_merge(str(moe), str(data) if mode == "learned" else None, str(root / f"merge_{name}"),
                            merge_opts)
    return collapse(str(moe), str(Path(merge_dir) / "merge_weights.json"), str(root / f"{name}_rm"), CollapseOptions())


def accuracy(rm: Path, data: Path) -> float:
    from umm_tools.evaluate import EvalOptions, evaluate

    return float(evaluate(str(rm), str(data), EvalOptions(batch_size=64, device="cpu"))["accuracy"])


def scoring_cost(rms: dict[str, Path], data: Path, pairs: int = COST_PAIRS, repeats: int = 7) -> dict[str, dict[str, float]]:
    """Median seconds to score one batch (``pairs`` held-out pairs = 2 × pairs sequences) and parameter count of
    each RM, and both relative to the dense RM. Models are timed in turn, ``repeats`` rounds, after a warm-up."""
    import torch

    from umm_tools.data import iter_pair_batches, load_pairs
    from umm_tools.evaluate import load_reward_model, reward_pad_token_id

    loaded = {row: load_reward_model(str(path), device="cpu", dtype="float32") for row, path in rms.items()}
    batches = {}
    for row, (rm, tok) in loaded.items():
        ds, _ = load_pairs(str(data), tok)
        batches[row] = next(iter_pair_batches(ds.select(range(min(pairs, len(ds)))), pairs,
                                              reward_pad_token_id(rm, tok)))
    times: dict[str, list[float]] = {row: [] for row in loaded}
    with torch.no_grad():
        for r in range(repeats + 1):
            for row, (rm, _) in loaded.items():
                t = time.perf_counter()
                rm(**batches[row], use_cache=False)
                if r:  # round 0 is the warm-up
                    times[row].append(time.perf_counter() - t)
    cost = {}
    for row, (rm, _) in loaded.items():
        cost[row] = {"seconds_per_batch": statistics.median(times[row]),
                     "params": sum(p.numel() for p in rm.parameters())}
    for row in cost:
        cost[row]["time_ratio"] = cost[row]["seconds_per_batch"] / cost["dense"]["seconds_per_batch"]
        cost[row]["param_ratio"] = cost[row]["params"] / cost["dense"]["params"]
    return cost


# ----------------------------------------------------------------------------------------------------------
# PPO


def ppo_options(opts: DemoOptions, rm: Path, seed: int):
    from umm_tools.ppo import PPOOptions

    return PPOOptions(
        reward_model=str(rm), whiten_rewards=True, max_new_tokens=opts.max_new_tokens, temperature=1.0,
        learning_rate=opts.ppo_learning_rate, batch_size=opts.ppo_batch_size,
        mini_batch_size=opts.ppo_batch_size // 4, ppo_epochs=4, total_steps=opts.ppo_steps,
        kl_coef=opts.kl_coef, eval_every=opts.eval_every, eval_prompts=EVAL_PROMPTS, save_every=0, seed=seed,
    )


def _ppo_job(policy: str, prompts: str, out: str, options: dict, world: dict) -> str:
    """One PPO run against an RM (``options``: PPOOptions fields), the world's gold reward watched."""
    from umm_tools.demo.world import GoldReward
    from umm_tools.ppo import PPOOptions, ppo

    return str(ppo(policy, prompts, out, PPOOptions(**options), gold_fn=GoldReward(World(**world))))


def _ppo_worker_main(job_file: str) -> None:
    """Entry point of a worker process: ``python -c '...; _ppo_worker_main(JOB.json)'`` (one thread, quiet)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    _ppo_job(**json.loads(Path(job_file).read_text()))


def run_ppos(policy: Path, prompts: Path, rms: dict[str, Path], root: Path, opts: DemoOptions, seed: int,
             world: World) -> dict[str, Path]:
    """PPO against every RM: one after the other in this process (``ppo_workers=1``), or in up to
    ``ppo_workers`` worker processes at a time (one thread each) with one bar over all their steps."""
    jobs = {row: {"policy": str(policy), "prompts": str(prompts), "out": str(root / f"ppo_{row}"),
                  "options": ppo_options(opts, rm, seed).model_dump(), "world": world.__dict__}
            for row, rm in rms.items()}
    runs = {row: Path(job["out"]) for row, job in jobs.items()}
    if opts.ppo_workers == 1:
        for row, job in jobs.items():
            logger.info("  PPO against the %s", ROWS[row])
            _ppo_job(**job)
        return runs

    import subprocess
    import sys

    env = {**os.environ, "UMM_QUIET": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the workers import this very umm_tools
    code = "import sys; from umm_tools.demo.run import _ppo_worker_main; _ppo_worker_main(sys.argv[1])"
    waiting = list(jobs)
    running: dict[str, tuple[Any, Any]] = {}  # row -> (process, log file)
    bar = progress(total=len(jobs) * opts.ppo_steps, desc="ppo (all RMs)")
    done_steps = 0
    try:
        while waiting or running:
            while waiting and len(running) < opts.ppo_workers:
                row = waiting.pop(0)
                job_file = root / f"ppo_{row}.job.json"
                write_json(job_file, jobs[row])
                log = (root / f"ppo_{row}.log").open("w")
                running[row] = (subprocess.Popen([sys.executable, "-c", code, str(job_file)], env=env, stdout=log,
                                                 stderr=subprocess.STDOUT), log)
                logger.info("  PPO against the %s started (worker process)", ROWS[row])
            time.sleep(1.0)
            for row, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[row]
                if proc.returncode != 0:
                    tail = (root / f"ppo_{row}.log").read_text()[-3000:]
                    raise RuntimeError(f"the PPO worker for the {ROWS[row]} failed (exit {proc.returncode}):\n{tail}")
                logger.info("  PPO against the %s finished", ROWS[row])
            steps = sum(_steps_done(path) for path in runs.values())
            bar.update(steps - done_steps)
            done_steps = steps
    finally:
        for proc, log in running.values():  # only after an error or Ctrl-C
            proc.kill()
            proc.wait()
            log.close()
        bar.close()
    return runs


def _steps_done(run_dir: Path) -> int:
    from umm_tools.ppo import METRICS

    try:
        text = (run_dir / METRICS).read_text()
    except OSError:
        return 0
    return text.count('"kind": "train"')


def read_ppo(run_dir: Path) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """A finished PPO run's figures (gold peak/end/drop, proxy start/end, hacked) and its evaluation curves."""
    from umm_tools.ppo import METRICS, read_metrics

    evals = [r for r in read_metrics(run_dir / METRICS) if r.get("kind") == "eval"]
    if not evals or any(r.get("gold") is None for r in evals):
        raise UmmError(f"{run_dir}: the PPO run has no gold evaluations; it did not finish.")
    gold = [r["gold"] for r in evals]
    proxy = [r["proxy"] for r in evals]
    peak = max(range(len(gold)), key=gold.__getitem__)
    figures = {
        "gold_start": gold[0], "gold_peak": gold[peak], "gold_peak_step": evals[peak]["step"],
        "gold_end": gold[-1], "gold_drop": gold[peak] - gold[-1],
        "proxy_start": proxy[0], "proxy_end": proxy[-1], "proxy_rise": proxy[-1] - proxy[0],
        "length_start": evals[0]["response_length"], "length_end": evals[-1]["response_length"],
        "kl_end": evals[-1]["kl"],
        "hacked": bool(gold[peak] - gold[-1] > HACK_MARGIN and proxy[-1] > proxy[peak]),
    }
    curve = {"step": [r["step"] for r in evals], "gold": gold, "proxy": proxy,
             "length": [r["response_length"] for r in evals]}
    return figures, curve


# ----------------------------------------------------------------------------------------------------------
# report


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def build_report(opts: DemoOptions, per_seed: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """results.json: options, machine, per-seed figures and curves, and mean/std per row and figure."""
    import platform

    import torch

    summary: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        seeds = [per_seed[s]["figures"][row] for s in per_seed]
        numeric = [k for k, v in seeds[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summary[row] = {k: _mean_std([float(f[k]) for f in seeds]) for k in numeric}
        summary[row]["hacked_seeds"] = sum(bool(f["hacked"]) for f in seeds)
    return {
        "options": opts.model_dump(),
        "seeds": list(per_seed),
        "rows": ROWS,
        "columns": [key for key, _, _ in COLUMNS],
        "hack_rule": f"gold falls more than {HACK_MARGIN} below its PPO peak while the proxy ends above its value "
                     "at the gold peak",
        "summary": summary,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": 1},
    }


def _cell(stat: dict[str, float], fmt: str, n: int) -> str:
    if n > 1:
        return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"
    return f"{stat['mean']:{fmt}}"


def format_markdown(report: dict[str, Any]) -> str:
    """The results table (mean ± std over seeds when there are several) and how to read it."""
    n = len(report["seeds"])
    summary = report["summary"]
    head = ["RM", *(h for _, h, _ in COLUMNS), "hacked"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row, label in ROWS.items():
        cells = [label, *(_cell(summary[row][key], fmt, n) for key, _, fmt in COLUMNS),
                 f"{summary[row]['hacked_seeds']}/{n}"]
        lines.append("| " + " | ".join(cells) + " |")
    opts = report["options"]
    seeds = ", ".join(str(s) for s in report["seeds"])
    notes = [
        "",
        f"Seeds: {seeds}" + (" (mean ± std over seeds)." if n > 1 else "."),
        "Accuracy is pairwise, against gold labels: *held-out* pairs share the training pairs' length bias "
        f"(chosen longer in {opts['spurious_rate']:.0%}); *shift* pairs have it reversed.",
        f"Gold and proxy are mean rewards on {EVAL_PROMPTS} held-out prompts during PPO ({opts['ppo_steps']} steps, evaluated "
        f"every {opts['eval_every']}); proxy is on each RM's own scale. "
        f"*hacked*: seeds where {report['hack_rule']}.",
        f"Cost: median time to score one batch of {2 * COST_PAIRS} sequences, and parameter count, relative to the "
        "dense RM. The MoE RM carries every expert; the merged RMs have exactly the dense RM's architecture.",
        f"Total time: {report['seconds']:.0f} s.",
    ]
    return "\n".join(lines + notes) + "\n"


COLORS = {"dense": "tab:red", "moe": "tab:purple", "uniform": "tab:orange", "umm": "tab:green"}


def plot_gold_curves(report: dict[str, Any], path: Path) -> None:
    """Gold reward during PPO, one line per RM (mean over seeds, ±1 std band when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row, label in ROWS.items():
        curves = [report["per_seed"][str(s)]["curves"][row] for s in report["seeds"]]
        steps = curves[0]["step"]
        gold = np.array([c["gold"] for c in curves])  # (seeds, evaluations)
        mean = gold.mean(0)
        ax.plot(steps, mean, "o-", color=COLORS[row], label=label, markersize=3)
        if len(curves) > 1:
            std = gold.std(0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, color=COLORS[row], alpha=0.15)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("gold reward (held-out prompts)")
    n = len(report["seeds"])
    ax.set_title("Gold reward during PPO against each RM" + (f" (mean ± std, {n} seeds)" if n > 1 else ""))
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
