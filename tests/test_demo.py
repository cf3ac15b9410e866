"""umm demo: the synthetic world (gold reward, planted flaws), the report, and a quick run end to end."""

from __future__ import annotations

import json
import math
import pickle
import random
import statistics

import pytest
from pydantic import ValidationError

from umm_tools.demo.run import (
    COLUMNS,
    QUICK,
    ROWS,
    DemoOptions,
    build_report,
    format_markdown,
    make_tokenizer,
    plot_gold_curves,
    resolve,
)
from umm_tools.demo.world import BAD_WORDS, FILLER_WORDS, GLUE_WORDS, GOOD_WORDS, REGIMES, STYLES, GoldReward, World
from umm_tools.errors import UmmError

WORLD = World()


def prompt_of(regime) -> str:
    return f"{regime.openings[0]} rivers :"


def answer(words: tuple[str, ...], n: int) -> str:
    return " ".join(words[i % len(words)] for i in range(n))


def n_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def train_pairs():
    return WORLD.train_pairs(2000, random.Random(0))


# --- the gold reward ---------------------------------------------------------------------------------------


def test_gold_penalises_length_beyond_long_len_only():
    r = REGIMES[0]
    liked = STYLES[r.likes]
    for n in range(WORLD.short_len, WORLD.long_len + 1):  # length itself earns nothing
        assert WORLD.gold(prompt_of(r), answer(liked, n)) == pytest.approx(1.0)
    for extra in (1, 4, 12):
        assert WORLD.gold(prompt_of(r), answer(liked, WORLD.long_len + extra)) == pytest.approx(
            1.0 - WORLD.length_penalty * extra)
    # too short answers are diluted (divided by short_len), filler and glue dilute too
    assert WORLD.gold(prompt_of(r), liked[0]) == pytest.approx(1 / WORLD.short_len)
    assert WORLD.gold(prompt_of(r), answer(liked, 4) + " really really") == pytest.approx(4 / 6)
    assert WORLD.gold(prompt_of(r), answer(FILLER_WORDS, 5)) == 0.0


def test_each_regime_prefers_its_own_style():
    for r in REGIMES:
        assert WORLD.gold(prompt_of(r), answer(STYLES[r.likes], 5)) == pytest.approx(1.0)
        assert WORLD.gold(prompt_of(r), answer(STYLES[r.dislikes], 5)) == pytest.approx(-1.0)
        others = set(STYLES) - {r.likes, r.dislikes}
        for style in others:
            assert WORLD.gold(prompt_of(r), answer(STYLES[style], 5)) == 0.0
        # every regime has an opposite: the style it likes is the one another regime dislikes
        assert any(o.dislikes == r.likes for o in REGIMES if o is not r)
    # the same answer is good in one regime and bad in another
    explain, story = REGIMES[0], REGIMES[1]
    vivid = answer(STYLES["vivid"], 5)
    assert WORLD.gold(prompt_of(explain), vivid) < 0 < WORLD.gold(prompt_of(story), vivid)


def test_universal_words_and_regime_lookup():
    rng = random.Random(0)
    for r in REGIMES:
        assert WORLD.gold(prompt_of(r), answer(GOOD_WORDS, 4)) == pytest.approx(0.5)
        assert WORLD.gold(prompt_of(r), answer(BAD_WORDS, 4)) == pytest.approx(-0.5)
        assert WORLD.gold(prompt_of(r), answer(GLUE_WORDS, 4)) == 0.0
        for _ in range(20):
            assert WORLD.regime_of(WORLD.sample_prompt(rng, r)) is r
    with pytest.raises(ValueError, match="not a prompt"):
        WORLD.regime_of("write a poem :")


def test_gold_reward_function_is_picklable():
    fn = pickle.loads(pickle.dumps(GoldReward(World(length_penalty=0.3))))
    p = prompt_of(REGIMES[0])
    long = answer(STYLES[REGIMES[0].likes], WORLD.long_len + 2)
    assert fn([p, p], [long, ""]) == pytest.approx([1.0 - 0.6, 0.0])


