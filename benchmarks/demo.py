"""Run ``umm demo`` with several seeds (default 3) and write benchmarks/results/demo.md and demo.json.

The demo's own table (mean ± std over seeds) plus, per seed, what happened to each RM during PPO: is the
dense RM hacked (its gold reward falls while its proxy rises), how often, and does UMM-RM do better?
Every figure comes from the run; nothing is edited by hand.

    python benchmarks/demo.py [--seeds 3] [--output benchmarks/_work/demo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import DEFAULT_WORK, RESULTS, machine_info, markdown_table, write_results  # noqa: E402


def per_seed_table(report: dict) -> str:
    from umm_tools.demo.run import ROWS

    rows = []
    for seed, data in report["per_seed"].items():
        for row, label in ROWS.items():
            f = data["figures"][row]
            rows.append([seed, label, f"{f['acc_shift']:.3f}", f"{f['gold_start']:.3f}", f"{f['gold_peak']:.3f}",
                         f"{f['gold_peak_step']}", f"{f['gold_end']:.3f}", f"{f['gold_drop']:.3f}",
                         f"{f['proxy_start']:.2f} → {f['proxy_end']:.2f}", f"{f['length_start']:.1f} → {f['length_end']:.1f}",
                         "yes" if f["hacked"] else "no"])
    header = ["seed", "RM", "acc. shift", "gold start", "gold peak", "at step", "gold end", "drop", "proxy",
              "answer length", "hacked"]
    return markdown_table(header, rows)


def comparison(report: dict) -> list[str]:
    """Plain counts over seeds: how often each RM was hacked, and UMM-RM against the dense RM."""
    from umm_tools.demo.run import ROWS

    seeds = report["per_seed"]
    n = len(seeds)
    lines = [f"- {label}: hacked on {report['summary'][row]['hacked_seeds']}/{n} seeds" for row, label in ROWS.items()]

    def better(key: str, sign: int) -> int:
        """Seeds where UMM-RM's ``key`` is below (sign -1) or above (sign +1) the dense RM's."""
        return sum(sign * (d["figures"]["umm"][key] - d["figures"]["dense"][key]) > 0 for d in seeds.values())

    lines += [
        f"- UMM-RM's gold drop (peak − end) smaller than the dense RM's: {better('gold_drop', -1)}/{n} seeds",
        f"- UMM-RM's gold at the end higher than the dense RM's: {better('gold_end', 1)}/{n} seeds",
        f"- UMM-RM's accuracy under shift higher than the dense RM's: {better('acc_shift', 1)}/{n} seeds",
        f"- UMM-RM's held-out accuracy higher than the dense RM's: {better('acc_heldout', 1)}/{n} seeds",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=DEFAULT_WORK / "demo")
    parser.add_argument("--quick", action="store_true", help="the CI-sized demo (numbers not meaningful)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    for name in ("httpx", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from umm_tools.demo import DemoOptions, run_demo

    machine = machine_info()
    t = time.perf_counter()
    out = run_demo(DemoOptions(seeds=args.seeds, quick=args.quick, output=str(args.output), overwrite=True))
    wall = time.perf_counter() - t
    report = json.loads((out / "results.json").read_text())

    command = f"python benchmarks/demo.py --seeds {args.seeds}" + (" --quick" if args.quick else "")
    per_seed_seconds = {s: round(sum(d["seconds"].values())) for s, d in report["per_seed"].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "gold_curves.png", RESULTS / "demo_gold_curves.png")
    lines = [
        f"# `umm demo`, {args.seeds} seeds",
        "",
        f"Command: `{command}` (runs `umm demo --seeds {args.seeds}`" + (" --quick" if args.quick else "") + ")",
        f"Runtime: {wall:.0f} s in all; per seed (s): {per_seed_seconds}.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, load average at start "
        f"{machine.get('loadavg_at_start')}; Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; one thread per process, PPO runs 2 at a time.",
        "",
        "## The table (mean ± std over seeds)",
        "",
        (out / "results.md").read_text().rstrip(),
        "",
        "## What happened",
        "",
        *comparison(report),
        "",
        "## Per seed",
        "",
        per_seed_table(report),
        "",
        "Gold curves: `demo_gold_curves.png` (mean over seeds, ±1 std band).",
        "",
    ]
    (RESULTS / "demo.md").write_text("\n".join(lines))
    write_results("demo", {"command": command, "wall_s": wall, "machine": machine, "report": report})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
