"""``umm learn-merge``: the routing-statistics initialisation, the fit, convexity, fidelity to collapse and to
the mergekit YAML of several dense RMs, refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_dense, make_pairs

from umm_tools.collapse import collapse
from umm_tools.errors import UmmError
from umm_tools.learn_merge import (
    MERGEKIT_YAML,
    METRICS_FILE,
    OPTIONS_FILE,
    ROUTING_STATS_FILE,
    WEIGHTS_FILE,
    LearnMergeOptions,
    learn_merge,
    learn_merge_models,
    load_averaged_rm,
    stats_init_weights,
)
from umm_tools.merge_weights import PROJECTIONS, expert_names, load_merge_weights
from umm_tools.upcycle import UpcycleOptions, upcycle

E, S, C = 3, 2, 0.6  # routed experts, shared parts, shared share of every test MoE
K = S + E


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_stats(moe, gate=0.5, shares=None, layers=(0, 1)):
    shares = shares or [1 / E] * E
    layer = {"tokens": 100, "routed_prob_share": shares, "routed_topk_share": shares, "shared_gate_mean": gate}
    stats = {"format": "umm-routing-stats/1", "num_experts": E, "top_k": 2, "tokens": 100,
             "layers": {str(lyr): dict(layer) for lyr in layers}}
    (moe / ROUTING_STATS_FILE).write_text(json.dumps(stats))


def _perturb(moe, new, rel=0.5, seed=0):
    """A copy of ``moe`` whose experts (every routed expert, every shared part) differ by relative noise."""
    shutil.copytree(moe, new, ignore=shutil.ignore_patterns("model*.safetensors*"))
    sd = load_file(moe / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, t in sd.items():
        if ".mlp.experts." in name or ".mlp.shared_expert." in name:
            sd[name] = t + rel * t.std() * torch.randn(t.shape, generator=g)
    save_file(sd, new / "model.safetensors", metadata={"format": "pt"})
    return new


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 128, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 9, 5, 3)):  # right padding, four lengths
        mask[row, n:] = 0
    ids[mask == 0] = 0  # pad_token_id of the tiny configs
    return ids, mask


def _load(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()


def _bt_loss(chosen, rejected):
    return torch.nn.functional.softplus(rejected.double() - chosen.double()).mean().item()


def _check_convex(mw, n_experts):
    groups = [w for entry in mw.layers.values() for w in entry.values()] + list(mw.tensors.values())
    assert groups
    for w in groups:
        assert len(w) == n_experts and min(w) >= 0 and math.isclose(math.fsum(w), 1.0, abs_tol=1e-9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Dense llama RM, its fresh MoE (S=2, E=3, c=0.6), a perturbed copy with statistics, pair files."""
    root = tmp_path_factory.mktemp("learn_merge")
    make_dense(root / "dense", "llama", seed=0)
    moe = upcycle(str(root / "dense"), root / "moe",
                  UpcycleOptions(num_experts=E, top_k=2, shared_experts=S, shared_share=C))
    perturbed = _perturb(moe, root / "moe-perturbed")
    _write_stats(perturbed, gate=0.6, shares=[0.5, 0.3, 0.2])
    train = _write_jsonl(root / "train.jsonl", make_pairs(48, seed=0))
    evals = _write_jsonl(root / "eval.jsonl", make_pairs(16, seed=1))
    return {"root": root, "moe": moe, "perturbed": perturbed, "train": train, "eval": evals}


@pytest.fixture(scope="module")
def learned(tiny):
    """One learned merge of the perturbed MoE, measured on the separate eval file."""
    opts = LearnMergeOptions(steps=40, learning_rate=0.2, batch_size=8, eval_data=tiny["eval"])
    return learn_merge(tiny["perturbed"], tiny["train"], tiny["root"] / "learned", opts)


# ------------------------------------------------------------------------------------ initialisation
def test_stats_init_of_a_fresh_upcycle_is_c_over_S_and_rest_over_E(tiny):
    moe = tiny["root"] / "moe-fresh-stats"
    shutil.copytree(tiny["moe"], moe)
    _write_stats(moe)  # what a fresh upcycle's router and shared gate give: uniform shares, σ(0) = 1/2
    out = learn_merge(moe, None, tiny["root"] / "stats-fresh", LearnMergeOptions(mode="stats"))
    mw = load_merge_weights(out / WEIGHTS_FILE)
    assert mw.mode == "stats" and mw.experts == expert_names(S, E)
    want = [C / S] * S + [(1 - C) / E] * E
    assert set(mw.layers) == {"0", "1"}
    for entry in mw.layers.values():
        assert set(entry) == set(PROJECTIONS)
        for w in entry.values():
            assert max(abs(a - b) for a, b in zip(w, want, strict=True)) <= 1e-12
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["mode"] == "stats" and metrics["steps"] == 0 and metrics["before"] is None
    assert metrics["layers"]["0"]["gate_proj"]["shared"] == pytest.approx(C)
    assert json.loads((out / OPTIONS_FILE).read_text())["options"]["mode"] == "stats"


