"""The LocalHub test server, exercised through the real huggingface_hub client over HTTP."""
# ruff: noqa: F811  (test functions take the imported `local_hub` fixture as an argument)

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub as hh
import pytest
from hub_server import LocalHub, git_blob_oid, local_hub  # noqa: F401  (the fixture, also fine via conftest)
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "org/tiny-llama"


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (path / "model.safetensors").write_bytes(os.urandom(1_500_000))  # > 1 MB, LFS
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "notes.txt").write_text("nested file\n")
    return path


def _read_tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fixture_points_the_client_at_the_server(local_hub, tmp_path):
    assert constants.ENDPOINT == local_hub.url == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_DISABLE_XET and os.environ["HF_HUB_DISABLE_XET"] == "1"
    assert constants.HF_HUB_CACHE.startswith(os.environ["HF_HOME"])
    assert "HF_HUB_OFFLINE" not in os.environ and not constants.HF_HUB_OFFLINE
    assert hh.whoami()["name"] == local_hub.user
    # A subprocess inherits the environment and talks to the same server with a fresh cache.
    local_hub.add_repo(REPO, {"config.json": b"{}"})
    code = ("from huggingface_hub import hf_hub_download, constants; import sys; "
            "p = hf_hub_download('org/tiny-llama', 'config.json'); "
            "assert p.startswith(constants.HF_HUB_CACHE), p; print(open(p).read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{}"


def test_snapshot_download_and_allow_patterns(local_hub, tmp_path):
    folder = _model_folder(tmp_path / "src")
    sha = local_hub.add_repo(REPO, folder)
    info = hh.model_info(REPO)
    assert info.sha == sha
    assert {s.rfilename for s in info.siblings} == set(_read_tree(folder))
    lfs = {s.rfilename: s.lfs for s in hh.model_info(REPO, files_metadata=True).siblings}
    assert lfs["model.safetensors"] is not None and lfs["config.json"] is None
    assert sorted(hh.list_repo_files(REPO)) == sorted(_read_tree(folder))

    local_hub.requests.clear()
    path = hh.snapshot_download(REPO, allow_patterns=["*.json"])
    assert set(_read_tree(path)) == {"config.json", "tokenizer.json"}
    fetched = {p for m, p in local_hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {f"/{REPO}/resolve/{sha}/config.json", f"/{REPO}/resolve/{sha}/tokenizer.json"}

    full = hh.snapshot_download(REPO)
    assert _read_tree(full) == _read_tree(folder) == local_hub.files(REPO)
    # Cached now: a second hf_hub_download by sha needs no request at all.
    local_hub.requests.clear()
    hh.hf_hub_download(REPO, "config.json", revision=sha)
    assert local_hub.requests == []


def test_hf_hub_download_resumes_with_range(local_hub, tmp_path):
    data = os.urandom(300_000)
    local_hub.add_repo(REPO, {"model.safetensors": data})
    meta = hh.get_hf_file_metadata(hh.hf_hub_url(REPO, "model.safetensors"))
    import hashlib

    assert meta.etag == hashlib.sha256(data).hexdigest() and meta.size == len(data)
    with open(tmp_path / "part", "wb") as f:
        hh.file_download.http_get(hh.hf_hub_url(REPO, "model.safetensors"), f, resume_size=1000)
    assert (tmp_path / "part").read_bytes() == data[1000:]


def test_revisions_by_branch_and_sha(local_hub):
    v1 = local_hub.add_repo(REPO, {"config.json": b'{"v": 1}'})
    v2 = local_hub.add_repo(REPO, {"config.json": b'{"v": 2}'})
    dev = local_hub.add_repo(REPO, {"config.json": b'{"v": "dev"}', "extra.txt": b"x"}, revision="dev")
    assert len({v1, v2, dev}) == 3 and all(len(s) == 40 for s in (v1, v2, dev))
    read = lambda rev: Path(hh.hf_hub_download(REPO, "config.json", revision=rev)).read_bytes()  # noqa: E731
    assert read(None) == b'{"v": 2}'
    assert read(v1) == b'{"v": 1}'
    assert read("dev") == b'{"v": "dev"}'
    assert _read_tree(hh.snapshot_download(REPO, revision=v1)) == {"config.json": b'{"v": 1}'}
    assert hh.model_info(REPO, revision="dev").sha == dev
    refs = hh.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2, "dev": dev}
    assert [c.commit_id for c in hh.list_repo_commits(REPO)][:2] == [v2, v1]
    assert local_hub.files(REPO, revision=v1) == {"config.json": b'{"v": 1}'}


def test_not_found_errors(local_hub):
    local_hub.add_repo(REPO, {"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        hh.hf_hub_download("org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        hh.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hh.snapshot_download("org/missing")
    with pytest.raises(RevisionNotFoundError):
        hh.hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hh.snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):  # RemoteEntryNotFoundError is a subclass
        hh.hf_hub_download(REPO, "missing.json")
    assert not hh.file_exists(REPO, "missing.json") and hh.file_exists(REPO, "config.json")
    assert not hh.repo_exists("org/missing") and hh.repo_exists(REPO)


def test_push_then_snapshot_is_byte_identical(local_hub, tmp_path):
    folder = _model_folder(tmp_path / "out")
    url = hh.create_repo("org/pushed")
    assert url.repo_id == "org/pushed"
    hh.create_repo("org/pushed", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        hh.create_repo("org/pushed")
    assert err.value.response.status_code == 409

    local_hub.requests.clear()
    info = hh.upload_folder(repo_id="org/pushed", folder_path=folder, commit_message="push")
    assert info.oid == local_hub.refs("org/pushed")["main"]
    assert info.commit_url == f"{local_hub.url}/org/pushed/commit/{info.oid}"
    methods = [(m, p) for m, p in local_hub.requests]
    assert ("POST", "/org/pushed.git/info/lfs/objects/batch") in methods  # the safetensors went through LFS
    assert sum(m == "PUT" for m, _ in methods) == 1  # only the big file, small ones inline
    assert local_hub.commits("org/pushed")[-1].title == "push"

    # Fresh cache, then download: identical bytes.
    assert _read_tree(hh.snapshot_download("org/pushed", cache_dir=tmp_path / "fresh")) == _read_tree(folder)

    # upload_file of an unchanged file is a no-op (preupload reports the remote oid); a changed one commits.
    n = len(local_hub.commits("org/pushed"))
    hh.upload_file(path_or_fileobj=folder / "config.json", path_in_repo="config.json", repo_id="org/pushed")
    assert len(local_hub.commits("org/pushed")) == n
    hh.upload_file(path_or_fileobj=b"new", path_in_repo="config.json", repo_id="org/pushed")
    assert local_hub.files("org/pushed")["config.json"] == b"new"
    hh.delete_file("sub/notes.txt", repo_id="org/pushed")
    assert "sub/notes.txt" not in local_hub.files("org/pushed")


def test_create_pr_branch_and_parent_commit(local_hub):
    hh.create_repo("org/pr")
    base = hh.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="org/pr").oid
    pr = hh.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id="org/pr", create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert pr.pr_url == f"{local_hub.url}/org/pr/discussions/1"
    assert local_hub.refs("org/pr") == {"main": base, "refs/pr/1": pr.oid}
    assert set(local_hub.files("org/pr", revision="refs/pr/1")) == {"a.txt", "b.txt"}
    assert Path(hh.hf_hub_download("org/pr", "b.txt", revision="refs/pr/1")).read_bytes() == b"b"
    with pytest.raises(RevisionNotFoundError):
        hh.hf_hub_download("org/pr", "b.txt", revision="refs/pr/2")

    hh.create_branch("org/pr", branch="dev")
    hh.upload_file(path_or_fileobj=b"c", path_in_repo="c.txt", repo_id="org/pr", revision="dev")
    assert set(local_hub.files("org/pr", revision="dev")) == {"a.txt", "c.txt"}
    with pytest.raises(HfHubHTTPError) as err:  # stale parent commit
        hh.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id="org/pr", parent_commit="0" * 40)
    assert err.value.response.status_code == 412


def test_model_card_push_and_load(local_hub):
    hh.create_repo("org/card")
    card = hh.ModelCard("---\nlicense: mit\ntags:\n- reward-model\n---\n# Tiny RM\n")
    card.push_to_hub("org/card")
    loaded = hh.ModelCard.load("org/card")
    assert loaded.data.license == "mit" and "# Tiny RM" in loaded.text
    hh.metadata_update("org/card", {"pipeline_tag": "text-classification"})
    assert b"pipeline_tag: text-classification" in local_hub.files("org/card")["README.md"]
    with pytest.raises(ValueError, match="Invalid metadata"):  # the client validates README.md server-side
        hh.upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\ntext\n", path_in_repo="README.md",
                       repo_id="org/card")


