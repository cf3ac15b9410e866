"""umm upcycle: exactness, streaming output format, refusals, Hub ids through a real HTTP client."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from umm_tools.cli import app
from umm_tools.errors import UmmError
from umm_tools.upcycle import UpcycleOptions, upcycle

runner = CliRunner()


def _batch(folder: str):
    """Padded batch of real-length texts (length up to ~120 tokens, heavy padding on the short ones)."""
    tok = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(1)
    texts = [tiny.random_text(rng, 60, 120), tiny.random_text(rng, 2, 5), tiny.random_text(rng, 20, 40)]
    return tok(texts, padding=True, return_tensors="pt")


def _reference_rewards(src: str, moe: str, head: str, batch) -> torch.Tensor:
    """The dense source's rewards; for a CausalLM source, its backbone with the score head umm created."""
    from safetensors import safe_open

    dense = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, pad_token_id=0)
    if head == "causal":
        from umm_tools.upcycle import SourceWeights

        score = SourceWeights(Path(moe)).get("score.weight")
        dense.score.weight.data.copy_(score)
    else:
        with safe_open(str(Path(src) / "model.safetensors"), "pt") as f:
            assert torch.equal(dense.score.weight.data, f.get_tensor("score.weight"))
    dense.eval()
    with torch.no_grad():
        return dense(**batch).logits


def _moe_rewards(moe: str, batch) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(moe).eval()
    assert type(model).__name__ == "Qwen2MoeForSequenceClassification"
    with torch.no_grad():
        return model(**batch).logits


