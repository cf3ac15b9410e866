"""umm ppo: the PPO math, a run end to end on tiny models, resume, errors, and a 2-process run."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_dense, random_text
from umm_tools.errors import UmmError
from umm_tools.ppo import SUMMARY_KEYS, PPOOptions, ppo

REPO = Path(__file__).resolve().parents[1]


def count_good(prompts: list[str], responses: list[str]) -> list[float]:
    """A known reward: how often the word 'good' appears in the response."""
    return [float(r.split().count("good")) for r in responses]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on 2 cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    make_dense(d / "policy", head="causal")
    make_dense(d / "rm", head="seqcls", seed=1)
    make_dense(d / "rm2", head="seqcls", seed=2, num_labels=2)
    rng = random.Random(0)
    write_jsonl(d / "prompts.jsonl", [{"prompt": random_text(rng, 3, 8)} for _ in range(24)])
    write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": random_text(rng, 3, 8)}]}
                                   for _ in range(12)])
    return d


def small(**kw) -> PPOOptions:
    base = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=8, total_steps=3, eval_every=1,
                eval_prompts=4, save_every=0, learning_rate=1e-3)
    base.update(kw)
    return PPOOptions(**base)


@pytest.fixture(scope="module")
def run(tiny):
    """A 3-step run against the tiny RM with count_good as gold; the callback's stats per step."""
    stats: list[dict] = []
    out = ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(tiny / "out"),
              small(reward_model=str(tiny / "rm")), gold_fn=count_good, callback=stats.append)
    return out, stats


# --- the math ----------------------------------------------------------------------------------------------


def test_gae_matches_its_definition():
    import torch

    from umm_tools.ppo import gae

    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.zeros(3, 6)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        for t in range(6):
            if t >= n:
                assert adv[i, t] == 0 and ret[i, t] == 0
                continue
            # A_t = Σ_l (γλ)^l δ_{t+l}, δ_k = r_k + γ V_{k+1} - V_k, V_n = 0 (terminal)
            v = [float(values[i, k]) for k in range(n)] + [0.0]
            want = sum((gamma * lam) ** (k - t) * (float(rewards[i, k]) + gamma * v[k + 1] - v[k])
                       for k in range(t, n))
            assert adv[i, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[i, t].item() == pytest.approx(want + v[t], abs=1e-5)


def test_kl_estimators_and_losses():
    import torch

    from umm_tools.ppo import kl_per_token, ppo_losses

    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    assert kl_per_token(logp, logp, "k1").abs().max() == 0
    assert kl_per_token(logp, logp, "k3").abs().max() == 0
    ref = torch.log(torch.tensor([0.3, 0.4, 0.5]))
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert torch.allclose(kl_per_token(logp, ref, "k1"), logp - ref)

    # ratio 1 and values unchanged: surrogate = -mean(A), value loss = ½ mean((V - R)²), nothing clipped
    adv, v, ret, mask = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[1.5, 1.0]]), \
        torch.ones(1, 2)
    pg, vf, st = ppo_losses(torch.zeros(1, 2), torch.zeros(1, 2), adv, v, v, ret, mask, 0.2, 0.2)
    assert pg.item() == pytest.approx(0.5)
    assert vf.item() == pytest.approx(0.5)
    assert st["clipfrac"] == 0 and st["ratio_dev"] == 0
    # a ratio far above 1+ε with a positive advantage: the gradient is clipped away
    logp = torch.tensor([[1.0, 0.0]], requires_grad=True)
    pg, _, st = ppo_losses(logp, torch.zeros(1, 2), adv, v, v, ret, mask, 0.2, 0.2)
    pg.backward()
    assert logp.grad[0, 0] == 0 and st["clipfrac"] == 0.5


def test_spearman_and_summary():
    from umm_tools.ppo import spearman, summarize

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 3, 2]) == pytest.approx(1 / 3)  # average ranks for ties (scipy agrees)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    records = [{"kind": "eval", "step": s, "proxy": p, "gold": g, "kl": s / 10}
               for s, p, g in [(0, 0.0, 0.0), (5, 1.0, 2.0), (10, 2.0, 1.5)]]
    s = summarize(records + [{"kind": "train", "step": 1}], steps=10)
    assert s["gold_peak"] == 2.0 and s["gold_peak_step"] == 5 and s["gold_final"] == 1.5
    assert s["gold_drop"] == pytest.approx(0.5) and s["proxy_final"] == 2.0 and s["evaluations"] == 3


def test_options():
    from pydantic import ValidationError

    assert PPOOptions(reward_model="rm", batch_size=8, total_episodes=20).num_steps == 3
    with pytest.raises(ValidationError, match="multiple of mini_batch_size"):
        PPOOptions(reward_model="rm", batch_size=10, mini_batch_size=4)
    with pytest.raises(ValidationError, match="gradient_accumulation_steps"):
        PPOOptions(reward_model="rm", mini_batch_size=6, batch_size=12, gradient_accumulation_steps=4)
    with pytest.raises(ValidationError):
        PPOOptions(reward_model="rm", kl_estimator="k2")
    with pytest.raises(ValidationError):
        PPOOptions(reward_model="rm", typo=1)
    for name, field in PPOOptions.model_fields.items():
        assert field.description, name


