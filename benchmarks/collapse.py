"""Benchmark ``umm collapse`` against a ``mergekit-yaml`` linear merge, and the collapsed RM's scoring speed.

One run, SmolLM2-135M shape (random-initialised LlamaForCausalLM, bf16, built once into the work folder):

* ``umm collapse`` of an E=4, S=1 MoE (made by ``umm upcycle`` from that model, not timed) with random
  convex merge weights (Dirichlet(1) per layer and projection, written with umm_tools.merge_weights)
  against ``mergekit-yaml`` ``merge_method: linear`` of five dense models of that shape (five copies of the
  source, weights 0.2): the same five-way average for every FFN tensor. Wall time and peak RSS of each
  tool in its own process, alternating, median of ``--repeats``; inputs pre-read into the page cache,
  ``sync`` (untimed) before each run. ``umm collapse`` runs through the CLI when the CLI has the command,
  else through ``umm_tools.collapse.collapse`` in a ``python -c`` child.
* scoring throughput (``--batch`` x ``--seq-len`` random tokens, 4 x 64 by default to stay within ~5 minutes
  on 2 cores (8 x 128 takes ~8 s a batch for the dense RM there), ``torch.set_num_threads(--threads)``,
  fp32, one warm-up batch per model, then ``--score-rounds`` rounds that time one batch of every model in
  rotating order) of the collapsed RM against the source dense RM (same architecture: expect 1.00) and the
  MoE RM. Also checks that the collapsed FFN weights equal the source's and compares the rewards.

    python benchmarks/collapse.py [--repeats 3] [--work-dir benchmarks/_work] [--keep]

Prints a markdown table; writes benchmarks/results/collapse.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    ensure_source,
    machine_info,
    markdown_table,
    measure,
    rmtree,
    run_checked,
    shard_bytes,
    summarize,
    tensor_count,
    tool_env,
    warm_cache,
    write_results,
)

E, K, S = 4, 2, 1
N_DENSE = E + S  # five canonical experts per FFN tensor <-> five dense models
MB = 1e6

COLLAPSE_CHILD = (
    "import sys; from umm_tools.collapse import collapse; collapse(sys.argv[1], sys.argv[2], sys.argv[3])"
)

# Child program: scoring throughput of the three RMs (see score_child).
SCORE_CHILD = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForSequenceClassification

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
models = {}
for name, path in spec["models"].items():
    m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    m.config.pad_token_id = spec["pad"]
    models[name] = m.eval()
# The source is a CausalLM: its score head is new. Give it the collapsed RM's head so rewards compare.
with torch.no_grad():
    models["dense"].score.weight.copy_(models["collapsed"].score.weight)
sd_dense, sd_coll = models["dense"].state_dict(), models["collapsed"].state_dict()
ffn = [k for k in sd_coll if ".mlp." in k]
ffn_diff = max((sd_coll[k] - sd_dense[k]).abs().max().item() for k in ffn)
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["seq_len"]), generator=g)
mask = torch.ones_like(ids)
names = list(models)
times = {n: [] for n in names}
cpu = {n: [] for n in names}
rewards = {}
with torch.inference_mode():
    for n in names:  # warm-up
        for _ in range(spec["warmup"]):
            rewards[n] = models[n](input_ids=ids, attention_mask=mask).logits.float()
    for r in range(spec["rounds"]):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            models[n](input_ids=ids, attention_mask=mask)
            times[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
out = {"ffn_max_abs_diff_collapsed_vs_source": ffn_diff, "ffn_tensors_compared": len(ffn), "models": {}}
for n in names:
    med = statistics.median(times[n])
    out["models"][n] = {
        "batch_times_s": times[n], "median_batch_s": med,
        "batch_cpu_s": cpu[n], "median_batch_cpu_s": statistics.median(cpu[n]),
        "min_batch_s": min(times[n]),
        "seq_per_s": spec["batch"] / med, "tok_per_s": spec["batch"] * spec["seq_len"] / med,
        "seq_per_s_best": spec["batch"] / min(times[n]),
        "max_abs_reward_diff_vs_dense": (rewards[n] - rewards["dense"]).abs().max().item(),
    }
print("UMM_SCORE " + json.dumps(out))
"""


def random_merge_weights(path: Path, layers: int, seed: int = 0) -> None:
    """Random convex weights over shared.0, routed.0..3 for every layer and projection (Dirichlet(1))."""
    from umm_tools.merge_weights import PROJECTIONS, MergeWeights, expert_names

    rng = random.Random(seed)
    experts = expert_names(S, E)

    def convex() -> list[float]:
        g = [rng.gammavariate(1.0, 1.0) for _ in experts]
        w = [x / sum(g) for x in g]
        w[-1] = 1.0 - sum(w[:-1])
        return w

    mw = MergeWeights(
        mode="learned", experts=experts,
        layers={str(lyr): {p: convex() for p in PROJECTIONS} for lyr in range(layers)},
        meta={"note": "random convex weights (Dirichlet(1)) written by benchmarks/collapse.py; not learned",
              "seed": seed},
    )
    mw.save(path)


