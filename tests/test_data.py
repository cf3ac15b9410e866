"""Preference data: sources, formats, column mapping, length handling, bad rows, splits, trl compatibility."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from tests.hub_server import local_hub  # noqa: F401  (fixture)
from tests.tiny import make_dense, make_pairs, make_tokenizer
from umm_tools.data import (
    DataOptions,
    PairOptions,
    implicit_prompt_length,
    iter_pair_batches,
    load_pairs,
    load_preference_data,
)
from umm_tools.errors import UmmError

N = 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("plain_tok"), chat_template=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def columns(ds, *names):
    return {n: list(ds[n]) for n in names}


IDS_AND_TEXT = ("prompt", "chosen", "rejected", "chosen_ids", "rejected_ids")


# --- sources and formats ---------------------------------------------------------------------------------


def test_explicit_pairs_load_the_same_from_every_file_type(tmp_path, tok):
    rows = make_pairs(N)
    sources = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "csv": write_csv(tmp_path / "d.csv", rows),
        "parquet": write_parquet(tmp_path / "d.parquet", rows),
    }
    (tmp_path / "d.json").write_text(json.dumps(rows))
    sources["json"] = str(tmp_path / "d.json")
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    sources["json columns"] = str(tmp_path / "cols.json")

    loaded = {kind: load_pairs(src, tok) for kind, src in sources.items()}
    ref_ds, ref_stats = loaded["jsonl"]
    assert ref_stats.format == "explicit" and ref_stats.rows_read == N and ref_stats.pairs == N
    for kind, (ds, stats) in loaded.items():
        assert columns(ds, *IDS_AND_TEXT) == columns(ref_ds, *IDS_AND_TEXT), kind
        assert stats.format == "explicit"

    # The sequence is prompt + " " + response + EOS, tokenised with the tokenizer's special tokens.
    r0 = rows[0]
    assert ref_ds[0]["prompt"] == r0["prompt"] and ref_ds[0]["chosen"] == r0["chosen"]
    assert ref_ds[0]["chosen_ids"] == tok(r0["prompt"] + " " + r0["chosen"])["input_ids"] + [tok.eos_token_id]
    assert ref_ds[0]["rejected_ids"] == tok(r0["prompt"] + " " + r0["rejected"])["input_ids"] + [tok.eos_token_id]


def test_implicit_hh_style(tmp_path, tok):
    rows = make_pairs(N)
    hh = [
        {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
         "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"}
        for r in rows
    ]
    ds, stats = load_pairs(write_jsonl(tmp_path / "hh.jsonl", hh), tok)
    assert stats.format == "implicit" and len(ds) == N
    for r, h, got in zip(rows, hh, ds, strict=True):
        assert got["prompt"] == f"\n\nHuman: {r['prompt']}\n\nAssistant:"
        assert got["chosen"] == " " + r["chosen"] and got["rejected"] == " " + r["rejected"]
        assert got["chosen_ids"] == tok(h["chosen"])["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        ("\n\nHuman: hi\n\nAssistant: yes good", "\n\nHuman: hi\n\nAssistant: yes bad", "\n\nHuman: hi\n\nAssistant:"),
        # Multi-turn: the last Assistant marker of the common prefix.
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
         "\n\nAssistant: e", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"),
        ("the cat runs", "the cat sleeps", "the cat "),
        ("the cat runs", "the cats run", "the "),  # 'cat' vs 'cats': cut back to a whole word
        ("the cat", "the cat runs", "the "),  # both responses must be non-empty
        ("cat", "dog", ""),
    ],
)
def test_implicit_prompt_length(chosen, rejected, prompt):
    assert chosen[: implicit_prompt_length(chosen, rejected)] == prompt


def test_conversational_with_chat_template(tmp_path, tok):
    rows = make_pairs(N)

    def msgs(p, a):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": a}]

    # Three common layouts of the same pairs: implicit prompt (trl), prompt string repeated at the head of the
    # dialogues (UltraFeedback-binarized), explicit prompt messages with response-only lists.
    layouts = {
        "implicit": [{"chosen": msgs(r["prompt"], r["chosen"]), "rejected": msgs(r["prompt"], r["rejected"])}
                     for r in rows],
        "h4": [{"prompt": r["prompt"], "chosen": msgs(r["prompt"], r["chosen"]),
                "rejected": msgs(r["prompt"], r["rejected"])} for r in rows],
        "explicit": [{"prompt": msgs(r["prompt"], "x")[:1], "chosen": msgs("", r["chosen"])[1:],
                      "rejected": msgs("", r["rejected"])[1:]} for r in rows],
    }
    loaded = {}
    for name, data in layouts.items():
        ds, stats = load_pairs(write_jsonl(tmp_path / f"{name}.jsonl", data), tok)
        assert stats.format == "conversational", name
        loaded[name] = ds
    ref = loaded["implicit"]
    for name, ds in loaded.items():
        assert columns(ds, *IDS_AND_TEXT) == columns(ref, *IDS_AND_TEXT), name

    r0 = rows[0]
    rendered = tok.apply_chat_template(msgs(r0["prompt"], r0["chosen"]), tokenize=False)
    assert ref[0]["prompt"] == f"<|user|> {r0['prompt']} <|assistant|> "
    assert ref[0]["prompt"] + ref[0]["chosen"] == rendered
    # The template's text is tokenised as rendered: no extra special tokens, no EOS added.
    assert ref[0]["chosen_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]


def test_conversational_without_chat_template_falls_back_to_role_lines(tmp_path, plain_tok, caplog):
    rows = [{"chosen": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "good yes"}],
             "rejected": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "bad no"}]}]
    with caplog.at_level(logging.WARNING, logger="umm_tools.data"):
        ds, _ = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows), plain_tok)
    assert "no chat template" in caplog.text
    assert ds[0]["prompt"] == "user: the cat\nassistant:"
    assert ds[0]["chosen"] == " good yes\n"


def test_column_mapping_and_subset(tmp_path, tok):
    rows = make_pairs(N)
    mapped = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "src": f"s{i % 3}"}
              for i, r in enumerate(rows)]
    opts = PairOptions(prompt_column="question", chosen_column="good", rejected_column="bad", subset_column="src")
    ds, _ = load_pairs(write_jsonl(tmp_path / "m.jsonl", mapped), tok, opts)
    ref, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert columns(ds, *IDS_AND_TEXT) == columns(ref, *IDS_AND_TEXT)
    assert ds["subset"] == [f"s{i % 3}" for i in range(N)]
    assert "subset" not in ref.column_names

    with pytest.raises(UmmError, match=r"no column 'chosen'.*'good'.*chosen_column"):
        load_pairs(str(tmp_path / "m.jsonl"), tok)
    with pytest.raises(UmmError, match="no subset column 'source'"):
        load_pairs(str(tmp_path / "d.jsonl"), tok, PairOptions(subset_column="source"))


def test_forced_format(tmp_path, tok):
    rows = make_pairs(5)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    _, stats = load_pairs(path, tok, PairOptions(format="implicit"))  # the prompt column is ignored
    assert stats.format == "implicit"
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    with pytest.raises(UmmError, match="needs a prompt column"):
        load_pairs(no_prompt, tok, PairOptions(format="explicit"))


# --- length ----------------------------------------------------------------------------------------------


def test_max_length_truncates_or_drops_and_counts(tmp_path, tok):
    short = {"prompt": "the cat", "chosen": "good yes", "rejected": "bad no"}  # 2 + 2 + EOS = 5 tokens
    long_ = {"prompt": "the dog", "chosen": "good big red cat runs", "rejected": "bad big red cat runs"}  # 8
    long_prompt = {"prompt": "one two three four five six seven", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long_, long_prompt, short | {"prompt": "a dog"}])

    ds, stats = load_pairs(path, tok, PairOptions(max_length=6))
    assert (stats.truncated, stats.dropped_prompt_too_long, stats.dropped_too_long) == (1, 1, 0)
    assert len(ds) == stats.pairs == 3
    assert all(len(ids) <= 6 for ids in [*ds["chosen_ids"], *ds["rejected_ids"]])
    cut = ds[1]
    prompt_ids = tok(long_["prompt"])["input_ids"]
    assert cut["chosen_ids"][: len(prompt_ids)] == prompt_ids  # the prompt is kept, the response cut at the end
    assert cut["chosen_ids"] == (tok(long_["prompt"] + " " + long_["chosen"])["input_ids"])[:6]
    assert cut["chosen"] == long_["chosen"]  # texts stay whole

    ds, stats = load_pairs(path, tok, PairOptions(max_length=6, over_length="drop"))
    assert (stats.truncated, stats.dropped_prompt_too_long, stats.dropped_too_long) == (0, 1, 1)
    assert len(ds) == 2

    # Responses that differ only after the limit become identical: dropped and counted.
    same_start = {"prompt": "the", "chosen": "big red cat good", "rejected": "big red cat bad"}
    ds, stats = load_pairs(write_jsonl(tmp_path / "s.jsonl", [same_start, short]), tok, PairOptions(max_length=3))
    assert stats.dropped_identical_after_truncation == 1 and len(ds) == 1

    with pytest.raises(UmmError, match="no pair is left"):
        load_pairs(write_jsonl(tmp_path / "lp.jsonl", [long_prompt]), tok, PairOptions(max_length=4))


# --- bad rows --------------------------------------------------------------------------------------------


def _with_broken_rows(tmp_path, n_rows, broken_at):
    """jsonl text with ``n_rows`` lines; the 1-based lines in ``broken_at`` are broken in various ways."""
    rows = make_pairs(n_rows)
    breakers = [
        lambda r: {k: v for k, v in r.items() if k != "rejected"},
        lambda r: r | {"chosen": "   "},
        lambda r: r | {"chosen": 42},
        lambda r: r | {"rejected": r["chosen"]},
        None,  # not JSON at all
    ]
    lines = []
    for i, r in enumerate(rows, 1):
        if i in broken_at:
            breaker = breakers[broken_at.index(i) % len(breakers)]
            lines.append("{not json" if breaker is None else json.dumps(breaker(r)))
        else:
            lines.append(json.dumps(r))
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_too_many_bad_rows_stop_with_their_line_numbers(tmp_path, tok):
    path = _with_broken_rows(tmp_path, 50, [3, 10, 20, 30, 45])  # 10%
    with pytest.raises(UmmError) as err:
        load_pairs(path, tok)
    msg = str(err.value)
    assert path in msg and "5 of 50 rows" in msg and "bad_row_threshold" in msg
    for expected in ("line 3: missing field 'rejected'", "line 10: 'chosen' is empty",
                     "line 20: 'chosen' is not a string (int)", "line 30: chosen is identical to rejected",
                     "line 45: not valid JSON"):
        assert expected in msg
    # The same file loads when the threshold allows it, with every reason counted.
    _, stats = load_pairs(path, tok, PairOptions(bad_row_threshold=0.1))
    assert stats.bad_rows == {"missing_field": 1, "empty_text": 1, "not_text": 1, "identical": 1, "malformed": 1}
    assert stats.pairs == 45


def test_few_bad_rows_are_skipped_with_a_warning(tmp_path, tok, caplog):
    path = _with_broken_rows(tmp_path, 50, [7])  # 2%
    with caplog.at_level(logging.WARNING, logger="umm_tools.data"):
        ds, stats = load_pairs(path, tok)
    assert len(ds) == 49 and stats.bad_rows == {"missing_field": 1}
    assert "skipped 1 of 50 rows" in caplog.text and "line 7: missing field 'rejected'" in caplog.text


def test_bad_csv_row_is_reported_by_line(tmp_path, tok):
    rows = make_pairs(30)
    rows[4]["chosen"] = ""
    _, stats = load_pairs(write_csv(tmp_path / "d.csv", rows), tok)
    assert stats.bad_row_examples == ["line 6: 'chosen' is empty"]  # line 1 is the header


def test_empty_sources_are_errors(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UmmError, match="holds no rows"):
        load_pairs(str(tmp_path / "e.jsonl"), tok)
    (tmp_path / "e.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(UmmError, match="holds no rows"):
        load_pairs(str(tmp_path / "e.csv"), tok)
    (tmp_path / "bad.csv").write_text("prompt,chosen,rejected\nthe,good,good\n")
    with pytest.raises(UmmError, match="none of its 1 rows is a usable pair; first: line 2: chosen is identical"):
        load_pairs(str(tmp_path / "bad.csv"), tok, PairOptions(bad_row_threshold=1.0))


def test_missing_paths_and_hub_errors(tmp_path, tok, monkeypatch):
    import datasets

    with pytest.raises(UmmError, match=r"data not found: .*nope\.jsonl"):
        load_pairs(str(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UmmError, match=r"unsupported data file type \.txt"):
        load_pairs(str(tmp_path / "d.txt"), tok)

    calls = []

    def offline(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UmmError, match=r"could not load the dataset 'org/prefs'.*local \.jsonl"):
        load_pairs("org/prefs", tok, PairOptions(data_config="helpful", split="test"))
    assert calls == [("org/prefs", "helpful", "test")]

    rows = make_pairs(6)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: datasets.Dataset.from_list(rows))
    ds, stats = load_pairs("org/prefs", tok)
    assert len(ds) == 6 and stats.source == "org/prefs (split train)"


def test_hub_dataset_through_the_real_client(local_hub, tok):  # noqa: F811
    """A Hub id goes through datasets.load_dataset over HTTP (tests/hub_server.py); splits come from the repo."""
    train, test = make_pairs(12, seed=1), make_pairs(5, seed=2)
    local_hub.add_repo("org/prefs", {
        "data/train.jsonl": "".join(json.dumps(r) + "\n" for r in train).encode(),
        "data/test.jsonl": "".join(json.dumps(r) + "\n" for r in test).encode(),
    }, repo_type="dataset")
    data = load_preference_data("org/prefs", tok, DataOptions(eval_split="test"))
    assert list(data.train["prompt"]) == [r["prompt"] for r in train]
    assert list(data.eval["prompt"]) == [r["prompt"] for r in test]
    assert data.stats["eval"]["source"] == "org/prefs (split test)"
    with pytest.raises(UmmError, match=r"could not load the dataset 'org/missing'.*pass a local \.jsonl"):
        load_pairs("org/missing", tok)
    local_hub.offline()
    with pytest.raises(UmmError, match=r"could not load the dataset 'org/prefs2'.*without network access"):
        load_pairs("org/prefs2", tok)


# --- splits ----------------------------------------------------------------------------------------------


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", make_pairs(N))
    a = load_preference_data(path, tok, DataOptions(eval_fraction=0.25, seed=1))
    b = load_preference_data(path, tok, DataOptions(eval_fraction=0.25, seed=1))
    c = load_preference_data(path, tok, DataOptions(eval_fraction=0.25, seed=2))
    assert len(a.eval) == 10 and len(a.train) == 30
    assert a.eval["prompt"] == b.eval["prompt"] and a.train["prompt"] == b.train["prompt"]
    assert a.eval["prompt"] != c.eval["prompt"]
    key = list(zip(a.train["prompt"], a.train["chosen"], strict=True))
    held = list(zip(a.eval["prompt"], a.eval["chosen"], strict=True))
    assert not set(key) & set(held) and len(set(key) | set(held)) == N
    assert a.stats["train"]["held_out_for_eval"] == 10 and a.stats["eval_pairs"] == 10


def test_eval_data_file_and_split_rules(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", make_pairs(20, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", make_pairs(8, seed=2))
    data = load_preference_data(train, tok, DataOptions(eval_data=test))
    assert len(data.train) == 20 and len(data.eval) == 8 and data.stats["eval"]["rows_read"] == 8
    assert load_preference_data(train, tok).eval is None
    with pytest.raises(UmmError, match="local file and has no splits"):
        load_preference_data(train, tok, DataOptions(eval_split="test"))
    with pytest.raises(ValueError, match="not both"):
        DataOptions(eval_fraction=0.1, eval_data=test)


# --- batches and trl -------------------------------------------------------------------------------------


def test_iter_pair_batches_layout():
    data = [{"chosen_ids": [1, 2, 3], "rejected_ids": [4]}, {"chosen_ids": [5], "rejected_ids": [6, 7]},
            {"chosen_ids": [8, 9], "rejected_ids": [10]}]
    first, last = list(iter_pair_batches(data, 2, pad_token_id=0))
    assert first["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert last["input_ids"].tolist() == [[8, 9], [10, 0]]
    (left,) = iter_pair_batches(data[:2], 2, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 5], [0, 0, 4], [0, 6, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]


def test_reward_trainer_takes_the_dataset_without_retokenising(tmp_path, tok):
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    make_dense(tmp_path / "rm", tokenizer=False)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    rows = make_pairs(8)
    for i, r in enumerate(rows):
        r["subset"] = "ab"[i % 2]
    data = load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, DataOptions(eval_fraction=0.25))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = RewardConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-2, bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, dataset_num_proc=None,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                            processing_class=tok)
    # trl saw 'chosen_ids'/'rejected_ids' and used them as they are: no EOS added, nothing re-tokenised.
    assert trainer.train_dataset["chosen_ids"] == data.train["chosen_ids"]
    assert trainer.train_dataset["rejected_ids"] == data.train["rejected_ids"]
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "score.weight" in moved and len(moved) > 10
