"""Benchmark ``umm upcycle`` against ``mergekit-moe`` (Qwen2-MoE output, one shared expert) and ``cp``.

One run, on a random-initialised LlamaForCausalLM of SmolLM2-135M shape in bf16 (built once into the work
folder), E=4 routed experts, top-2, S=1 shared expert:

* wall time and peak RSS of ``umm upcycle SRC OUT --num-experts 4 --top-k 2 --shared-experts 1`` against
  ``mergekit-moe`` with an equivalent YAML (``architecture: qwen``, ``gate_mode: random``, bf16, the same
  model as base, as 4 experts and as the one shared expert), each tool in its own process;
* umm's output bytes per second against ``cp`` of a file of the same size (the I/O limit);
* ``umm_tools.upcycle.upcycle()`` timed inside a process that already imported its libraries, to split
  interpreter and import start-up from the work itself.

Runs alternate between the tools; every number is the median of ``--repeats`` runs. Dirty pages are
flushed (``sync``, untimed) before every timed run; the source is read once beforehand so every tool reads
it from the page cache. Writes are not fsync'ed by any tool nor by ``cp``: all of them measure writing into
the page cache.

    python benchmarks/upcycle.py [--repeats 3] [--work-dir benchmarks/_work] [--keep]

Prints a markdown table; writes benchmarks/results/upcycle.json (and upcycle_profile.txt when a target is
missed, unless --no-profile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    RESULTS,
    ensure_source,
    machine_info,
    markdown_table,
    measure,
    rmtree,
    shard_bytes,
    summarize,
    tensor_count,
    verdict,
    warm_cache,
    write_results,
)

E, K, S = 4, 2, 1
MB = 1e6

# Child program: import everything upcycle needs first, then time the call alone (optionally profiled).
API_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, safetensors  # noqa
from transformers import AutoConfig, Qwen2MoeConfig  # noqa: resolve transformers' lazy modules
import umm_tools.hub  # noqa
from umm_tools.upcycle import UpcycleOptions, upcycle
src, out, E, K, S, prof = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
AutoConfig.from_pretrained(src)  # imports the source's config module (transformers imports lazily)
t1 = time.perf_counter()
opts = UpcycleOptions(num_experts=E, top_k=K, shared_experts=S)
if prof:
    import cProfile, io, pstats
    pr = cProfile.Profile()
    pr.enable()
t2 = time.perf_counter()
upcycle(src, out, opts)
t3 = time.perf_counter()
if prof:
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(25)
    open(prof, "w").write(buf.getvalue())
print("UMM_TIMES " + json.dumps({"import_s": t1 - t0, "call_s": t3 - t2}))
"""


