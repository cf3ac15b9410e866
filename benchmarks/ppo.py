"""Benchmark PPO throughput of ``umm_tools.ppo.ppo`` against TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer``.

TRL 1.12.0 is the last TRL with a PPO trainer (``trl.experimental.ppo``); it is installed into its own
virtual environment under the work folder (``venv_trl112``: torch 2.13.0 CPU, trl 1.12.0, the same
transformers as umm's environment), reused when it already holds exactly that.

Both trainers get the same tiny random models (built with ``tests/tiny.py``'s ``make_dense``: a Llama causal
LM as the policy, a Llama sequence classifier with one output as the reward model, the test word-level
tokenizer), the same prompts file, fp32 on CPU, the same thread count, and the same PPO shape: ``batch``
rollouts per step, ``ppo_epochs`` passes over minibatches of ``mini_batch`` rollouts (one micro-batch each,
one optimiser step per minibatch), ``max_new_tokens`` sampled at temperature 1, generation stopping at EOS,
k1 KL with β = 0.05, vf_coef 0.1, the critic started from the reward model, AdamW at the same learning rate.
No evaluation, no checkpoints, no sample generations, no reporting integrations. Gradient clipping is off
in umm (``max_grad_norm=None``) because TRL's PPO loop never clips. Each trainer runs in its own process.

**Timing.** Each child records ``time.perf_counter()`` after every PPO step (umm: its ``callback``; TRL: a
``TrainerCallback.on_step_end``). The first ``--warmup`` steps are discarded; the step times are the
differences between consecutive stamps after them, so model loading, tokenisation, trainer set-up and the
final save are never timed. Throughput = measured rollouts / (last stamp - stamp of the last warm-up step).
Runs alternate between the trainers; the reported figure is the median over ``--repeats``.

    python benchmarks/ppo.py [--steps 10] [--warmup 2] [--repeats 2] [--threads 1] [--work-dir benchmarks/_work]

Prints a markdown table; writes benchmarks/results/ppo.json (and ppo_profile.txt when umm misses the
target, unless --no-profile).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_WORK, REPO, RESULTS, machine_info, markdown_table, rmtree, tool_env, verdict, write_results

TRL_VERSION = "1.12.0"
TORCH_VERSION = "2.13.0"
TARGET = 1.0  # umm samples/s >= TARGET x TRL samples/s

# Builds the models and the prompts (in a child: keeps torch out of the driver).
SETUP_CHILD = r"""
import json, random, sys
sys.path.insert(0, sys.argv[1])
from tests.tiny import make_dense, random_text
root, layers, hidden, n_prompts = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
shape = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 3 // 2)
make_dense(f"{root}/policy", head="causal", seed=0, **shape)
make_dense(f"{root}/rm", head="seqcls", seed=1, **shape)
rng = random.Random(0)
with open(f"{root}/prompts.jsonl", "w") as f:
    for _ in range(n_prompts):
        f.write(json.dumps({"prompt": random_text(rng, 3, 12)}) + "\n")
"""

UMM_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
cfg = json.loads(sys.argv[1])
import torch
torch.set_num_threads(cfg["threads"])
from umm_tools.ppo import PPOOptions, ppo
stamps, lengths = [], []
prof = None
if cfg["profile"]:
    import cProfile
    prof = cProfile.Profile()
def cb(stats):
    stamps.append(time.perf_counter())
    lengths.append(stats["response_length"])
    if prof is not None and len(stamps) == cfg["warmup"]:
        prof.enable()
opts = PPOOptions(
    reward_model=cfg["rm"], batch_size=cfg["batch"], mini_batch_size=cfg["mini_batch"], ppo_epochs=cfg["epochs"],
    gradient_accumulation_steps=1, max_new_tokens=cfg["max_new_tokens"], total_steps=cfg["steps"],
    temperature=1.0, top_p=1.0, learning_rate=cfg["lr"], kl_coef=0.05, kl_estimator="k1", vf_coef=0.1,
    cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, max_grad_norm=None, critic_init="reward",
    eval_prompts=0, eval_every=0, save_every=0, seed=cfg["seed"], overwrite=True,
)
t1 = time.perf_counter()
ppo(cfg["policy"], cfg["prompts"], cfg["out"], opts, callback=cb)
if prof is not None:
    prof.disable()
    import io, pstats
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)
    open(cfg["profile"], "w").write(buf.getvalue())
print("PPO_TIMES " + json.dumps({"stamps": stamps, "response_length": lengths, "import_s": t1 - t0,
                                 "total_s": time.perf_counter() - t0}))
"""

