"""``umm push`` against the local Hub-compatible server: round trip, card, dry run, refusals, auth, retries."""
# ruff: noqa: F811  (test functions take the imported `local_hub` fixture as an argument)

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import huggingface_hub as hh
import pytest
from hub_server import local_hub  # noqa: F401
from tiny import make_dense

from umm_tools.errors import UmmError
from umm_tools.push import PushOptions, push

REPO = "org/tiny-rm"
SOURCE = "org/tiny-base"

PROVENANCE = {
    "stage": "collapse", "umm_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "source": SOURCE,
    "source_architecture": "LlamaForSequenceClassification", "moe_dir": "/nonexistent/moe",
    "moe_umm": {"version": "0.1.0", "source": SOURCE, "source_model_type": "llama",
                "source_architecture": "LlamaForSequenceClassification", "num_experts": 4, "top_k": 2,
                "shared_experts": 1, "shared_share": 0.5, "intermediate_size": 96, "routed_scale": 0.5,
                "shared_scale": 1.0, "router_init": "kmeans", "score_init": "source"},
    "merge_weights": {"path": "/home/someone/mw.json", "sha256": "ab" * 32, "mode": "learned",
                      "experts": ["shared.0", "routed.0", "routed.1", "routed.2", "routed.3"],
                      "meta": {"data": "org/prefs", "steps": 100}, "used": {}},
    "layers": {str(i): {p: {"top": "shared.0", "top_weight": 0.4, "shared": 0.4, "routed": 0.6}
                        for p in ("gate_proj", "up_proj", "down_proj")} for i in range(2)},
    "options": {"overwrite": False, "max_shard_size": "5GB", "dtype": "auto"},
    "tensors": {"merged": 6, "copied": 12, "dropped": []},
}
EVAL = {"model": "x", "data": "org/prefs-test", "split": "test", "n_pairs": 200, "accuracy": 0.71,
        "ci95": [0.64, 0.77], "wins": 142, "ties": 0, "losses": 58, "mean_margin": 0.3,
        "per_subset": {"chat": {"n_pairs": 100, "accuracy": 0.8, "ci95": [0.7, 0.87], "mean_margin": 0.4}}}
SUMMARY = {"gold_peak": 1.2, "gold_peak_step": 40, "gold_final": 0.9, "gold_drop": 0.3, "proxy_final": 2.5,
           "proxy_peak": 2.6, "kl_final": 4.1, "proxy_gold_spearman": 0.4, "steps": 100, "evaluations": 6}


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for rel, data in _tree(folder).items():
        h.update(rel.encode() + b"\0" + data)
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _temp_in_tmp_path(tmp_path, monkeypatch):
    """Dry runs write the card to a new temporary folder by default: keep those under the test's tmp_path."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _opts(**kw) -> PushOptions:
    kw.setdefault("retry_backoff", 0.01)
    return PushOptions(**kw)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny dense RM with a fake collapse provenance, an eval report and a PPO run beside it."""
    d = tmp_path_factory.mktemp("push") / "rm"
    make_dense(d)
    (d / "umm_provenance.json").write_text(json.dumps(PROVENANCE))
    (d / "eval.json").write_text(json.dumps(EVAL))
    (d / "ppo").mkdir()
    (d / "ppo" / "summary.json").write_text(json.dumps(SUMMARY))
    (d / "ppo" / "ppo_options.json").write_text(json.dumps(
        {"policy": "org/policy", "prompts": "/data/prompts.jsonl",
         "options": {"reward_model": str(d), "gold_model": "org/gold"}}))
    return d


@pytest.fixture(scope="module")
def moe_and_collapsed(tmp_path_factory):
    """A real umm MoE (upcycled from a tiny dense RM) and its collapse with uniform weights."""
    from umm_tools.collapse import collapse
    from umm_tools.merge_weights import MergeWeights, expert_names
    from umm_tools.upcycle import UpcycleOptions, upcycle

    root = tmp_path_factory.mktemp("push_moe")
    make_dense(root / "dense")
    moe = upcycle(str(root / "dense"), root / "moe", UpcycleOptions(num_experts=3, top_k=2, shared_experts=1))
    mw = MergeWeights.uniform(expert_names(1, 3), num_layers=2).save(root / "merge_weights.json")
    dense = collapse(moe, mw, root / "collapsed")
    return Path(moe), Path(dense)


