"""Benchmark one ``umm train`` step: the upcycled MoE RM against the dense RM it came from.

Models: a random-initialised LlamaForSequenceClassification of SmolLM2-135M shape (hidden 576, 30 layers,
FFN 1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings) in float32, and its ``umm upcycle`` (E=4 routed
experts, top-2, S=1 shared expert). Both are built once into the work folder.

One training step is what ``umm train`` runs per optimizer step: :class:`umm_tools.train.UmmRewardTrainer`'s
``training_step`` (forward with the router hooks, Bradley–Terry + router load-balancing loss, backward),
gradient clipping, the optimizer's step (trl/transformers' default AdamW) and ``zero_grad``, on the same batch
every time: ``--pairs`` preference pairs of ``--seq-len`` tokens each side, i.e. 2·pairs sequences, no
padding. ``--warmup`` untimed rounds, then ``--steps`` timed ones (wall time, median and minimum, and the
process's CPU time); in one process with torch using every core, each round runs one step of the dense RM
and one of the MoE per expert implementation in ``--impls`` (switched on the same model), in an order that
rotates every round, so that other jobs on the machine slow both alike. Implementations: "grouped_mm"
(transformers' default where torch has it, as ``umm train`` uses it) and "eager" (a Python loop over experts;
add it with ``--impls grouped_mm,eager``, ~+60% run time).
"batched_mm" gathers one weight matrix per (token, expert) pair, 1024 × 3072 × 576 floats = 7 GB a layer
here, and is left out. Peak memory is about 10 GB (both models with AdamW states).

The measured step-time ratio (MoE ÷ dense) is set beside the FLOP ratio per token computed from the shapes
(forward and backward scale alike): per layer, attention projections ``2·H·(q + k + v + o widths)`` plus
attention scores ``2·2·T·heads·head_dim`` (full T×T) plus the FFN, ``3·2·H·I`` dense against
``(k + S)·3·2·H·I`` routed + shared plus the router ``2·H·E`` and the shared-expert gate ``2·H`` for the MoE;
plus the score head ``2·H`` per token (transformers applies it to every position). Norms, activations and
softmax are left out. Target: measured ratio ≤ 1.15 × FLOP ratio.

    python benchmarks/train.py [--steps 5] [--warmup 1] [--pairs 4] [--seq-len 64] [--impls grouped_mm]

Prints a markdown table; writes benchmarks/results/train.json. Runs in ~2.5 minutes on an idle 2-core machine,
up to ~8 under load from other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_WORK, REPO, SMOLLM2_135M, machine_info, markdown_table, tool_env, verdict, write_results

E, K, S = 4, 2, 1
TARGET = 1.15
MARKER = "umm_train_benchmark.json"


# ------------------------------------------------------------------------------------------ models
def build_models(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The dense RM (float32) and its upcycle, built unless the work folder already holds exactly them."""
    dense, moe = work / "dense", work / "moe"
    want = json.dumps({"config": SMOLLM2_135M, "seed": seed, "E": E, "k": K, "S": S}, sort_keys=True)
    if (work / MARKER).is_file() and (work / MARKER).read_text().strip() == want:
        print(f"[setup] reusing {dense} and {moe}", flush=True)
        return dense, moe
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_build", str(dense), str(moe), str(seed)],
                   env={**tool_env(), "UMM_QUIET": "1"}, check=True)
    (work / MARKER).write_text(want + "\n")
    print(f"[setup] built the dense RM and its MoE in {time.perf_counter() - t:.0f}s", flush=True)
    return dense, moe