TRL_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
cfg = json.loads(sys.argv[1])
import torch
torch.set_num_threads(cfg["threads"])
import trl
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
stamps = []
class Stamp(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.perf_counter())
tok = AutoTokenizer.from_pretrained(cfg["policy"], padding_side="left")
ds = load_dataset("json", data_files=cfg["prompts"], split="train")
ds = ds.map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=ds.column_names)
B, mb = cfg["batch"], cfg["mini_batch"]
args = PPOConfig(
    output_dir=cfg["out"], per_device_train_batch_size=B, gradient_accumulation_steps=1,
    num_mini_batches=B // mb, num_ppo_epochs=cfg["epochs"], total_episodes=B * cfg["steps"],
    local_rollout_forward_batch_size=B, response_length=cfg["max_new_tokens"], stop_token="eos",
    temperature=1.0, learning_rate=cfg["lr"], kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, cliprange=0.2,
    cliprange_value=0.2, gamma=1.0, lam=0.95, num_sample_generations=0, bf16=False, fp16=False,
    gradient_checkpointing=False, report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no",
    logging_steps=1, disable_tqdm=True, seed=cfg["seed"], dataloader_num_workers=0,
)
policy = AutoModelForCausalLM.from_pretrained(cfg["policy"], dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(cfg["policy"], dtype=torch.float32)
rm = AutoModelForSequenceClassification.from_pretrained(cfg["rm"], num_labels=1, dtype=torch.float32)
value = AutoModelForSequenceClassification.from_pretrained(cfg["rm"], num_labels=1, dtype=torch.float32)
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                     value_model=value, train_dataset=ds, callbacks=[Stamp()])
t1 = time.perf_counter()
trainer.train()
print("PPO_TIMES " + json.dumps({"stamps": stamps, "import_s": t1 - t0, "total_s": time.perf_counter() - t0,
                                 "trl": trl.__version__, "trainer": f"{PPOTrainer.__module__}.PPOTrainer"}))
"""


def ensure_trl_venv(venv: Path, transformers_version: str) -> Path:
    """A venv with torch 2.13.0 (CPU), trl 1.12.0 and umm's transformers version; reused when it has them."""
    py = venv / "bin" / "python"
    probe = ("import torch, transformers, trl; print(torch.__version__.split('+')[0], transformers.__version__, "
             "trl.__version__)")
    want = f"{TORCH_VERSION} {transformers_version} {TRL_VERSION}"
    if py.is_file():
        res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip() == want:
            print(f"[setup] reusing {venv} (torch, transformers, trl = {want})", flush=True)
            return py
    t = time.perf_counter()
    rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pkgs = [f"torch=={TORCH_VERSION}", f"trl=={TRL_VERSION}", f"transformers=={transformers_version}",
            "accelerate", "datasets"]
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"could not install {pkgs} into {venv}")
    print(f"[setup] built {venv} in {time.perf_counter() - t:.0f}s", flush=True)
    return py