def test_auth_errors(local_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as err:
        hh.create_repo("org/nope")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        hh.create_repo("org/nope", token="hf_wrong")
    assert err.value.response.status_code == 403
    local_hub.add_repo(REPO, {"a.txt": b"a"})
    with pytest.raises(HfHubHTTPError) as err:
        hh.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, token="hf_wrong")
    assert err.value.response.status_code == 403
    assert "a.txt" in hh.list_repo_files(REPO)  # public reads need no token


def test_private_repo(local_hub, monkeypatch, tmp_path):
    hh.create_repo("org/secret", private=True)
    hh.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="org/secret")
    assert Path(hh.hf_hub_download("org/secret", "s.txt")).read_bytes() == b"s"
    assert hh.model_info("org/secret").private
    monkeypatch.delenv("HF_TOKEN")
    for token in (None, "hf_wrong"):
        with pytest.raises(RepositoryNotFoundError):
            hh.model_info("org/secret", token=token)
        with pytest.raises(RepositoryNotFoundError):
            hh.hf_hub_download("org/secret", "s.txt", token=token, cache_dir=tmp_path / "empty_cache")


def test_gated_repo(local_hub, monkeypatch, tmp_path):
    local_hub.add_repo("org/gated", {"w.safetensors": b"\0" * 10}, gated=True)
    assert Path(hh.hf_hub_download("org/gated", "w.safetensors")).read_bytes() == b"\0" * 10
    monkeypatch.delenv("HF_TOKEN")
    assert hh.model_info("org/gated").gated == "auto"  # metadata stays public
    with pytest.raises(GatedRepoError):
        hh.hf_hub_download("org/gated", "w.safetensors", cache_dir=tmp_path / "empty_cache")