# --- a run -------------------------------------------------------------------------------------------------


def test_first_step_policy_equals_reference(run):
    _, stats = run
    assert [s["step"] for s in stats] == [1, 2, 3]
    assert abs(stats[0]["kl"]) <= 1e-6  # KL to the reference before any update
    for s in stats:  # rollouts and the first minibatch see the same model: ratio exactly 1
        assert s["ratio_dev_first_minibatch"] <= 1e-6
    assert stats[-1]["approx_kl"] > 0  # ... and the policy did move


def test_output_files(run, tiny):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = run
    assert not (out / ".incomplete").exists() and not (out / "checkpoint").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in evals for k in ("proxy", "gold", "kl", "response_length"))
    assert evals[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        value = summary[key]
        if key == "proxy_gold_spearman" and value is None:  # undefined when gold is constant
            assert len({r["gold"] for r in evals}) == 1
            continue
        assert isinstance(value, int | float) and math.isfinite(value), key
    assert summary["critic_init"] == "reward"
    assert json.loads((out / "ppo_options.json").read_text())["options"]["reward_model"] == str(tiny / "rm")
    trained = AutoModelForCausalLM.from_pretrained(out / "policy")
    base = AutoModelForCausalLM.from_pretrained(tiny / "policy")
    assert (out / "policy" / "tokenizer_config.json").is_file()
    moved = [n for n, p in base.state_dict().items() if not torch.equal(p, trained.state_dict()[n])]
    assert moved, "PPO did not change the policy"


def test_existing_output_dir(run, tiny):
    out, _ = run
    with pytest.raises(UmmError, match="already exists"):
        ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(out), small(reward_model=str(tiny / "rm")))
    before = (out / "summary.json").read_text()
    assert ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(out),
               small(reward_model=str(tiny / "rm"), resume=True)) == out  # finished: nothing to do
    assert (out / "summary.json").read_text() == before


def test_reward_rises(tiny):
    """With a known reward (count of 'good' in the response) PPO learns to say 'good'."""
    stats: list[dict] = []
    opts = small(batch_size=16, mini_batch_size=8, total_steps=24, eval_prompts=0, learning_rate=3e-3,
                 kl_coef=0.0)
    ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(tiny / "rise"), opts, reward_fn=count_good,
        callback=stats.append)
    scores = [s["score"] for s in stats]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, scores


