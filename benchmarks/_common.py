"""Helpers shared by the umm benchmarks: the SmolLM2-135M-shaped source model, measured subprocesses,
machine facts and markdown tables.

Run as a script only by the benchmarks themselves (``python _common.py build-source FOLDER``), so the
source model is built in its own process and the benchmark driver stays small.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORK = HERE / "_work"
RESULTS = HERE / "results"

# SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M), weights random: only shapes and dtype matter here.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    initializer_range=0.041666666666666664,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=0,
    eos_token_id=0,
)
SOURCE_MARKER = "umm_benchmark_source.json"

# Every tool runs offline, with the same environment.
TOOL_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

_TEXT = (
    "the a of and to in is it that was for on are with as be at by this have from or one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where "
    "most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such"
)


# ------------------------------------------------------------------------------------------ source model
def build_source(folder: Path, seed: int = 0) -> None:
    """A random-initialised LlamaForCausalLM of SmolLM2-135M shape in bf16, with a small local tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOLLM2_135M)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(folder))
    del model

    # The tokenizer's size does not matter to the weights; only the config's vocab_size does.
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok.train_from_iterator([_TEXT], trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|im_end|>")
    fast.save_pretrained(str(folder))
    (folder / SOURCE_MARKER).write_text(json.dumps({"config": SMOLLM2_135M, "seed": seed}, sort_keys=True) + "\n")


def ensure_source(folder: Path, seed: int = 0) -> Path:
    """Build the source model in a child process unless ``folder`` already holds exactly that model."""
    marker = folder / SOURCE_MARKER
    want = json.dumps({"config": SMOLLM2_135M, "seed": seed}, sort_keys=True)
    if marker.is_file() and marker.read_text().strip() == want and (folder / "model.safetensors").is_file():
        print(f"[setup] reusing source model {folder}", flush=True)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    run_checked([sys.executable, str(Path(__file__).resolve()), "build-source", str(folder), str(seed)])
    print(f"[setup] built source model {folder} in {time.perf_counter() - t:.1f}s", flush=True)
    return folder


# ------------------------------------------------------------------------------------------ processes
def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TOOL_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_checked(cmd: list[str], log: Path | None = None, **kw: Any) -> None:
    """Run ``cmd`` (not measured); on failure show its output and stop."""
    res = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, **kw)
    if log is not None:
        log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}")


GNU_TIME = Path("/usr/bin/time")
_STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile")


def _tree_status(root: int) -> dict[str, int] | None:
    """Summed VmRSS / RssAnon / RssFile (kB) of ``root`` and its descendants, from /proc/PID/status."""
    import psutil

    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return None
    total = dict.fromkeys(_STATUS_KEYS, 0)
    for p in procs:
        try:
            text = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        for k in _STATUS_KEYS:
            m = re.search(rf"^{k}:\s+(\d+)", text, flags=re.M)
            if m:
                total[k] += int(m.group(1))
    return total


def measure(cmd: list[str], log: Path, cwd: Path | None = None, poll_s: float = 0.05) -> dict[str, Any]:
    """Run ``cmd`` in its own process; wall time (parent's clock) and the child's peak RSS.

    Peak RSS is the kernel's ``ru_maxrss`` of the child from GNU time (``/usr/bin/time -v``). Its split into
    anonymous memory and file-backed pages (mmap'ed weights count as RSS too) is polled from /proc every
    ``poll_s`` s: ``peak_anon_mb`` and ``peak_file_mb`` are separate peaks of the polled values and can miss
    short spikes. Without GNU time, the polled VmRSS peak is the peak RSS.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    use_time = GNU_TIME.is_file()
    tfile = log.with_suffix(".time")
    full = [str(GNU_TIME), "-v", "-o", str(tfile), *cmd] if use_time else cmd
    peak = dict.fromkeys(_STATUS_KEYS, 0)
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, env=tool_env(), stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        while proc.poll() is None:
            st = _tree_status(proc.pid)
            if st:
                for k in _STATUS_KEYS:
                    peak[k] = max(peak[k], st[k])
            time.sleep(poll_s)
        out["wall_s"] = time.perf_counter() - t0
        rc = proc.returncode
    if use_time:
        text = tfile.read_text()
        out["peak_rss_mb"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
        out["user_s"] = float(re.search(r"User time \(seconds\): ([\d.]+)", text).group(1))
        out["sys_s"] = float(re.search(r"System time \(seconds\): ([\d.]+)", text).group(1))
        out["rss_method"] = "/usr/bin/time -v (ru_maxrss)"
    else:
        out["peak_rss_mb"] = peak["VmRSS"] / 1024
        out["rss_method"] = f"/proc polling every {poll_s}s"
    out["peak_anon_mb"] = peak["RssAnon"] / 1024
    out["peak_file_mb"] = peak["RssFile"] / 1024
    out["rc"] = rc
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and minima) of the numeric fields of repeated runs, plus the runs themselves."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    low = {k: min(r[k] for r in runs) for k in keys}
    return {"median": med, "min": low, "runs": runs}


def warm_cache(paths: list[Path]) -> int:
    """Read files once so every tool starts with them in the page cache; returns the bytes read."""
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                n += len(block)
    return n


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def tensor_count(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            n += len(list(f.keys()))
    return n


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ reporting
def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", lscpu)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        mem = Path("/proc/meminfo").read_text()
        info["ram_gb"] = round(int(re.search(r"MemTotal:\s*(\d+)", mem).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        info["ram_gb"] = None
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:  # the umm code measured: commit, and whether umm_tools/ differs from it
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "umm_tools"], cwd=REPO, capture_output=True,
                               text=True)
        changed = sorted(line[3:] for line in dirty.stdout.splitlines())
        info["umm_commit"] = head.stdout.strip() + (f" + local changes: {', '.join(changed)}" if changed else "")
    except OSError:
        info["umm_commit"] = None
    info["python"] = platform.python_version()
    for pkg in ("torch", "transformers", "mergekit", "safetensors", "umm-tools"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "build-source":
        build_source(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    else:
        raise SystemExit("usage: python _common.py build-source FOLDER [SEED]")