CASES = [
    # (model_type, head, S, k, router_init, overrides)
    ("llama", "seqcls", 1, 2, "random", {}),
    ("llama", "seqcls", 2, 1, "kmeans", {}),
    ("llama", "causal", 1, 1, "random", {}),
    ("llama", "causal", 2, 2, "kmeans", {}),
    ("mistral", "seqcls", 1, 2, "kmeans", {"sliding_window": 16}),
    ("mistral", "causal", 2, 1, "random", {"sliding_window": None}),
    ("qwen2", "seqcls", 2, 2, "random", {}),
    ("qwen2", "causal", 1, 1, "kmeans", {}),
    # Llama-3 style: grouped-query attention, llama3 rope scaling, tied embeddings, explicit head_dim.
    ("llama", "causal", 1, 2, "random", {
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
]


@pytest.mark.parametrize("model_type,head,S,k,router_init,overrides", CASES,
                         ids=[f"{c[0]}-{c[1]}-S{c[2]}-k{c[3]}-{c[4]}{'-llama3' if 'rope_parameters' in c[5] else ''}"
                              for c in CASES])
def test_upcycle_is_function_preserving(dense_models, tmp_path, model_type, head, S, k, router_init, overrides):
    src = dense_models(model_type, head, **overrides)
    prompts = tmp_path / "prompts.txt"
    rng = random.Random(0)
    prompts.write_text("\n".join(tiny.random_text(rng, 5, 30) for _ in range(40)))
    out = upcycle(src, tmp_path / "moe", UpcycleOptions(num_experts=4, top_k=k, shared_experts=S,
                                                          router_init=router_init, router_data=str(prompts)))
    batch = _batch(str(out))
    ref = _reference_rewards(src, str(out), head, batch)
    got = _moe_rewards(str(out), batch)
    assert (ref - got).abs().max().item() <= 1e-4
    # The router is not degenerate: tokens really go to different experts (so symmetry can break in training).
    gate = AutoModelForSequenceClassification.from_pretrained(out).model.layers[0].mlp.gate.weight
    assert gate.abs().sum() > 0 and not torch.allclose(gate[0], gate[1])


def test_output_format_and_metadata(dense_models, tmp_path):
    src = dense_models("llama", "seqcls")
    out = upcycle(src, tmp_path / "moe", UpcycleOptions(num_experts=3, top_k=2, shared_experts=2, shared_share=0.3,
                                                          max_shard_size="60KB"))
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert {"tokenizer.json", "tokenizer_config.json", "umm_upcycle.json", "config.json"} <= set(files)
    assert not list(tmp_path.glob(".moe*")), "temporary folder left behind"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForSequenceClassification"]
    assert cfg["qkv_bias"] is False  # a Llama source has no q/k/v biases: nothing untrainable-back is created
    umm = cfg["umm"]
    assert umm["source_architecture"] == "LlamaForSequenceClassification"
    assert (umm["num_experts"], umm["top_k"], umm["shared_experts"]) == (3, 2, 2)
    assert umm["routed_scale"] == pytest.approx(0.7) and umm["shared_scale"] == pytest.approx(0.3)
    assert umm["source_config"]["model_type"] == "llama"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("_proj.bias") for n in names)
    assert model.model.layers[1].mlp.shared_expert.down_proj.weight.shape == (64, 2 * 96)


def test_dtype_option_and_noise(dense_models, tmp_path):
    src = dense_models("llama", "seqcls")
    out = upcycle(src, tmp_path / "bf16", UpcycleOptions(dtype="bfloat16"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    noisy = upcycle(src, tmp_path / "noisy", UpcycleOptions(expert_noise=0.05, seed=3))
    m = AutoModelForSequenceClassification.from_pretrained(noisy).model.layers[0].mlp.experts.gate_up_proj
    assert not torch.allclose(m[0], m[1])  # experts differ once noise is on


def test_streaming_never_instantiates_the_model(dense_models, tmp_path, monkeypatch):
    """random router init: no transformers model class is ever built."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("model instantiated")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", boom)
    upcycle(dense_models("qwen2", "seqcls"), tmp_path / "moe", UpcycleOptions())


# ------------------------------------------------------------------------------------------------- refusals


def _cli(*args: str):
    return runner.invoke(app, list(args))


def test_refuses_existing_output_and_overwrite_works(dense_models, tmp_path):
    src = dense_models()
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = _cli("upcycle", src, str(out))
    assert r.exit_code == 1 and "already exists" in r.output and "--overwrite" in r.output
    assert (out / "keep.txt").exists()
    r = _cli("upcycle", src, str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--top-k", "5", "--num-experts", "4"], "top_k=5 is larger than num_experts=4"),
    (["--shared-share", "1.0"], "outside (0, 1)"),
    (["--shared-share", "0"], "outside (0, 1)"),
    (["--router-init", "kmeans"], "needs --router-data"),
])
def test_option_refusals(dense_models, tmp_path, args, message):
    r = _cli("upcycle", dense_models(), str(tmp_path / "out"), *args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_bad_option_values_exit_2(dense_models, tmp_path):
    r = _cli("upcycle", dense_models(), str(tmp_path / "o"), "--num-experts", "many")
    assert r.exit_code == 2 and "--num-experts" in r.output
    r = _cli("upcycle", dense_models(), str(tmp_path / "o"), "--dtype", "float8")
    assert r.exit_code == 2 and "--dtype" in r.output
    r = _cli("upcycle", dense_models(), str(tmp_path / "o"), "--num-experts", "0")
    assert r.exit_code == 2 and "num_experts" in r.output


def test_recipe_typo_exits_2_naming_the_field(dense_models, tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("upcycle:\n  num_expert: 8\n  top_k: 2\n")
    r = _cli("upcycle", dense_models(), str(tmp_path / "o"), "--config", str(cfg))
    assert r.exit_code == 2
    assert "num_expert: unknown option" in r.output and str(cfg) in r.output
    # --set with a typo too
    r = _cli("upcycle", dense_models(), str(tmp_path / "o"), "--set", "shared_shar=0.3")
    assert r.exit_code == 2 and "shared_shar" in r.output


def test_config_file_and_set_overrides(dense_models, tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("upcycle:\n  num_experts: 3\n  top_k: 1\n")
    r = _cli("upcycle", dense_models(), str(tmp_path / "o"), "--config", str(cfg), "--set", "top_k=2",
             "--shared-experts", "2")
    assert r.exit_code == 0, r.output
    umm = json.loads((tmp_path / "o" / "config.json").read_text())["umm"]
    assert (umm["num_experts"], umm["top_k"], umm["shared_experts"]) == (3, 2, 2)


@pytest.mark.parametrize("overrides,message", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
])
def test_refuses_biases_it_cannot_hold(tmp_path, overrides, message):
    src = tmp_path / "src"
    tiny.make_dense(src, "llama", "seqcls", **overrides)
    r = _cli("upcycle", str(src), str(tmp_path / "out"))
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_refuses_unsupported_model_type_and_num_labels(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, num_labels=1,
                                             pad_token_id=0)).save_pretrained(tmp_path / "gpt2")
    r = _cli("upcycle", str(tmp_path / "gpt2"), str(tmp_path / "out"))
    assert r.exit_code == 1 and "'gpt2' is not supported" in r.output and "llama, mistral, qwen2" in r.output
    tiny.make_dense(tmp_path / "two", "llama", "seqcls", num_labels=2)
    r = _cli("upcycle", str(tmp_path / "two"), str(tmp_path / "out"))
    assert r.exit_code == 1 and "num_labels=2" in r.output


def test_refuses_missing_and_corrupt_weights(dense_models, tmp_path):
    # Sharded source with one shard missing.
    src = tmp_path / "sharded"
    tiny.make_dense(src, "llama", "seqcls")
    from transformers import AutoModelForSequenceClassification as Auto

    Auto.from_pretrained(src).save_pretrained(src, max_shard_size="40KB")
    (src / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    r = _cli("upcycle", str(src), str(tmp_path / "out"))
    assert r.exit_code == 1 and shards[1].name in r.output and "missing" in r.output
    # Corrupt single file.
    bad = tmp_path / "corrupt"
    shutil.copytree(dense_models(), bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = _cli("upcycle", str(bad), str(tmp_path / "out"))
    assert r.exit_code == 1 and "model.safetensors is corrupt" in r.output
    # No weights at all.
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(Path(dense_models()) / "config.json", empty / "config.json")
    r = _cli("upcycle", str(empty), str(tmp_path / "out"))
    assert r.exit_code == 1 and "no weights found" in r.output
    assert not (tmp_path / "out").exists()


def test_mistral_sliding_window_is_carried_over(dense_models, tmp_path):
    out = upcycle(dense_models("mistral", "seqcls", sliding_window=16), tmp_path / "moe", UpcycleOptions())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["use_sliding_window"] is True and cfg["sliding_window"] == 16
    assert set(cfg["layer_types"]) == {"sliding_attention"}


def test_interrupt_leaves_nothing(dense_models, tmp_path, monkeypatch):
    import umm_tools.tensorio as tio

    calls = {"n": 0}
    real = tio.StreamingSafetensorsWriter.write

    def flaky(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, tensor)

    monkeypatch.setattr(tio.StreamingSafetensorsWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        upcycle(dense_models(), tmp_path / "out", UpcycleOptions())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- Hub ids


def test_upcycle_from_hub_id(local_hub, dense_models, tmp_path):
    src = dense_models("llama", "seqcls")
    local_hub.add_repo("org/tiny-llama", Path(src))
    (extra := tmp_path / "extra").mkdir()
    r = _cli("upcycle", "org/tiny-llama", str(tmp_path / "moe"))
    assert r.exit_code == 0, r.output
    batch = _batch(str(tmp_path / "moe"))
    ref = _reference_rewards(src, str(tmp_path / "moe"), "seqcls", batch)
    assert (ref - _moe_rewards(str(tmp_path / "moe"), batch)).abs().max().item() <= 1e-4
    gets = [p for m, p in local_hub.requests if m == "GET" and "/resolve/" in p]
    assert any(p.endswith("model.safetensors") for p in gets)
    assert extra.exists()


def test_hub_errors(local_hub, dense_models, tmp_path):
    local_hub.add_repo("org/tiny-llama", Path(dense_models()))
    r = _cli("upcycle", "org/nope", str(tmp_path / "o"))
    assert r.exit_code == 1 and "repository not found" in r.output and "local folder" in r.output
    r = _cli("upcycle", "org/tiny-llama", str(tmp_path / "o"), "--revision", "v9")
    assert r.exit_code == 1 and "revision 'v9' not found" in r.output
    assert "Traceback" not in r.output


def test_hub_unreachable(dense_models, tmp_path, monkeypatch):
    import socket

    from hub_server import configure_hf_client

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    configure_hf_client(monkeypatch, f"http://127.0.0.1:{port}", None, tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UmmError, match="cannot reach the Hub"):
        upcycle("org/tiny-llama", tmp_path / "o")


def test_unknown_local_path(tmp_path):
    r = _cli("upcycle", str(tmp_path / "missing"), str(tmp_path / "o"))
    assert r.exit_code == 1 and "no such folder" in r.output