def mergekit_yaml(src: Path) -> str:
    experts = "\n".join(f"  - source_model: {src}" for _ in range(E))
    return (
        f"# mergekit-moe config equivalent to: umm upcycle SRC OUT --num-experts {E} --top-k {K} "
        f"--shared-experts {S}\n"
        f"base_model: {src}\n"
        "architecture: qwen            # Qwen2-MoE output (needs exactly one shared expert)\n"
        "gate_mode: random             # no hidden-state gates: no forward pass, no prompts needed\n"
        "dtype: bfloat16\n"
        f"experts_per_token: {K}\n"
        f"experts:\n{experts}\n"
        f"shared_experts:\n  - source_model: {src}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="folder for models and outputs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool (median reported)")
    ap.add_argument("--cp-repeats", type=int, default=5, help="timed cp runs (after one warm-up)")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs in --work-dir")
    ap.add_argument("--no-profile", action="store_true", help="do not cProfile umm when a target is missed")
    args = ap.parse_args()

    work = args.work_dir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs_upcycle"
    logs.mkdir(exist_ok=True)
    info = machine_info()
    print(f"[setup] {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, load {info.get('loadavg_at_start')}")

    src = ensure_source(work / "src")
    yml = work / "upcycle_mergekit_moe.yml"
    yml.write_text(mergekit_yaml(src))
    warm_cache(sorted(src.glob("*.safetensors")))

    def cmd(tool: str, out: Path, r: int) -> list[str]:
        if tool == "umm":
            return ["umm", "upcycle", str(src), str(out), "--num-experts", str(E), "--top-k", str(K),
                    "--shared-experts", str(S)]
        if tool == "mergekit-moe":
            return ["mergekit-moe", str(yml), str(out)]
        return [sys.executable, "-c", API_CHILD, str(src), str(out), str(E), str(K), str(S), ""]

    tools = ["umm", "mergekit-moe", "umm-api"]
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    tensors: dict[str, int] = {}
    for r in range(args.repeats):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            out = work / f"out_upcycle_{tool}"
            rmtree(out)
            os.sync()
            m = measure(cmd(tool, out, r), logs / f"{tool}_{r}.log")
            m["output_bytes"] = shard_bytes(out)
            if tool == "umm-api":
                m.update(json.loads(re.search(r"UMM_TIMES (.+)", (logs / f"{tool}_{r}.log").read_text()).group(1)))
            if tool not in tensors:
                tensors[tool] = tensor_count(out)
            runs[tool].append(m)
            print(f"[run {r}] {tool:13s} wall {m['wall_s']:6.2f}s  peak RSS {m['peak_rss_mb']:7.0f} MB"
                  + (f"  (in-process call {m['call_s']:.2f}s)" if "call_s" in m else ""), flush=True)
            if tool != "umm":
                rmtree(out)

    # cp of a file the size of umm's output shards: the I/O limit on this machine.
    shards = sorted((work / "out_upcycle_umm").glob("*.safetensors"))
    cp_src, cp_dst = work / "cp_src.bin", work / "cp_dst.bin"
    with open(cp_src, "wb") as f:
        for s in shards:
            with open(s, "rb") as g:
                while block := g.read(1 << 24):
                    f.write(block)
    rmtree(work / "out_upcycle_umm")
    # cp uses copy_file_range (an in-kernel copy); dd bs=16M copies through user space with read/write,
    # as a Python writer must: reported for context.
    copies = {"cp": ["cp", str(cp_src), str(cp_dst)],
              "dd": ["dd", f"if={cp_src}", f"of={cp_dst}", "bs=16M", "status=none"]}
    for tool in copies:
        runs[tool] = []
    for r in range(args.cp_repeats + 1):  # run 0 is a warm-up
        for tool, c in copies.items():
            cp_dst.unlink(missing_ok=True)
            os.sync()
            m = measure(c, logs / f"{tool}_{r}.log")
            m["output_bytes"] = cp_dst.stat().st_size
            print(f"[{tool} {r}{' warm-up' if r == 0 else ''}] wall {m['wall_s']:.2f}s", flush=True)
            if r:
                runs[tool].append(m)
    cp_dst.unlink(missing_ok=True)
    cp_src.unlink(missing_ok=True)

    res = {t: summarize(v) for t, v in runs.items()}
    med = {t: v["median"] for t, v in res.items()}

    def mbps(t: str, key: str = "wall_s") -> float:
        return med[t]["output_bytes"] / med[t][key] / MB

    def cpu_s(t: str) -> float:
        return med[t]["user_s"] + med[t]["sys_s"]

    ratios = {
        "cpu_umm_over_mergekit": cpu_s("umm") / cpu_s("mergekit-moe"),
        "wall_min_umm_over_mergekit": res["umm"]["min"]["wall_s"] / res["mergekit-moe"]["min"]["wall_s"],
        "wall_umm_over_mergekit": med["umm"]["wall_s"] / med["mergekit-moe"]["wall_s"],
        "rss_umm_over_mergekit": med["umm"]["peak_rss_mb"] / med["mergekit-moe"]["peak_rss_mb"],
        "throughput_umm_over_cp": mbps("umm") / mbps("cp"),
        "throughput_umm_call_over_cp": mbps("umm-api", "call_s") / mbps("cp"),
        "throughput_umm_over_dd": mbps("umm") / mbps("dd"),
    }
    targets = {
        "wall time <= 1.0x mergekit-moe": ratios["wall_umm_over_mergekit"] <= 1.0,
        "peak RSS <= 0.5x mergekit-moe": ratios["rss_umm_over_mergekit"] <= 0.5,
        "throughput >= 50% of cp": ratios["throughput_umm_over_cp"] >= 0.5,
    }

    def rss(t: str) -> str:
        m = med[t]
        return f"{m['peak_rss_mb']:.0f} ({m['peak_anon_mb']:.0f} / {m['peak_file_mb']:.0f})"

    def row(label: str, t: str) -> list[Any]:
        m = med[t]
        return [label, f"{m['wall_s']:.2f} ({res[t]['min']['wall_s']:.2f})", cpu_s(t), rss(t), m["output_bytes"] / MB,
                mbps(t), tensors.get(t, "-")]

    api = med["umm-api"]
    rows = [
        row("`umm upcycle` (CLI)", "umm"),
        row("`mergekit-moe` (qwen, 1 shared)", "mergekit-moe"),
        row("`cp` of the same bytes", "cp"),
        row("`dd bs=16M` of the same bytes (context)", "dd"),
        ["`upcycle()` call only, imports done (context)", f"{api['call_s']:.2f} ({res['umm-api']['min']['call_s']:.2f})",
         "-", "-", api["output_bytes"] / MB,
         mbps("umm-api", "call_s"), tensors["umm-api"]],
        ["  its whole process: imports s / wall s", f"{api['import_s']:.2f} / {api['wall_s']:.2f}", cpu_s("umm-api"),
         rss("umm-api"), "-", "-", "-"],
    ]
    header = ["run", "wall s, median (min)", "CPU s (user+sys)", "peak RSS MB (anon / file-backed)", "output MB", "MB/s",
              "tensors"]
    table = markdown_table(header, rows)
    trows = [
        ["wall time umm / mergekit-moe", ratios["wall_umm_over_mergekit"], "<= 1.0",
         verdict(targets["wall time <= 1.0x mergekit-moe"])],
        ["wall time umm / mergekit-moe, best runs (context)", ratios["wall_min_umm_over_mergekit"], "-", "-"],
        ["CPU time umm / mergekit-moe (context)", ratios["cpu_umm_over_mergekit"], "-", "-"],
        ["peak RSS umm / mergekit-moe", ratios["rss_umm_over_mergekit"], "<= 0.5",
         verdict(targets["peak RSS <= 0.5x mergekit-moe"])],
        ["throughput umm CLI / cp", ratios["throughput_umm_over_cp"], ">= 0.5",
         verdict(targets["throughput >= 50% of cp"])],
        ["throughput `upcycle()` call / cp (context)", ratios["throughput_umm_call_over_cp"], "-", "-"],
        ["throughput umm CLI / dd (context)", ratios["throughput_umm_over_dd"], "-", "-"],
    ]
    ttable = markdown_table(["target", "value", "goal", "verdict"], trows)

    profile = None
    if not all(targets.values()) and not args.no_profile:
        profile = RESULTS / "upcycle_profile.txt"
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = work / "out_upcycle_profile"
        rmtree(out)
        os.sync()
        measure([sys.executable, "-c", API_CHILD, str(src), str(out), str(E), str(K), str(S), str(profile)],
                logs / "profile.log")
        rmtree(out)
        print(f"[profile] a target was missed: cProfile of one upcycle() call -> {profile}")

    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = {
        "benchmark": "upcycle",
        "command": "python benchmarks/upcycle.py " + " ".join(sys.argv[1:]),
        "setup": {"model": "LlamaForCausalLM, SmolLM2-135M shape, random init, bf16", "E": E, "top_k": K, "S": S,
                  "source_bytes": shard_bytes(src), "repeats": args.repeats, "cp_repeats": args.cp_repeats,
                  "mergekit_moe_yaml": yml.read_text(), "page_cache": "source pre-read; sync before each run"},
        "machine": info,
        "results": res,
        "ratios": ratios,
        "targets": targets,
        "profile": str(profile.relative_to(RESULTS.parent.parent)) if profile else None,
        "table_markdown": table,
        "targets_markdown": ttable,
    }
    path = write_results("upcycle", data)
    print()
    print(table)
    print()
    print(ttable)
    print(f"\nwrote {path}")

    if not args.keep:
        rmtree(src)
        for p in work.glob("out_upcycle_*"):
            rmtree(p)


if __name__ == "__main__":
    main()