# --- the data ----------------------------------------------------------------------------------------------


def test_training_pairs_carry_the_spurious_length_bias(train_pairs):
    longer = statistics.fmean(n_words(p["chosen"]) > n_words(p["rejected"]) for p in train_pairs)
    assert abs(longer - WORLD.spurious_rate) < 0.03
    assert all(n_words(p["chosen"]) != n_words(p["rejected"]) for p in train_pairs)
    # the bias holds past long_len too (where gold penalises length): an RM learns "longer is better" there
    long_pairs = [p for p in train_pairs if min(n_words(p["chosen"]), n_words(p["rejected"])) > WORLD.long_len]
    assert len(long_pairs) > 200
    assert statistics.fmean(n_words(p["chosen"]) > n_words(p["rejected"]) for p in long_pairs) > 0.6


def test_training_pairs_label_noise_rate(train_pairs):
    margins = [WORLD.gold(p["prompt"], p["chosen"]) - WORLD.gold(p["prompt"], p["rejected"]) for p in train_pairs]
    assert all(abs(m) >= WORLD.min_margin - 1e-9 for m in margins)
    swapped = statistics.fmean(m < 0 for m in margins)
    assert abs(swapped - WORLD.label_noise) < 0.02


def test_heldout_and_shift_pairs_have_gold_labels_and_opposite_bias():
    rng = random.Random(1)
    heldout, shift = WORLD.heldout_pairs(1000, rng), WORLD.shift_pairs(1000, rng)
    for pairs, rate in ((heldout, WORLD.spurious_rate), (shift, 1 - WORLD.spurious_rate)):
        assert all(WORLD.gold(p["prompt"], p["chosen"]) > WORLD.gold(p["prompt"], p["rejected"]) for p in pairs)
        longer = statistics.fmean(n_words(p["chosen"]) > n_words(p["rejected"]) for p in pairs)
        assert abs(longer - rate) < 0.04
        assert {p["subset"] for p in pairs} == {r.name for r in REGIMES}


def test_world_data_is_seeded():
    assert WORLD.train_pairs(50, random.Random(3)) == WORLD.train_pairs(50, random.Random(3))
    assert WORLD.lm_texts(50, random.Random(3)) == WORLD.lm_texts(50, random.Random(3))
    assert WORLD.train_pairs(50, random.Random(3)) != WORLD.train_pairs(50, random.Random(4))


def test_policy_texts_are_short_and_ppo_prompts_balanced():
    rng = random.Random(0)
    texts = WORLD.lm_texts(500, rng)
    lengths = [n_words(t.split(" : ", 1)[1]) for t in texts]
    assert max(lengths) <= WORLD.max_content + WORLD.max_filler < WORLD.long_len
    prompts = WORLD.prompts(400, rng)
    counts = {r.name: sum(WORLD.regime_of(p) is r for p in prompts) for r in REGIMES}
    assert set(counts.values()) == {100}


def test_tokenizer_covers_the_world(tmp_path):
    tok = make_tokenizer(WORLD, tmp_path / "tok")
    rng = random.Random(0)
    pairs = WORLD.train_pairs(100, rng)
    texts = WORLD.lm_texts(100, rng) + [f"{p['prompt']} {p['chosen']}" for p in pairs]
    for text, ids in zip(texts, tok(texts)["input_ids"], strict=True):
        assert tok.unk_token_id not in ids
        assert len(ids) == n_words(text)  # one token per word, no special tokens added
    assert tok.eos_token == "</s>" and tok.pad_token_id == 0


# --- options and report -------------------------------------------------------------------------------------


def test_quick_options_keep_explicit_sizes():
    opts = resolve(DemoOptions(quick=True, rm_steps=7))
    assert opts.rm_steps == 7 and opts.lm_steps == QUICK["lm_steps"]
    assert resolve(DemoOptions()).lm_steps == DemoOptions().lm_steps
    with pytest.raises(ValidationError, match="top_k"):
        DemoOptions(num_experts=2, top_k=3)
    with pytest.raises(ValidationError):
        DemoOptions(unknown=1)