def test_lora_chat_prompts_and_retokenised_rm(tiny):
    """LoRA policy (reference = adapter disabled), chat prompts, an RM whose tokenizer differs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rm = tiny / "rm_other_tok"
    make_dense(rm, head="seqcls", seed=1)
    tok = AutoTokenizer.from_pretrained(rm)
    tok.add_tokens(["zebra"])  # another vocabulary: the RM must re-tokenise the text
    tok.save_pretrained(rm)
    stats: list[dict] = []
    out = ppo(str(tiny / "policy"), str(tiny / "chat.jsonl"), str(tiny / "lora"),
              small(reward_model=str(rm), lora_rank=4, total_steps=2, eval_every=0, eval_prompts=2,
                    learning_rate=1e-2),
              gold_fn=count_good, callback=stats.append)
    assert abs(stats[0]["kl"]) <= 1e-6 and stats[0]["ratio_dev_first_minibatch"] <= 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["critic_init"] == "policy"  # the RM cannot read the policy's ids
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "policy")  # adapter merged: a plain model
    base = AutoModelForCausalLM.from_pretrained(tiny / "policy")
    assert set(merged.state_dict()) == set(base.state_dict())
    assert any(not torch.equal(p, merged.state_dict()[n]) for n, p in base.state_dict().items())


def test_rm_scorer_reuses_or_retokenises(tiny):
    """Re-tokenised RM input equals the reused ids when the text round-trips (word-level tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from umm_tools.ppo import Prompt, _ModelScorer

    policy_tok = AutoTokenizer.from_pretrained(tiny / "policy")
    other = AutoTokenizer.from_pretrained(tiny / "policy")
    other.add_tokens(["zebra"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny / "rm")
    same, diff = _ModelScorer(model, policy_tok, policy_tok, 4), _ModelScorer(model, other, policy_tok, 4)
    assert same.reuse_ids and not diff.reuse_ids
    prompt = Prompt("the cat runs")
    p_ids = policy_tok(prompt.text)["input_ids"]
    r_ids = policy_tok(" good dog")["input_ids"]
    assert same.ids(prompt, p_ids, r_ids, " good dog") == p_ids + r_ids
    assert diff.ids(prompt, p_ids, r_ids, " good dog") == p_ids + r_ids
    chat = [{"role": "user", "content": "the cat runs"}]
    rendered = Prompt(policy_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), chat)
    p_ids = policy_tok(rendered.text, add_special_tokens=False)["input_ids"]
    want = policy_tok.apply_chat_template(chat + [{"role": "assistant", "content": "good dog"}], tokenize=False)
    assert diff.tok.decode(diff.ids(rendered, p_ids, r_ids, " good dog")) == other.decode(other(want)["input_ids"])
    scores = same([prompt, prompt], [p_ids, p_ids[:2]], [r_ids, r_ids], [" good dog"] * 2)
    assert scores.shape == (2,)


def test_resume_continues_from_the_checkpoint(tiny):
    """A run that crashes after its step-2 checkpoint, resumed, ends exactly where an uninterrupted run ends."""
    import torch
    from safetensors.torch import load_file

    opts = dict(reward_model=str(tiny / "rm"), total_steps=4, save_every=2, eval_every=2, adaptive_kl=True,
                whiten_rewards=True)
    ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(tiny / "straight"), small(**opts),
        gold_fn=count_good)

    class Crash(Exception):
        pass

    def crash_at_3(stats):
        if stats["step"] == 3:
            raise Crash

    out = tiny / "resumed"
    with pytest.raises(Crash):
        ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(out), small(**opts), gold_fn=count_good,
            callback=crash_at_3)
    assert (out / ".incomplete").exists() and (out / "checkpoint" / "trainer_state.json").is_file()
    assert not (out / "summary.json").exists()
    with pytest.raises(UmmError, match="--resume"):
        ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(out), small(**opts), gold_fn=count_good)

    seen: list[int] = []
    ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(out), small(**opts, resume=True),
        gold_fn=count_good, callback=lambda s: seen.append(s["step"]))
    assert seen == [3, 4]
    assert not (out / ".incomplete").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [0, 2, 4]
    want = [json.loads(x) for x in (tiny / "straight" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines, want, strict=True):
        for key in ("score", "kl", "kl_coef", "proxy", "gold"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    got = load_file(out / "policy" / "model.safetensors")
    ref = load_file(tiny / "straight" / "policy" / "model.safetensors")
    for name, t in ref.items():
        assert torch.allclose(got[name], t, atol=1e-6), name


# --- errors ------------------------------------------------------------------------------------------------


def test_rm_with_two_outputs(tiny):
    with pytest.raises(UmmError, match=r"reward model: .*num_labels=2.*num_labels=1"):
        ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(tiny / "e1"), small(reward_model=str(tiny / "rm2")))
    assert not (tiny / "e1").exists()


def test_policy_not_a_causal_lm(tiny):
    with pytest.raises(UmmError, match="not a causal language model.*LlamaForSequenceClassification"):
        ppo(str(tiny / "rm"), str(tiny / "prompts.jsonl"), str(tiny / "e2"), small(reward_model=str(tiny / "rm")))


def test_empty_prompts_file(tiny):
    empty = tiny / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UmmError, match="empty"):
        ppo(str(tiny / "policy"), str(empty), str(tiny / "e3"), small(reward_model=str(tiny / "rm")))
    header_only = tiny / "empty.csv"
    header_only.write_text("prompt\n")
    with pytest.raises(UmmError, match="no rows"):
        ppo(str(tiny / "policy"), str(header_only), str(tiny / "e3"), small(reward_model=str(tiny / "rm")))


def test_missing_prompt_column_lists_columns(tiny):
    bad = write_jsonl(tiny / "bad.jsonl", [{"question": "a b", "id": 1}])
    with pytest.raises(UmmError, match="no 'prompt' column.*columns found: question, id"):
        ppo(str(tiny / "policy"), str(bad), str(tiny / "e4"), small(reward_model=str(tiny / "rm")))


def test_no_reward(tiny):
    with pytest.raises(UmmError, match="reward_model"):
        ppo(str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(tiny / "e5"), small())


# --- two processes -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes(tiny):
    """torchrun, 2 CPU processes (gloo DDP): the run completes and only one process writes the files."""
    out = tiny / "ddp"
    options = {"reward_model": str(tiny / "rm"), "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1,
               "max_new_tokens": 6, "total_steps": 2, "eval_every": 1, "eval_prompts": 3, "save_every": 1,
               "learning_rate": 1e-3, "whiten_rewards": True}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UMM_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ppo_launch.py"), str(tiny / "policy"), str(tiny / "prompts.jsonl"), str(out),
           json.dumps(options)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]  # written once, not once per process
    assert [r["prompts"] for r in lines if r["kind"] == "eval"] == [3, 3, 3]  # gathered over both processes
    assert abs(lines[1]["kl"]) <= 1e-6 and lines[1]["ratio_dev_first_minibatch"] <= 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not (out / ".incomplete").exists()