def test_stats_init_formula_on_trained_statistics():
    stats = {"num_experts": 3, "layers": {"0": {"routed_prob_share": [0.5, 0.3, 0.2],
                                                "routed_topk_share": [0.4, 0.4, 0.2], "shared_gate_mean": 0.8}}}
    rs, ss = 1 - C, 2 * C / S
    for share, pi in (("prob", [0.5, 0.3, 0.2]), ("topk", [0.4, 0.4, 0.2])):
        a = [ss * 0.8] * S + [rs * p for p in pi]
        for temperature in (1.0, 2.0):
            got = stats_init_weights(stats, [0], shared_experts=S, routed_scale=rs, shared_scale=ss, share=share,
                                     temperature=temperature)[0]
            powered = [v ** (1 / temperature) for v in a]
            assert got == pytest.approx([v / sum(powered) for v in powered], abs=1e-12)
    with pytest.raises(UmmError, match="no statistics for layer 1"):
        stats_init_weights(stats, [0, 1], shared_experts=S, routed_scale=rs, shared_scale=ss)
    bad = {"num_experts": 3, "layers": {"0": {"routed_prob_share": [0.5, 0.3], "shared_gate_mean": 0.5}}}
    with pytest.raises(UmmError, match="has 2 entries, num_experts is 3"):
        stats_init_weights(bad, [0], shared_experts=S, routed_scale=rs, shared_scale=ss)


def test_missing_routing_stats_and_the_uniform_mode(tiny):
    moe, root = tiny["moe"], tiny["root"]
    assert not (moe / ROUTING_STATS_FILE).exists()
    for mode in ("learned", "stats"):
        with pytest.raises(UmmError, match=r"routing_stats\.json not found.*Run `umm train`.*--mode uniform"):
            learn_merge(moe, tiny["train"], root / "nope", LearnMergeOptions(mode=mode))
    assert not (root / "nope").exists()
    with pytest.raises(UmmError, match="mode 'learned' fits the weights on preference pairs: give DATA"):
        learn_merge(tiny["perturbed"], None, root / "nope")

    out = learn_merge(moe, None, root / "uniform", LearnMergeOptions(mode="uniform"))
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, METRICS_FILE, OPTIONS_FILE])
    mw = load_merge_weights(out / WEIGHTS_FILE)
    assert mw.mode == "uniform"
    assert all(w == pytest.approx([1 / K] * K, abs=1e-15) for entry in mw.layers.values() for w in entry.values())
    with pytest.raises(UmmError, match="already exists"):
        learn_merge(moe, None, out, LearnMergeOptions(mode="uniform"))

    # with data, uniform and stats are measured but not fitted
    out = learn_merge(tiny["perturbed"], tiny["train"], root / "uniform-data",
                      LearnMergeOptions(mode="uniform", granularity="layer", eval_fraction=0.25))
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["steps"] == 0 and metrics["train_loss"] == [] and metrics["eval_on"] == "eval"
    assert metrics["before"] == metrics["after"] and metrics["before"]["n_pairs"] == 12
    assert metrics["data"]["train_pairs"] == 36


# ------------------------------------------------------------------------------------------ the fit
def test_any_weights_of_a_fresh_upcycle_are_the_dense_source(tiny):
    """All experts of a fresh upcycle are the source FFN: the fit cannot change the objective, and the
    averaged model learn-merge runs is the dense source RM."""
    from umm_tools.data import PairOptions, load_pairs
    from umm_tools.evaluate import score_pairs

    moe = tiny["root"] / "moe-fresh-learned"
    shutil.copytree(tiny["moe"], moe)
    _write_stats(moe, gate=0.7, shares=[0.6, 0.3, 0.1])
    out = learn_merge(moe, tiny["train"], tiny["root"] / "fresh-learned",
                      LearnMergeOptions(steps=3, learning_rate=0.5, eval_fraction=0))
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert abs(metrics["after"]["loss"] - metrics["before"]["loss"]) <= 1e-6
    dense = _load(tiny["root"] / "dense")
    pairs, _ = load_pairs(tiny["train"], load_averaged_rm(moe, out / WEIGHTS_FILE).tokenizer,
                          PairOptions(max_length=256))
    assert abs(_bt_loss(*score_pairs(dense, pairs, 8, 0)) - metrics["before"]["loss"]) <= 1e-4