def _fake_seed(shift: float) -> dict:
    figures, curves = {}, {}
    for i, row in enumerate(ROWS):
        figures[row] = {key: 0.5 + 0.1 * i + shift for key, _, _ in COLUMNS} | {"hacked": i % 2 == 0}
        curves[row] = {"step": [0, 5, 10], "gold": [0.0, 0.2 + shift, -0.1], "proxy": [0.0, 1.0, 2.0],
                       "length": [4.0, 8.0, 16.0]}
    return {"figures": figures, "curves": curves, "seconds": {}}


def test_report_mean_std_table_and_plot(tmp_path):
    opts = DemoOptions(seeds=2)
    report = build_report(opts, {0: _fake_seed(0.0), 1: _fake_seed(0.2)}, 12.0)
    assert report["summary"]["dense"]["acc_heldout"]["mean"] == pytest.approx(0.6)
    assert report["summary"]["dense"]["acc_heldout"]["std"] == pytest.approx(math.sqrt(0.02))
    assert report["summary"]["dense"]["hacked_seeds"] == 2 and report["summary"]["moe"]["hacked_seeds"] == 0
    json.dumps(report)  # results.json is plain JSON
    table = format_markdown(report).splitlines()
    assert len(table[0].split("|")) - 2 == len(COLUMNS) + 2
    assert "0.600 ± 0.141" in table[2] and table[2].startswith("| dense RM")
    plot_gold_curves(report, tmp_path / "gold.png")
    assert (tmp_path / "gold.png").stat().st_size > 1000


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The whole pipeline, small (``quick``: PPO runs one after the other in this process)."""
    from umm_tools.demo import run_demo

    return run_demo(DemoOptions(quick=True, output=str(tmp_path_factory.mktemp("demo") / "out")))


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_demo):
    out = quick_demo
    table = (out / "results.md").read_text().splitlines()
    rows = [line for line in table[2:] if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows] == list(ROWS.values())
    for line in table[:1] + rows:
        assert len(line.split("|")) - 2 == len(COLUMNS) + 2  # RM, every column, hacked
    report = json.loads((out / "results.json").read_text())
    for row in ROWS:
        for key, _, _ in COLUMNS:
            assert math.isfinite(report["summary"][row][key]["mean"]), (row, key)
        curve = report["per_seed"]["0"]["curves"][row]
        assert len(curve["gold"]) == len(curve["step"]) >= 2 and all(map(math.isfinite, curve["gold"]))
    summary = report["summary"]
    assert summary["dense"]["param_ratio"]["mean"] == 1.0
    assert summary["umm"]["param_ratio"]["mean"] == summary["uniform"]["param_ratio"]["mean"] == 1.0
    assert summary["moe"]["param_ratio"]["mean"] > 1.5
    assert (out / "gold_curves.png").stat().st_size > 1000
    for row in ROWS:
        assert (out / "seed_0" / f"ppo_{row}" / "summary.json").is_file()
    from umm_tools.demo import run_demo

    with pytest.raises(UmmError, match="already exists"):
        run_demo(DemoOptions(quick=True, output=str(out)))


@pytest.mark.slow
def test_ppo_in_worker_processes(quick_demo, tmp_path):
    """The default path of the full demo: PPO runs in 2 worker processes, progress read from their metrics."""
    from umm_tools.demo.run import read_ppo, run_ppos

    seed_dir = quick_demo / "seed_0"
    opts = resolve(DemoOptions(quick=True, ppo_workers=2, ppo_steps=2, eval_every=1))
    rms = {"dense": seed_dir / "dense_rm", "moe": seed_dir / "moe_rm", "umm": seed_dir / "umm_rm"}
    runs = run_ppos(seed_dir / "policy", seed_dir / "world" / "prompts.jsonl", rms, tmp_path, opts, 0, WORLD)
    assert set(runs) == set(rms)
    for run in runs.values():
        figures, curve = read_ppo(run)
        assert curve["step"] == [0, 1, 2] and math.isfinite(figures["gold_end"])