def test_retries_after_transient_failures(local_hub):
    local_hub.add_repo(REPO, {"config.json": b"{}"})
    # hf_hub_download: the HEAD fails (503), then is retried with backoff (503 once more), then succeeds.
    local_hub.fail_next(2, 503)
    assert Path(hh.hf_hub_download(REPO, "config.json")).read_bytes() == b"{}"
    assert [m for m, _ in local_hub.requests[-4:]] == ["HEAD", "HEAD", "HEAD", "GET"]
    # model_info does not retry: the 503 surfaces as an HfHubHTTPError.
    local_hub.fail_next(1, 503)
    with pytest.raises(HfHubHTTPError) as err:
        hh.model_info(REPO)
    assert err.value.response.status_code == 503


def test_offline_falls_back_to_cache(local_hub):
    local_hub.add_repo(REPO, {"config.json": b"{}"})
    path = hh.hf_hub_download(REPO, "config.json")
    with local_hub.offline():
        assert hh.hf_hub_download(REPO, "config.json") == path
        assert hh.snapshot_download(REPO) == str(Path(path).parent)
    assert hh.model_info(REPO).sha  # serving again on the same port


def test_standalone_context_manager(tmp_path):
    with LocalHub(tmp_path, token=None) as hub:
        sha = hub.add_repo("solo", {"f.bin": b"\0\1", "t.txt": b"t"}, repo_type="dataset")
        api = hh.HfApi(endpoint=hub.url, token=False)
        assert api.dataset_info("solo").sha == sha
        tree = {f.path: f for f in api.list_repo_tree("solo", repo_type="dataset")}
        assert tree["f.bin"].lfs is not None and tree["t.txt"].blob_id == git_blob_oid(b"t")
        url = hh.hf_hub_url("solo", "t.txt", repo_type="dataset", endpoint=hub.url)
        assert hh.get_hf_file_metadata(url, token=False).commit_hash == sha