def _scores(folder: Path) -> list[float]:
    from umm_tools.evaluate import load_reward_model, score_texts

    rm, tok = load_reward_model(str(folder), device="cpu")
    return score_texts(rm, tok, ["the cat runs fast", "a dog eats good food", "why not"]).tolist()


# ------------------------------------------------------------------------------------------ round trip
def test_push_round_trip(local_hub, rm_dir, tmp_path, capsys):
    local_hub.add_repo(SOURCE, {"README.md": b"---\nlicense: mit\n---\n# base\n", "config.json": b"{}"})
    before = _digest(rm_dir)
    result = push(rm_dir, REPO, _opts())
    assert _digest(rm_dir) == before  # the model folder is never written to

    sha = local_hub.refs(REPO)["main"]
    assert result.commit_oid == sha and result.commit_url == f"{local_hub.url}/{REPO}/commit/{sha}"
    assert result.pr_url is None and local_hub.commits(REPO)[-1].title == "Upload reward model with umm push"

    down = Path(hh.snapshot_download(REPO, local_dir=tmp_path / "down"))
    got, want = _tree(down), _tree(rm_dir)
    got = {k: v for k, v in got.items() if not k.startswith(".cache/")}
    assert set(got) == set(want) | {"README.md"}
    assert all(got[k] == want[k] for k in want)  # byte-identical, subfolders included
    assert got["README.md"].decode() == result.card_text
    assert sorted(p for p, _ in result.files) == sorted(got)
    assert _scores(down) == _scores(rm_dir)

    card = hh.ModelCard.load(REPO)
    data = card.data
    assert data.license == "mit"  # from the source model's card on the Hub
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert {"reward-model", "umm", "merge"} <= set(data.tags)
    assert data.base_model == SOURCE and data.base_model_relation == "merge"
    assert data.datasets == ["org/prefs"]  # training data only: the evaluation set is named in model-index
    results = {(r.dataset_name, r.metric_type): r for r in data.eval_results}
    assert results[("org/prefs-test", "accuracy")].metric_value == 0.71
    assert results[("org/prefs-test", "accuracy")].dataset_split == "test"
    assert results[("prompts.jsonl", "gold_reward_drop")].metric_value == 0.3
    assert results[("prompts.jsonl", "gold_reward_drop")].task_type == "reinforcement-learning"
    for text in ("## How it was made", "| routed experts E | 4 |", "| shared share c | 0.5 |", "kmeans",
                 "### Merge weights", "## Reward hacking (PPO)", "| chat | 100 | 0.8000", "this model",
                 "<local>/mw.json"):
        assert text in card.text, text
    assert "/home/someone" not in card.text and "/data/prompts" not in card.text  # local paths shortened

    # The card's usage snippet runs as written (against the downloaded folder).
    code = card.text.split("```python\n", 1)[1].split("\n```", 1)[0]
    exec(code.replace(f'"{REPO}"', repr(str(down))), {})
    assert "prefers chosen:" in capsys.readouterr().out


def test_dry_run_touches_no_network_and_lists_files(local_hub, rm_dir, tmp_path):
    local_hub.requests.clear()
    result = push(rm_dir, REPO, _opts(dry_run=True, card_output=str(tmp_path / "card" / "README.md")))
    assert local_hub.requests == []
    assert result.dry_run and result.commit_url is None
    assert result.card_path == tmp_path / "card" / "README.md"
    assert result.card_path.read_text() == result.card_text
    sizes = dict(result.files)
    assert sizes["README.md"] == len(result.card_text.encode())
    assert sizes["model.safetensors"] == (rm_dir / "model.safetensors").stat().st_size
    assert set(sizes) == set(_tree(rm_dir)) | {"README.md"}
    report = result.format()
    assert "dry run: nothing uploaded" in report and "ppo/summary.json" in report and "(model card)" in report
    # Default: the card goes to a fresh temporary folder, still without the network.
    again = push(rm_dir, REPO, _opts(dry_run=True, full_check_max_gb=0))  # meta-device check this time
    assert again.card_path.is_file() and again.card_path.parent.parent == tmp_path and local_hub.requests == []
    assert not (rm_dir / "README.md").exists()


