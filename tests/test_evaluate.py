"""umm eval: accuracy against a hand count, ties, per-subset report, refusals, the Wilson interval."""

from __future__ import annotations

import json

import pytest

from tests.tiny import make_dense, make_pairs
from umm_tools.data import PairOptions, load_pairs
from umm_tools.errors import UmmError
from umm_tools.evaluate import (
    EvalOptions,
    evaluate,
    format_report,
    load_reward_model,
    score_pairs,
    score_texts,
    wilson_interval,
)

N = 30


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)


@pytest.fixture(scope="module", params=["llama", "qwen2_moe"])
def rm_dir(request, tmp_path_factory):
    """A dense RM and a Qwen2-MoE RM (the format umm upcycle writes): both are plain transformers RMs."""
    path = tmp_path_factory.mktemp(request.param)
    make_dense(path, model_type=request.param, seed=0, **(MOE if request.param == "qwen2_moe" else {}))
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = make_pairs(N, seed=5)
    for i, r in enumerate(rows):
        r["subset"] = ("helpful", "harmless", "code")[i % 3]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hand_rewards(model_dir, data_file):
    """Each sequence scored alone (batch of one, no padding), straight through the transformers model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pairs, _ = load_pairs(data_file, AutoTokenizer.from_pretrained(model_dir), PairOptions(max_length=256))
    with torch.no_grad():
        def reward(ids):
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

        return [(reward(p["chosen_ids"]), reward(p["rejected_ids"]), p["subset"]) for p in pairs]


def test_accuracy_agrees_with_a_hand_count(rm_dir, data_file, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate(rm_dir, data_file, EvalOptions(batch_size=4, output=str(out)))

    hand = hand_rewards(rm_dir, data_file)
    wins = sum(c > r for c, r, _ in hand)
    assert 0 < wins < N  # a random model: the count is informative
    assert result["n_pairs"] == N and result["wins"] == wins and result["ties"] == 0
    assert result["accuracy"] == pytest.approx(wins / N)
    margin = sum(c - r for c, r, _ in hand) / N
    assert result["mean_margin"] == pytest.approx(margin, abs=1e-5)
    lo, hi = result["ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(wins, N)) and lo < result["accuracy"] < hi

    assert set(result["per_subset"]) == {"helpful", "harmless", "code"}
    for name, sub in result["per_subset"].items():
        mine = [(c, r) for c, r, s in hand if s == name]
        assert sub["n_pairs"] == len(mine) == N // 3
        assert sub["accuracy"] == pytest.approx(sum(c > r for c, r in mine) / len(mine))

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["data_stats"]["rows_read"] == N and result["max_length"] == 256  # capped at the model's positions

    report = format_report(result)
    assert f"accuracy  {wins / N:.4f}" in report and f"{N} pairs" in report
    assert "a tie (equal rewards) counts as half" in report
    for name in ("helpful", "harmless", "code"):
        assert name in report


def test_ties_count_half(tmp_path, data_file):
    import torch

    model = make_dense(tmp_path / "flat", seed=3)
    with torch.no_grad():
        model.score.weight.zero_()  # every reward is exactly 0
    model.save_pretrained(tmp_path / "flat")
    result = evaluate(str(tmp_path / "flat"), data_file, EvalOptions(batch_size=8))
    assert result["ties"] == N and result["wins"] == 0 and result["accuracy"] == 0.5
    assert result["ci95"][0] < 0.5 < result["ci95"][1] and result["mean_margin"] == 0.0


def test_score_helpers_agree(rm_dir, data_file):
    rm, tok = load_reward_model(rm_dir, device="cpu")
    pairs, _ = load_pairs(data_file, tok, PairOptions(max_length=256))
    chosen, rejected = score_pairs(rm, pairs, batch_size=7, pad_token_id=rm.config.pad_token_id)
    assert chosen.shape == rejected.shape == (N,)
    texts = [p + " " + c for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)]
    assert score_texts(rm, tok, texts, batch_size=5) == pytest.approx(chosen.tolist(), abs=1e-5)
    assert not rm.training


def test_refuses_models_that_are_not_one_output_reward_models(tmp_path, data_file):
    make_dense(tmp_path / "two", num_labels=2)
    with pytest.raises(UmmError, match="num_labels=2"):
        evaluate(str(tmp_path / "two"), data_file)
    make_dense(tmp_path / "lm", head="causal")
    with pytest.raises(UmmError, match="LlamaForCausalLM, not a sequence-classification"):
        evaluate(str(tmp_path / "lm"), data_file)
    # A config that names no architecture: the missing score head gives it away.
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config | {"num_labels": 1}))
    with pytest.raises(UmmError, match=r"lacks weights .*score\.weight"):
        evaluate(str(tmp_path / "lm"), data_file)
    with pytest.raises(UmmError, match="could not read the model config"):
        evaluate(str(tmp_path / "missing"), data_file)


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook example
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