def run_child(python: str, code: str, cfg: dict[str, Any], log: Path, threads: int) -> dict[str, Any]:
    env = tool_env()
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO),
               TQDM_DISABLE="1", WANDB_DISABLED="true")
    if "trl" in str(python):  # nothing of umm's environment may shadow the TRL venv
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    t0 = time.perf_counter()
    res = subprocess.run([python, "-c", code, json.dumps(cfg)], env=env, capture_output=True, text=True,
                         cwd=log.parent)
    wall = time.perf_counter() - t0
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        sys.stderr.write((res.stdout + res.stderr)[-4000:])
        raise SystemExit(f"child failed ({res.returncode}); log: {log}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("PPO_TIMES "))
    out = json.loads(line[len("PPO_TIMES "):])
    out["process_wall_s"] = wall
    return out


def step_stats(stamps: list[float], warmup: int, batch: int) -> dict[str, Any]:
    steps = [b - a for a, b in zip(stamps[warmup - 1:-1], stamps[warmup:], strict=True)]
    span = stamps[-1] - stamps[warmup - 1]
    return {"step_s": steps, "measured_steps": len(steps), "measured_s": span,
            "samples_per_s": len(steps) * batch / span, "median_step_s": statistics.median(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="folder for models, venv and outputs")
    ap.add_argument("--steps", type=int, default=10, help="timed PPO steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="PPO steps run first and not timed (>= 1)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer, alternating (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of each child")
    ap.add_argument("--batch", type=int, default=32, help="rollouts per PPO step")
    ap.add_argument("--mini-batch", type=int, default=8, help="rollouts per optimiser step")
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=256, help="prompts in the prompts file")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of both tiny models")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of both tiny models")
    ap.add_argument("--no-profile", action="store_true", help="do not cProfile umm when the target is missed")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first stamp starts the clock)")

    import importlib.metadata as md

    work = args.work_dir.absolute()
    root = work / "ppo"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"[setup] {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, load {info.get('loadavg_at_start')}")
    transformers_version = md.version("transformers")
    trl_py = ensure_trl_venv(work / "venv_trl112", transformers_version)

    models = root / f"models_l{args.layers}_h{args.hidden}_p{args.prompts}"
    if not (models / "prompts.jsonl").is_file():
        rmtree(models)
        models.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", SETUP_CHILD, str(REPO), str(models), str(args.layers),
                        str(args.hidden), str(args.prompts)], check=True, env=tool_env())
        print(f"[setup] built tiny policy, RM and {args.prompts} prompts in {models}", flush=True)
    else:
        print(f"[setup] reusing {models}", flush=True)

    total_steps = args.warmup + args.steps
    base = dict(policy=str(models / "policy"), rm=str(models / "rm"), prompts=str(models / "prompts.jsonl"),
                batch=args.batch, mini_batch=args.mini_batch, epochs=args.ppo_epochs,
                max_new_tokens=args.max_new_tokens, steps=total_steps, warmup=args.warmup, lr=1e-5, seed=0,
                threads=args.threads, profile="")
    runs: dict[str, list[dict[str, Any]]] = {"umm": [], "trl": []}
    trl_meta: dict[str, Any] = {}
    for r in range(args.repeats):
        for tool in ("umm", "trl"):
            out = root / f"out_{tool}"
            rmtree(out)
            cfg = dict(base, out=str(out))
            py, code = (sys.executable, UMM_CHILD) if tool == "umm" else (str(trl_py), TRL_CHILD)
            res = run_child(py, code, cfg, logs / f"{tool}_{r}.log", args.threads)
            if len(res["stamps"]) != total_steps:
                raise SystemExit(f"{tool}: {len(res['stamps'])} step stamps, expected {total_steps}")
            st = step_stats(res["stamps"], args.warmup, args.batch)
            st.update(startup_and_warmup_s=res["process_wall_s"] - st["measured_s"], import_s=res["import_s"])
            if "response_length" in res:
                st["mean_response_length"] = statistics.mean(res["response_length"])
            for k in ("trl", "trainer"):
                if k in res:
                    trl_meta[k] = res[k]
            runs[tool].append(st)
            print(f"[run {r + 1}/{args.repeats}] {tool}: {st['samples_per_s']:.1f} samples/s, "
                  f"median step {st['median_step_s']:.3f}s", flush=True)
            rmtree(out)

    med = {t: statistics.median(x["samples_per_s"] for x in runs[t]) for t in runs}
    med_step = {t: statistics.median(s for x in runs[t] for s in x["step_s"]) for t in runs}
    ratio = med["umm"] / med["trl"]
    ok = ratio >= TARGET

    profile_path = None
    if not ok and not args.no_profile:
        profile_path = RESULTS / "ppo_profile.txt"
        out = root / "out_umm_profile"
        rmtree(out)
        run_child(sys.executable, UMM_CHILD, dict(base, out=str(out), profile=str(profile_path)),
                  logs / "umm_profile.log", args.threads)
        rmtree(out)
        print(f"[profile] umm's timed steps under cProfile: {profile_path}")

    header = ["trainer", "samples/s (median)", "median step s", "runs (samples/s)"]
    rows = [["umm ppo", med["umm"], med_step["umm"], ", ".join(f"{x['samples_per_s']:.1f}" for x in runs["umm"])],
            [f"TRL {TRL_VERSION} PPOTrainer", med["trl"], med_step["trl"],
             ", ".join(f"{x['samples_per_s']:.1f}" for x in runs["trl"])]]
    table = markdown_table(header, rows)
    ttable = markdown_table(["target", "value", "goal", "verdict"],
                            [["umm / TRL samples/s", f"{ratio:.2f}x", f">= {TARGET:.1f}x", verdict(ok)]])
    settings = {k: base[k] for k in ("batch", "mini_batch", "epochs", "max_new_tokens", "warmup", "lr", "seed",
                                     "threads")}
    settings.update(timed_steps=args.steps, prompts=args.prompts, layers=args.layers, hidden=args.hidden,
                    repeats=args.repeats, dtype="float32", device="cpu")
    print(f"\nPPO, tiny Llama policy + RM ({args.layers} layers, hidden {args.hidden}), batch {args.batch}, "
          f"mini-batch {args.mini_batch}, {args.ppo_epochs} PPO epochs, {args.max_new_tokens} new tokens, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} thread(s)\n")
    print(table)
    print()
    print(ttable)
    info["trl_benchmarked"] = trl_meta.get("trl")
    info["trl_trainer"] = trl_meta.get("trainer")
    info["trl_venv"] = str(trl_py.parent.parent)
    data = {"benchmark": "ppo", "machine": info, "settings": settings,
            "timing": "perf_counter stamp after every PPO step (umm callback / TRL on_step_end); first "
                      "`warmup` steps dropped; samples/s = timed rollouts / (last stamp - last warm-up stamp)",
            "samples_per_s": med, "median_step_s": med_step, "ratio_umm_over_trl": ratio,
            "target": f"umm >= {TARGET}x TRL samples/s", "target_met": ok, "runs": runs,
            "profile": str(profile_path.relative_to(REPO)) if profile_path else None,
            "table": table, "targets_table": ttable}
    path = write_results("ppo", data)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(0)
    main()