def test_explicit_reports_and_wrong_kinds(local_hub, tmp_path):
    d = tmp_path / "plain"
    make_dense(d)
    (d / "metrics.json").write_text("{not json")  # found, unreadable: skipped with a warning
    (tmp_path / "my_eval.json").write_text(json.dumps({**EVAL, "data": "/x/held_out.jsonl", "split": None}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(SUMMARY))
    result = push(d, REPO, _opts(dry_run=True, eval_results=[str(tmp_path / "my_eval.json")],
                                 ppo_summary=[str(tmp_path / "run" / "summary.json")], license="apache-2.0",
                                 tags=["my-tag"]))
    card = hh.ModelCard(result.card_text)
    assert card.data.license == "apache-2.0" and "my-tag" in card.data.tags
    assert "umm" not in card.data.tags and card.data.base_model is None  # no provenance: a plain dense RM
    assert {r.dataset_name for r in card.data.eval_results} == {"held_out.jsonl", "ppo-prompts"}
    assert "No umm provenance" in card.text and "## How it was made" not in card.text
    with pytest.raises(UmmError, match="not an evaluation report"):
        push(d, REPO, _opts(dry_run=True, eval_results=[str(tmp_path / "run" / "summary.json")]))
    with pytest.raises(UmmError, match="not a PPO summary"):
        push(d, REPO, _opts(dry_run=True, ppo_summary=[str(tmp_path / "my_eval.json")]))
    with pytest.raises(UmmError, match="file not found"):
        push(d, REPO, _opts(dry_run=True, eval_results=[str(tmp_path / "missing.json")]))
    assert local_hub.requests == []


def test_real_collapse_provenance_in_card(local_hub, moe_and_collapsed):
    moe, dense = moe_and_collapsed
    text = push(dense, REPO, _opts(dry_run=True)).card_text
    card = hh.ModelCard(text)
    assert "merge" in card.data.tags and card.data.base_model is None  # the source was a local folder
    for fragment in ("| routed experts E | 3 |", "| shared experts S | 1 |", "`uniform` (plain average)",
                     "LlamaForSequenceClassification", "router init | random"):
        assert fragment in text, fragment


# ------------------------------------------------------------------------------------------ refusals
def test_moe_refused_unless_allowed(local_hub, moe_and_collapsed):
    moe, _ = moe_and_collapsed
    with pytest.raises(UmmError, match=r"umm collapse.*--allow-moe"):
        push(moe, REPO, _opts())
    result = push(moe, REPO, _opts(dry_run=True, allow_moe=True))
    card = hh.ModelCard(result.card_text)
    assert "mixture-of-experts" in card.data.tags and "not yet merged" in card.text
    assert "| routed experts E | 3 |" in card.text
    assert local_hub.requests == []


def test_num_labels_2_refused(local_hub, tmp_path):
    make_dense(tmp_path / "two", num_labels=2)
    with pytest.raises(UmmError, match="num_labels=2"):
        push(tmp_path / "two", REPO, _opts())
    assert local_hub.requests == []


@pytest.mark.parametrize("full_check_max_gb", [0.0, 10.0], ids=["headers", "full-load"])
def test_broken_folders_refused(local_hub, rm_dir, tmp_path, full_check_max_gb):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(rm_dir, d)
    sd = load_file(d / "model.safetensors")
    del sd["score.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UmmError, match="score.weight"):
        push(d, REPO, _opts(full_check_max_gb=full_check_max_gb))
    (d / "tokenizer.json").unlink()
    with pytest.raises(UmmError, match="missing a tokenizer"):
        push(d, REPO, _opts(full_check_max_gb=full_check_max_gb))
    with pytest.raises(UmmError, match="not a valid Hub repo id"):
        push(rm_dir, "bad//id", _opts())
    assert local_hub.requests == []


# ------------------------------------------------------------------------------------------ auth, network
def test_auth_errors_say_how_to_log_in(local_hub, rm_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UmmError, match=r"401.*hf auth login.*write access"):
        push(rm_dir, REPO, _opts(license="mit"))
    with pytest.raises(UmmError, match=r"403.*hf auth login"):
        push(rm_dir, REPO, _opts(license="mit", token="hf_wrong"))
    with pytest.raises(hh.errors.RepositoryNotFoundError):
        hh.model_info(REPO)
    assert "hf_wrong" not in repr(_opts(token="hf_wrong"))


def test_transient_failures_are_retried(local_hub, rm_dir, caplog):
    local_hub.fail_next(2, 503)
    with caplog.at_level(logging.WARNING, logger="umm_tools.push"):
        result = push(rm_dir, REPO, _opts(license="mit", private=True))
    assert result.commit_oid == local_hub.refs(REPO)["main"] and hh.model_info(REPO).private
    assert [p for m, p in local_hub.requests if m == "POST"].count("/api/repos/create") == 3
    assert sum("retrying" in r.message for r in caplog.records) == 2


def test_network_failure_is_reported(local_hub, rm_dir, monkeypatch):
    local_hub.fail_next(5, 503)
    with pytest.raises(UmmError, match=r"after 2 attempt\(s\): HTTP 503"):
        push(rm_dir, REPO, _opts(license="mit", max_attempts=2))
    local_hub.fail_next(0)
    with local_hub.offline(), pytest.raises(UmmError, match=r"after 3 attempt\(s\).*Could not reach the Hub"):
        push(rm_dir, REPO, _opts(license="mit"))
    with pytest.raises(hh.errors.RepositoryNotFoundError):
        hh.model_info(REPO)  # nothing was committed
    monkeypatch.setattr(hh.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UmmError, match="HF_HUB_OFFLINE is set"):
        push(rm_dir, REPO, _opts(license="mit"))


# ------------------------------------------------------------------------------------------ branches, PRs
def test_create_pr_and_revision_branch(local_hub, rm_dir):
    first = push(rm_dir, REPO, _opts(license="mit"))
    pr = push(rm_dir, REPO, _opts(license="apache-2.0", create_pr=True, commit_message="New card"))
    assert pr.pr_url == f"{local_hub.url}/{REPO}/discussions/1"
    refs = local_hub.refs(REPO)
    assert refs["main"] == first.commit_oid and refs["refs/pr/1"] == pr.commit_oid
    assert b"license: apache-2.0" in local_hub.files(REPO, revision="refs/pr/1")["README.md"]
    assert local_hub.commits(REPO)[-1].title == "New card"

    dev = push(rm_dir, REPO, _opts(license="mit", revision="dev"))
    assert local_hub.refs(REPO)["dev"] == dev.commit_oid and dev.revision == "dev"
    assert set(local_hub.files(REPO, revision="dev")) == {p for p, _ in dev.files}
    again = push(rm_dir, REPO, _opts(license="mit", revision="dev"))  # the branch exists now: no error
    assert again.commit_oid == dev.commit_oid  # nothing changed, so no new commit


def test_stale_weight_files_are_deleted(local_hub, rm_dir):
    local_hub.add_repo(REPO, {"model-00001-of-00002.safetensors": b"\0" * 8, "notes.txt": b"keep me"})
    result = push(rm_dir, REPO, _opts(license="mit"))
    files = local_hub.files(REPO)
    assert result.deleted == ["model-00001-of-00002.safetensors"]
    assert "model-00001-of-00002.safetensors" not in files and files["notes.txt"] == b"keep me"


def test_repo_name_without_namespace(local_hub, rm_dir):
    result = push(rm_dir, "tiny-solo", _opts(license="mit"))
    assert result.repo_id == "test-user/tiny-solo"  # the user's namespace, as the Hub resolves it
    card = local_hub.files(result.repo_id)["README.md"].decode()
    assert card == result.card_text and 'from_pretrained("test-user/tiny-solo")' in card