def _build(dense: Path, moe: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    sys.path.insert(0, str(REPO))
    from umm_tools.upcycle import UpcycleOptions, upcycle

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOLLM2_135M, num_labels=1, pad_token_id=1)
    LlamaForSequenceClassification(cfg).save_pretrained(str(dense))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["a b c"], trainers.WordLevelTrainer(special_tokens=["<eos>", "<pad>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(dense))
    upcycle(str(dense), moe, UpcycleOptions(num_experts=E, top_k=K, shared_experts=S, dtype="float32"))


# ------------------------------------------------------------------------------------------ the measurement
def _trainer(folder: str, pairs: int, seq_len: int, tmp: str) -> tuple[Any, dict[str, Any]]:
    """A UmmRewardTrainer on the RM in ``folder`` with its optimizer, and one fixed batch of random pairs."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig

    from umm_tools.train import UmmRewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(tok.pad_token_id + 1, model.config.vocab_size, (2 * pairs, seq_len), generator=gen).tolist()
    data = Dataset.from_dict({"chosen_ids": ids[:pairs], "rejected_ids": ids[pairs:]})
    args = RewardConfig(output_dir=tmp, use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[],
                        max_length=None, per_device_train_batch_size=pairs, dataset_num_proc=None,
                        learning_rate=1e-5, max_grad_norm=1.0, disable_tqdm=True)
    trainer = UmmRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                               router_aux_coef=0.01)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); this loop has no accumulation
    model.train()
    return trainer, trainer.data_collator([data[i] for i in range(pairs)])  # (2·pairs, seq_len)


def _step(trainer: Any, batch: dict[str, Any]) -> tuple[float, float, float]:
    """One optimizer step as Trainer.train() runs it: (wall seconds, forward+backward wall seconds, CPU seconds
    of the process, all threads)."""
    import torch

    model, opt = trainer.model, trainer.optimizer
    c0 = time.process_time()
    t0 = time.perf_counter()
    trainer.training_step(model, dict(batch))
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, t1 - t0, time.process_time() - c0


def _measure(dense: str, moe: str, impls: list[str], pairs: int, seq_len: int, warmup: int,
             steps: int, threads: int) -> dict[str, Any]:
    """Runs in its own process. Steps of the dense RM and of the MoE (once per expert implementation,
    switched on the same model) are interleaved, in an order that rotates every round, so that a machine
    whose load changes (other jobs) slows them alike."""
    import tempfile

    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        dense_tr, dense_batch = _trainer(dense, pairs, seq_len, tmp)
        moe_tr, moe_batch = _trainer(moe, pairs, seq_len, tmp)
        runs = [("dense", dense_tr, dense_batch, None)] + [(f"moe:{i}", moe_tr, moe_batch, i) for i in impls]
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name, *_ in runs}
        for r in range(warmup + steps):
            order = runs[r % len(runs):] + runs[: r % len(runs)]
            for name, trainer, batch, impl in order:
                if impl is not None:
                    trainer.model.set_experts_implementation(impl)
                total, fwd_bwd, cpu = _step(trainer, batch)
                print(f"  round {r + 1}/{warmup + steps} {name}: {total:.2f}s (CPU {cpu:.2f}s)"
                      + (" (warm-up)" if r < warmup else ""), file=sys.stderr, flush=True)
                if r >= warmup:
                    times[name].append((total, fwd_bwd, cpu))
        aux_logged = bool(moe_tr._metrics["train"].get("router_aux_loss"))
        out = {}
        for name, trainer, _batch, _impl in runs:
            t = times[name]
            out[name] = {
                "parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "optimizer": type(trainer.optimizer).__name__,
                "step_s": statistics.median(x for x, _, _ in t),
                "step_s_min": min(x for x, _, _ in t),
                "step_s_all": [x for x, _, _ in t],
                "fwd_bwd_s": statistics.median(f for _, f, _ in t),
                "optimizer_s": statistics.median(x - f for x, f, _ in t),
                "cpu_s": statistics.median(c for _, _, c in t),
            }
        out["_meta"] = {"threads": torch.get_num_threads(), "router_aux_loss_logged": aux_logged}
    return out


def run_child(dense: Path, moe: Path, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_measure", str(dense), str(moe), a.impls, str(a.pairs),
           str(a.seq_len), str(a.warmup), str(a.steps), str(a.threads)]
    env = tool_env()
    env.pop("OMP_NUM_THREADS", None)  # every core
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise SystemExit(f"measurement failed ({res.returncode}): {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ FLOPs
def flops_per_token(cfg: dict[str, Any], seq_len: int) -> dict[str, float]:
    """Forward multiply-add FLOPs per token (2 per MAC) of the dense RM and of its MoE."""
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    attn = 2 * H * (nh * hd + 2 * nkv * hd) + 2 * (nh * hd) * H  # q, k, v, o projections
    attn += 2 * 2 * seq_len * nh * hd  # QK^T and AV, full T×T
    ffn = 3 * 2 * H * I  # gate, up, down
    moe = (K + S) * ffn + 2 * H * E + 2 * H  # k routed + S shared experts, router, shared-expert gate
    score = 2 * H
    return {"attention": attn, "dense_ffn": ffn, "moe_ffn": moe,
            "dense": L * (attn + ffn) + score, "moe": L * (attn + moe) + score}


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first allocates AdamW's state)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2 sequences each)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--impls", default="grouped_mm",
                   help="MoE expert implementations to time, comma-separated (grouped_mm, eager)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads (default: every core; results of another count go to train_threads<N>.json)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK / "train")
    a = p.parse_args()

    info = machine_info()
    print(f"[machine] {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers "
          f"{info['transformers']}", flush=True)
    dense, moe = build_models(a.work_dir)
    load_start = os.getloadavg()
    print(f"[timing] dense and MoE ({a.impls}) interleaved; load average {load_start[0]:.2f}", flush=True)
    results = run_child(dense, moe, a)
    meta = results.pop("_meta")
    load_end = os.getloadavg()

    fl = flops_per_token(SMOLLM2_135M, a.seq_len)
    flop_ratio = fl["moe"] / fl["dense"]
    base = results["dense"]
    rows = []
    for name, r in results.items():
        ratio = r["step_s"] / base["step_s"]
        r["ratio_to_dense"] = ratio
        r["ratio_to_dense_min"] = r["step_s_min"] / base["step_s_min"]
        r["ratio_to_dense_cpu"] = r["cpu_s"] / base["cpu_s"]
        r["ratio_over_flop_ratio"] = ratio / flop_ratio if name != "dense" else None
        ok = None if name == "dense" else ratio <= TARGET * flop_ratio
        r["target_met"] = ok
        rows.append([name, f"{r['parameters'] / 1e6:.0f}M", r["step_s"], r["step_s_min"], r["fwd_bwd_s"],
                     r["optimizer_s"], r["cpu_s"], f"{ratio:.2f}", f"{r['ratio_to_dense_min']:.2f}",
                     f"{r['ratio_to_dense_cpu']:.2f}", "1.00" if name == "dense" else f"{flop_ratio:.2f}",
                     "" if ok is None else verdict(ok)])
    table = markdown_table(
        ["model", "params", "step s (median)", "step s (min)", "fwd+bwd s", "clip+optim s", "CPU s",
         "ratio (median)", "ratio (min)", "ratio (CPU)", "FLOP ratio", f"median ≤ {TARGET} × FLOP ratio"], rows)
    tokens = 2 * a.pairs * a.seq_len
    print(f"\n{a.pairs} pairs × 2 sequences × {a.seq_len} tokens = {tokens} tokens per step; median of {a.steps} "
          f"steps after {a.warmup} warm-up (rounds interleaved); {meta['threads']} threads; load average (1 min) "
          f"{load_start[0]:.2f} before, {load_end[0]:.2f} after\n")
    print(table)
    print(f"\nFLOPs per token (forward): dense {fl['dense'] / 1e6:.1f}M, MoE {fl['moe'] / 1e6:.1f}M "
          f"(attention {fl['attention'] / 1e6:.2f}M, FFN {fl['dense_ffn'] / 1e6:.2f}M → {fl['moe_ffn'] / 1e6:.2f}M "
          "per layer)")
    name = "train" if a.threads == (os.cpu_count() or 1) else f"train_threads{a.threads}"
    out = write_results(name, {
        "what": "umm train step time, MoE RM (E=4, k=2, S=1) vs the dense SmolLM2-135M-shaped RM it came from",
        "machine": info,
        "settings": {"pairs": a.pairs, "seq_len": a.seq_len, "tokens_per_step": tokens, "warmup": a.warmup,
                     "steps": a.steps, "E": E, "k": K, "S": S, "dtype": "float32", "router_aux_coef": 0.01,
                     "threads": meta["threads"], "interleaved": True},
        "load_average": {"before": list(load_start), "after": list(load_end)},
        "router_aux_loss_logged": meta["router_aux_loss_logged"],
        "flops_per_token": fl,
        "flop_ratio": flop_ratio,
        "target": f"measured ratio <= {TARGET} x FLOP ratio",
        "results": results,
        "table": table,
    })
    print(f"\nwrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        _build(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_measure":
        dense_dir, moe_dir, impls, pairs, seq, warm, steps, threads = sys.argv[2:10]
        impl_list = [s.strip() for s in impls.split(",") if s.strip()]
        print(json.dumps(_measure(dense_dir, moe_dir, impl_list, int(pairs), int(seq), int(warm), int(steps),
                                  int(threads))))
    else:
        main()