def test_learned_weights_are_convex_and_fit_better_than_their_initialisation(tiny, learned):
    mw = load_merge_weights(learned / WEIGHTS_FILE)
    assert mw.mode == "learned" and mw.experts == expert_names(S, E) and not mw.tensors
    _check_convex(mw, K)
    init = stats_init_weights(json.loads((tiny["perturbed"] / ROUTING_STATS_FILE).read_text()), [0, 1],
                              shared_experts=S, routed_scale=1 - C, shared_scale=2 * C / S)
    moved = max(abs(a - b) for lyr, entry in mw.layers.items() for w in entry.values()
                for a, b in zip(w, init[int(lyr)], strict=True))
    assert moved > 1e-3  # the fit changed the weights
    assert mw.layers["0"]["gate_proj"] != mw.layers["0"]["down_proj"]  # one vector per projection

    metrics = json.loads((learned / METRICS_FILE).read_text())
    assert metrics["mode"] == "learned" and metrics["init"] == "routing_stats" and metrics["steps"] == 40
    assert len(metrics["train_loss"]) == 40 and metrics["eval_on"] == "eval"
    assert metrics["after"]["n_pairs"] == 16
    assert metrics["after"]["loss"] < metrics["before"]["loss"]

    # The fitted objective (BT loss on the training pairs) against the initialisation's.
    from umm_tools.data import PairOptions, load_pairs

    fitted = load_averaged_rm(tiny["perturbed"], learned / WEIGHTS_FILE)
    start = load_averaged_rm(tiny["perturbed"], learned / WEIGHTS_FILE)
    start.set_weights([init[int(lyr)] for lyr, _ in start.groups])
    pairs, _ = load_pairs(tiny["train"], fitted.tokenizer, PairOptions(max_length=256))
    before, after = _bt_loss(*start.score_pairs(pairs)), _bt_loss(*fitted.score_pairs(pairs))
    assert after < before - 1e-3, (before, after)