def linear_yaml(dense: list[Path]) -> str:
    models = "".join(f"  - model: {d}\n    parameters: {{weight: {1 / len(dense)}}}\n" for d in dense)
    return (
        f"# mergekit-yaml: the plain average of {len(dense)} dense models (the collapse's five-way average)\n"
        "merge_method: linear\n"
        "dtype: bfloat16\n"
        f"models:\n{models}"
    )


def cli_has_collapse() -> bool:
    res = subprocess.run(["umm", "--help"], env=tool_env(), capture_output=True, text=True)
    return re.search(r"^\W*collapse\b", res.stdout, flags=re.M) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="folder for models and outputs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per merge tool (median reported)")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs in --work-dir")
    ap.add_argument("--batch", type=int, default=4, help="sequences per scoring batch")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for scoring")
    ap.add_argument("--score-rounds", type=int, default=5, help="timed scoring batches per model")
    args = ap.parse_args()

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs_collapse"
    logs.mkdir(exist_ok=True)
    info = machine_info()
    print(f"[setup] {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, load {info.get('loadavg_at_start')}")

    src = ensure_source(work / "src")
    cfg = json.loads((src / "config.json").read_text())
    moe = work / "collapse_moe"
    rmtree(moe)
    run_checked(["umm", "upcycle", str(src), str(moe), "--num-experts", str(E), "--top-k", str(K),
                 "--shared-experts", str(S)], log=logs / "upcycle.log")
    mw = work / "collapse_merge_weights.json"
    random_merge_weights(mw, cfg["num_hidden_layers"])
    dense = []
    for i in range(N_DENSE):
        d = work / f"collapse_dense_{i}"
        rmtree(d)
        d.mkdir()
        for f in src.iterdir():
            if f.is_file():
                shutil.copy(f, d / f.name)
        dense.append(d)
    yml = work / "collapse_mergekit_linear.yml"
    yml.write_text(linear_yaml(dense))
    print(f"[setup] MoE, merge weights and {N_DENSE} dense copies ready", flush=True)

    use_cli = cli_has_collapse()

    def cmd(tool: str, out: Path) -> list[str]:
        if tool == "umm":
            if use_cli:
                return ["umm", "collapse", str(moe), str(mw), str(out)]
            return [sys.executable, "-c", COLLAPSE_CHILD, str(moe), str(mw), str(out)]
        return ["mergekit-yaml", str(yml), str(out)]

    inputs = {"umm": sorted(moe.glob("*.safetensors")),
              "mergekit-yaml": [p for d in dense for p in sorted(d.glob("*.safetensors"))]}
    warm_cache(inputs["umm"] + inputs["mergekit-yaml"])
    tools = ["umm", "mergekit-yaml"]
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    tensors: dict[str, int] = {}
    for r in range(args.repeats):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            out = work / f"out_collapse_{tool}"
            rmtree(out)
            os.sync()
            m = measure(cmd(tool, out), logs / f"{tool}_{r}.log")
            m["input_bytes"] = sum(p.stat().st_size for p in inputs[tool])
            m["output_bytes"] = shard_bytes(out)
            tensors.setdefault(tool, tensor_count(out))
            runs[tool].append(m)
            print(f"[run {r}] {tool:13s} wall {m['wall_s']:6.2f}s  peak RSS {m['peak_rss_mb']:7.0f} MB", flush=True)
            if tool != "umm":
                rmtree(out)
    collapsed = work / "out_collapse_umm"

    # Scoring throughput: source dense RM, collapsed RM, MoE RM.
    spec = {"models": {"dense": str(src), "collapsed": str(collapsed), "moe": str(moe)},
            "threads": args.threads, "batch": args.batch, "seq_len": args.seq_len, "rounds": args.score_rounds,
            "warmup": 1, "vocab": cfg["vocab_size"], "pad": 2}
    print(f"[score] {args.batch}x{args.seq_len} tokens, {args.threads} threads, {args.score_rounds} rounds",
          flush=True)
    sm = measure([sys.executable, "-c", SCORE_CHILD, json.dumps(spec)], logs / "score.log")
    score = json.loads(re.search(r"UMM_SCORE (.+)", (logs / "score.log").read_text()).group(1))
    score["process"] = sm
    score["spec"] = spec

    res = {t: summarize(v) for t, v in runs.items()}
    med = {t: v["median"] for t, v in res.items()}
    sc = score["models"]

    def cpu_s(t: str) -> float:
        return med[t]["user_s"] + med[t]["sys_s"]

    ratios = {
        "wall_umm_over_mergekit": med["umm"]["wall_s"] / med["mergekit-yaml"]["wall_s"],
        "rss_umm_over_mergekit": med["umm"]["peak_rss_mb"] / med["mergekit-yaml"]["peak_rss_mb"],
        "score_collapsed_over_dense": sc["collapsed"]["seq_per_s"] / sc["dense"]["seq_per_s"],
        "score_collapsed_over_moe": sc["collapsed"]["seq_per_s"] / sc["moe"]["seq_per_s"],
        "score_best_collapsed_over_dense": sc["collapsed"]["seq_per_s_best"] / sc["dense"]["seq_per_s_best"],
        "score_best_collapsed_over_moe": sc["collapsed"]["seq_per_s_best"] / sc["moe"]["seq_per_s_best"],
        "wall_min_umm_over_mergekit": res["umm"]["min"]["wall_s"] / res["mergekit-yaml"]["min"]["wall_s"],
        "cpu_umm_over_mergekit": cpu_s("umm") / cpu_s("mergekit-yaml"),
        "score_cpu_collapsed_over_dense": sc["dense"]["median_batch_cpu_s"] / sc["collapsed"]["median_batch_cpu_s"],
        "score_cpu_collapsed_over_moe": sc["moe"]["median_batch_cpu_s"] / sc["collapsed"]["median_batch_cpu_s"],
    }

    def rss(t: str) -> str:
        m = med[t]
        return f"{m['peak_rss_mb']:.0f} ({m['peak_anon_mb']:.0f} / {m['peak_file_mb']:.0f})"

    how = "`umm collapse` (CLI)" if use_cli else "`umm_tools.collapse.collapse` (python -c)"

    def row(label: str, t: str) -> list[Any]:
        m = med[t]
        return [label, f"{m['wall_s']:.1f} ({res[t]['min']['wall_s']:.1f})", cpu_s(t), rss(t), m["input_bytes"] / MB,
                m["output_bytes"] / MB, tensors[t]]

    rows = [row(how, "umm"), row(f"`mergekit-yaml` linear, {N_DENSE} dense models", "mergekit-yaml")]
    header = ["merge", "wall s, median (min)", "CPU s (user+sys)", "peak RSS MB (anon / file-backed)", "input MB",
              "output MB", "tensors"]
    table = markdown_table(header, rows)
    srows = [[n, f"{sc[n]['median_batch_s']:.2f} ({sc[n]['min_batch_s']:.2f})", sc[n]["seq_per_s"],
              sc[n]["tok_per_s"],
              f"{sc['collapsed']['seq_per_s'] / sc[n]['seq_per_s']:.2f}", f"{sc[n]['median_batch_cpu_s']:.2f}",
              f"{sc[n]['median_batch_cpu_s'] / sc['collapsed']['median_batch_cpu_s']:.2f}",
              f"{sc[n]['max_abs_reward_diff_vs_dense']:.2e}"]
             for n in ("dense", "collapsed", "moe")]
    stable = markdown_table(["RM", "wall s / batch, median (min)", "seq/s", "tokens/s", "speed collapsed / this",
                             "CPU s / batch", "CPU: this / collapsed", "max abs reward diff vs dense"], srows)
    rtable = markdown_table(["ratio", "value"], [
        ["wall time umm / mergekit-yaml (median)", ratios["wall_umm_over_mergekit"]],
        ["wall time umm / mergekit-yaml (best run)", ratios["wall_min_umm_over_mergekit"]],
        ["CPU time umm / mergekit-yaml", ratios["cpu_umm_over_mergekit"]],
        ["peak RSS umm / mergekit-yaml", ratios["rss_umm_over_mergekit"]],
        ["scoring speed collapsed / source dense, wall (expect 1.00)", ratios["score_collapsed_over_dense"]],
        ["scoring speed collapsed / source dense, CPU time (expect 1.00)", ratios["score_cpu_collapsed_over_dense"]],
        ["scoring speed collapsed / source dense, best batch (expect 1.00)", ratios["score_best_collapsed_over_dense"]],
        ["scoring speed collapsed / MoE, wall", ratios["score_collapsed_over_moe"]],
        ["scoring speed collapsed / MoE, CPU time", ratios["score_cpu_collapsed_over_moe"]],
        ["scoring speed collapsed / MoE, best batch", ratios["score_best_collapsed_over_moe"]],
        ["max abs diff of collapsed FFN weights vs source", score["ffn_max_abs_diff_collapsed_vs_source"]],
    ])

    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = {
        "benchmark": "collapse",
        "command": "python benchmarks/collapse.py " + " ".join(sys.argv[1:]),
        "setup": {"model": "LlamaForCausalLM, SmolLM2-135M shape, random init, bf16", "E": E, "top_k": K, "S": S,
                  "umm_invocation": "cli" if use_cli else "python -c umm_tools.collapse.collapse",
                  "merge_weights": "random convex, Dirichlet(1), seed 0", "repeats": args.repeats,
                  "mergekit_yaml": yml.read_text(), "page_cache": "inputs pre-read; sync before each run"},
        "machine": info,
        "results": res,
        "scoring": score,
        "ratios": ratios,
        "table_markdown": table,
        "scoring_markdown": stable,
        "ratios_markdown": rtable,
    }
    path = write_results("collapse", data)
    print()
    print(table)
    print()
    print(stable)
    print()
    print(rtable)
    print(f"\nwrote {path}")

    if not args.keep:
        for p in [src, moe, collapsed, *dense, *work.glob("out_collapse_*")]:
            rmtree(p)


if __name__ == "__main__":
    main()