def test_collapse_of_the_learned_weights_scores_like_the_averaged_model(tiny, learned):
    """Fidelity: the dense RM umm collapse writes gives learn-merge's rewards (≤ 1e-4)."""
    from umm_tools.data import PairOptions, load_pairs
    from umm_tools.evaluate import score_pairs

    dense = _load(collapse(tiny["perturbed"], learned / WEIGHTS_FILE, tiny["root"] / "collapsed"))
    avg = load_averaged_rm(tiny["perturbed"], learned / WEIGHTS_FILE)
    ids, mask = _batch()
    with torch.no_grad():
        want = avg.rewards(ids, mask)
        got = dense(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert want.std() > 1e-3  # the rewards differ between inputs: the comparison means something
    assert (got - want).abs().max().item() <= 1e-4

    # ... and the in-training model's own numbers: metrics.json's eval loss after fitting.
    pairs, _ = load_pairs(tiny["eval"], avg.tokenizer, PairOptions(max_length=256))
    chosen, rejected = score_pairs(dense, pairs, 8, avg.pad_token_id)
    after = json.loads((learned / METRICS_FILE).read_text())["after"]
    assert abs(_bt_loss(chosen, rejected) - after["loss"]) <= 1e-4
    assert abs((chosen - rejected).mean().item() - after["mean_margin"]) <= 1e-4


def test_layer_granularity_with_pull_shares_one_vector_per_layer(tiny):
    opts = LearnMergeOptions(steps=5, learning_rate=0.2, granularity="layer", init_pull=1.0, eval_fraction=0)
    out = learn_merge(tiny["perturbed"], tiny["train"], tiny["root"] / "by-layer", opts)
    mw = load_merge_weights(out / WEIGHTS_FILE)
    _check_convex(mw, K)
    for entry in mw.layers.values():
        assert entry["gate_proj"] == entry["up_proj"] == entry["down_proj"]
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["eval_on"] == "train" and metrics["after"]["n_pairs"] == 48


# ----------------------------------------------------------------------------------- several dense RMs
def test_several_dense_rms_learned_weights_and_the_mergekit_yaml(tiny):
    from umm_tools.merge_method import run_mergekit_yaml

    root = tiny["root"]
    models = []
    for seed in range(3):
        make_dense(root / f"rm{seed}", "llama", seed=seed, tokenizer=True)
        models.append(str(root / f"rm{seed}"))
    opts = LearnMergeOptions(steps=20, learning_rate=0.2, eval_fraction=0)
    out = learn_merge_models(models, tiny["train"], root / "models-merge", opts)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, METRICS_FILE, OPTIONS_FILE, MERGEKIT_YAML])
    mw = load_merge_weights(out / WEIGHTS_FILE)
    assert mw.experts == ["model.0", "model.1", "model.2"] and mw.default is None
    _check_convex(mw, 3)
    assert set(mw.tensors) == {"model.embed_tokens.weight", "model.norm.weight", "score.weight"}
    assert set(mw.layers["1"]) == {"*", *PROJECTIONS}
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"] and "global" in metrics["layers"]
    assert str(out / WEIGHTS_FILE) in (out / MERGEKIT_YAML).read_text()

    merged = _load(run_mergekit_yaml(out / MERGEKIT_YAML, root / "models-merged"))
    avg = load_averaged_rm(models, out / WEIGHTS_FILE)
    ids, mask = _batch()
    with torch.no_grad():
        want = avg.rewards(ids, mask)
        got = merged(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (got - want).abs().max().item() <= 1e-4

    with pytest.raises(UmmError, match="mode 'stats' needs the routing statistics"):
        learn_merge_models(models, None, root / "nope", LearnMergeOptions(mode="stats"))
    with pytest.raises(UmmError, match="at least two"):
        learn_merge_models(models[:1], None, root / "nope", LearnMergeOptions(mode="uniform"))


# ------------------------------------------------------------------------------------------- options
def test_options():
    assert LearnMergeOptions().eval_fraction is None and LearnMergeOptions().resolved().eval_fraction == 0.1
    assert LearnMergeOptions(eval_data="e.jsonl").resolved().eval_fraction == 0.0
    assert LearnMergeOptions(eval_fraction=0.3).resolved().eval_fraction == 0.3
    with pytest.raises(ValueError, match="eval_fraction or eval_data"):
        LearnMergeOptions(eval_data="e.jsonl", eval_fraction=0.2)
    with pytest.raises(ValueError, match="extra"):
        LearnMergeOptions(step=3)
    with pytest.raises(ValueError, match="granularity"):
        LearnMergeOptions(granularity="tensor")
    for name, field in LearnMergeOptions.model_fields.items():
        assert field.description, name


# ---------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_take_the_single_process_steps(tiny):
    """torchrun, 2 CPU processes (gloo): each scores half of every batch, the logits' gradients are summed, so
    the weights are those of one process on the same batches; only one process writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    options = {"steps": 6, "learning_rate": 0.2, "batch_size": 8, "eval_fraction": 0.25}
    single = learn_merge(tiny["perturbed"], tiny["train"], tiny["root"] / "single", LearnMergeOptions(**options))
    out = tiny["root"] / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UMM_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "tests" / "stage_launch.py"), "learn-merge", str(tiny["perturbed"]), tiny["train"], str(out),
           json.dumps(options)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith((".ddp", "ddp"))) == ["ddp"]
    metrics = json.loads((out / METRICS_FILE).read_text())
    want = json.loads((single / METRICS_FILE).read_text())
    assert metrics["num_processes"] == 2 and metrics["after"]["n_pairs"] == want["after"]["n_pairs"] == 12
    assert metrics["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
    assert metrics["after"]["loss"] == pytest.approx(want["after"]["loss"], abs=1e-5)
    got, ref = load_merge_weights(out / WEIGHTS_FILE), load_merge_weights(single / WEIGHTS_FILE)
    for lyr, entry in ref.layers.items():
        for key, w in entry.items():
            assert got.layers[lyr][key] == pytest.approx(w, abs=1e-5)


# ---------------------------------------------------------------------------------------- with umm train
def test_on_a_moe_trained_by_umm_train(tiny):
    """The routing_stats.json `umm train` writes initialises the merge; the learned merge collapses faithfully."""
    from umm_tools.learn_merge import read_routing_stats
    from umm_tools.train import TrainOptions, train

    trained = train(str(tiny["moe"]), tiny["train"], tiny["root"] / "trained",
                    TrainOptions(max_steps=3, batch_size=4, learning_rate=1e-2, eval_fraction=0, eval_on_start=False))
    stats = read_routing_stats(trained)
    umm = json.loads((trained / "config.json").read_text())["umm"]
    want = stats_init_weights(stats, [0, 1], shared_experts=S, routed_scale=umm["routed_scale"],
                              shared_scale=umm["shared_scale"])
    assert want[0] != pytest.approx([C / S] * S + [(1 - C) / E] * E, abs=1e-6)  # training moved the statistics

    out = learn_merge(trained, tiny["train"], tiny["root"] / "trained-merge",
                      LearnMergeOptions(steps=3, learning_rate=0.1, eval_data=tiny["eval"]))
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["init"] == "routing_stats" and metrics["steps"] == 3
    mw = load_merge_weights(out / WEIGHTS_FILE)
    _check_convex(mw, K)
    dense = _load(collapse(trained, out / WEIGHTS_FILE, tiny["root"] / "trained-collapsed"))
    ids, mask = _batch()
    with torch.no_grad():
        want_r = load_averaged_rm(trained, out / WEIGHTS_FILE).rewards(ids, mask)
        got_r = dense(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (got_r - want_r).abs().max().item() <= 1e-4
