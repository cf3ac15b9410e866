"""``umm collapse``: round trip to the dense source, the merge arithmetic, both expert layouts, refusals."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_dense

from umm_tools.collapse import PROVENANCE_FILE, CollapseOptions, collapse
from umm_tools.errors import UmmError
from umm_tools.merge_weights import PROJECTIONS, MergeWeights, expert_names
from umm_tools.upcycle import UpcycleOptions, upcycle

E = 3  # routed experts in every test MoE


def _dense_and_moe(root, model_type="llama", S=2, seed=0, **upcycle_kw):
    dense = root / f"dense-{model_type}"
    if not dense.exists():
        make_dense(dense, model_type, seed=seed)
    moe = root / f"moe-{model_type}-S{S}"
    if not moe.exists():
        upcycle(str(dense), moe, UpcycleOptions(num_experts=E, top_k=2, shared_experts=S, seed=seed, **upcycle_kw))
    return dense, moe


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("collapse")


@pytest.fixture(scope="module")
def llama(root):
    """A tiny dense Llama RM and its upcycled MoE (S=2, E=3)."""
    return _dense_and_moe(root, "llama", S=2)


def _random_weights(S, n_layers, seed=0, mode="learned"):
    g = torch.Generator().manual_seed(seed)
    K = S + E
    layers = {}
    for layer in range(n_layers):
        layers[layer] = {}
        for p in PROJECTIONS:
            x = -torch.rand(K, generator=g, dtype=torch.float64).log()  # Dirichlet(1): normalised exponentials
            layers[layer][p] = (x / x.sum()).tolist()
    return MergeWeights(experts=expert_names(S, E), layers=layers, mode=mode)


def _rewrite(moe, new, edit_tensors=None, edit_config=None):
    """Copy an MoE folder into one model.safetensors, with its tensors and config.json edited."""
    if new.exists():
        shutil.rmtree(new)
    shutil.copytree(moe, new, ignore=shutil.ignore_patterns("model*.safetensors*"))
    sd = {}
    index = moe / "model.safetensors.index.json"
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"
    ]:
        sd.update(load_file(moe / f))
    if edit_tensors:
        sd = edit_tensors(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, new / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((new / "config.json").read_text())
        edit_config(cfg)
        (new / "config.json").write_text(json.dumps(cfg))
    return new


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 7, 3)):  # right padding, three lengths
        mask[row, n:] = 0
    ids[mask == 0] = 0  # pad_token_id of the tiny configs
    return {"input_ids": ids, "attention_mask": mask}


def _load(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "model_type, S", [("llama", 1), ("llama", 2), ("mistral", 2), ("qwen2", 1), ("qwen2", 2)]
)
def test_round_trip_is_the_dense_model(root, model_type, S):
    dense, moe = _dense_and_moe(root, model_type, S=S)
    mw = _random_weights(S, 2, seed=S)
    wpath = mw.save(root / f"w-{model_type}-{S}.json")
    out = collapse(moe, wpath, root / f"out-{model_type}-{S}")

    want, got = load_file(dense / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name
    if model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in got

    a, b = _load(dense), _load(out)
    assert type(b) is type(a)
    assert {n: p.shape for n, p in b.named_parameters()} == {n: p.shape for n, p in a.named_parameters()}
    with torch.no_grad():
        ra, rb = a(**_batch()).logits, b(**_batch()).logits
    assert ra.shape == (3, 1)
    torch.testing.assert_close(rb, ra, atol=1e-5, rtol=0)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(a).__name__] and cfg["model_type"] == model_type and "umm" not in cfg
    assert (out / "tokenizer.json").is_file()
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    import hashlib

    assert prov["merge_weights"]["sha256"] == hashlib.sha256(wpath.read_bytes()).hexdigest()
    assert prov["merge_weights"]["mode"] == "learned" and prov["moe_dir"] == str(moe)
    assert set(prov["layers"]) == {"0", "1"} and set(prov["layers"]["0"]) == set(PROJECTIONS)
    assert len(prov["tensors"]["dropped"]) == 4  # 2 routers + 2 shared-expert gates


# --------------------------------------------------------------------------------- merge arithmetic
def _perturbed(llama, root, S=2, noise=0.05):
    """The llama MoE with every canonical expert moved by its own known noise: returns (folder, noise)."""
    _, moe = llama
    umm = json.loads((moe / "config.json").read_text())["umm"]
    I = umm["intermediate_size"]
    g = torch.Generator().manual_seed(7)
    noises = {}

    def edit(sd):
        for layer in range(2):
            pre = f"model.layers.{layer}.mlp"
            for k, name in enumerate(expert_names(S, E)):
                for p in PROJECTIONS:
                    shape = sd[f"{pre}.experts.0.{p}.weight"].shape
                    n = noise * torch.randn(shape, generator=g)
                    noises[(layer, p, k)] = n.double()
                    kind, idx = name.split(".")
                    idx = int(idx)
                    if kind == "routed":
                        scale = umm["routed_scale"] if p == "down_proj" else 1.0
                        sd[f"{pre}.experts.{idx}.{p}.weight"] = sd[f"{pre}.experts.{idx}.{p}.weight"] + scale * n
                    elif p == "down_proj":  # copy idx is columns idx·I:(idx+1)·I, scaled by shared_scale
                        t = sd[f"{pre}.shared_expert.{p}.weight"].clone()
                        t[:, idx * I:(idx + 1) * I] += umm["shared_scale"] * n
                        sd[f"{pre}.shared_expert.{p}.weight"] = t
                    else:  # copy idx is rows idx·I:(idx+1)·I
                        t = sd[f"{pre}.shared_expert.{p}.weight"].clone()
                        t[idx * I:(idx + 1) * I] += n
                        sd[f"{pre}.shared_expert.{p}.weight"] = t
        return sd

    return _rewrite(moe, root / "moe-perturbed", edit), noises


def _fused(sd):
    """Per-expert tensors -> the fused layout mergekit writes: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts"
        gate = [sd.pop(f"{pre}.{i}.gate_proj.weight") for i in range(E)]
        up = [sd.pop(f"{pre}.{i}.up_proj.weight") for i in range(E)]
        down = [sd.pop(f"{pre}.{i}.down_proj.weight") for i in range(E)]
        sd[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        sd[f"{pre}.down_proj"] = torch.stack(down)
    return sd


def test_merge_is_the_weighted_average_of_canonical_experts_in_both_layouts(llama, root):
    dense, _ = llama
    moe, noises = _perturbed(llama, root)
    fused = _rewrite(moe, root / "moe-perturbed-fused", _fused)
    mw = _random_weights(2, 2, seed=3)
    per_expert = load_file(collapse(moe, mw, root / "out-perturbed") / "model.safetensors")
    from_fused = load_file(collapse(fused, mw, root / "out-perturbed-fused") / "model.safetensors")
    base = load_file(dense / "model.safetensors")
    for layer in range(2):
        for p in PROJECTIONS:
            name = f"model.layers.{layer}.mlp.{p}.weight"
            w = mw.layers[str(layer)][p]
            want = base[name].double() + sum(w[k] * noises[(layer, p, k)] for k in range(2 + E))
            assert (per_expert[name].double() - want).abs().max().item() <= 1e-6, name
            assert (from_fused[name].double() - want).abs().max().item() <= 1e-6, name
    assert per_expert.keys() == from_fused.keys()
    for name in per_expert:
        assert torch.equal(per_expert[name], from_fused[name]), name


def test_fused_layout_is_transformers_in_memory_layout(llama):
    """Pins 'gate rows first, then up' to what transformers itself builds from the per-expert files."""
    _, moe = llama
    model = _load(moe)
    fused = _fused(load_file(moe / "model.safetensors"))
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj.detach(), fused["model.layers.1.mlp.experts.gate_up_proj"])
    assert torch.equal(experts.down_proj.detach(), fused["model.layers.1.mlp.experts.down_proj"])


def test_sharded_moe_to_bfloat16_in_small_shards(root):
    dense, _ = _dense_and_moe(root, "llama", S=1)
    moe = upcycle(str(dense), root / "moe-sharded", UpcycleOptions(num_experts=E, shared_experts=1,
                                                                   max_shard_size="40KB"))
    assert (moe / "model.safetensors.index.json").is_file()
    out = collapse(moe, MergeWeights.uniform(expert_names(1, E), 2), root / "out-bf16",
                   CollapseOptions(dtype="bfloat16", max_shard_size="20KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = _load(out)
    base = load_file(dense / "model.safetensors")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), base[name].bfloat16().float(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_folders_that_are_not_umm_moes(llama, root, tmp_path):
    _, moe = llama
    w = MergeWeights.uniform(expert_names(2, E), 2)
    only_weights = tmp_path / "only-weights"
    only_weights.mkdir()
    shutil.copy(moe / "model.safetensors", only_weights)
    with pytest.raises(UmmError, match=r"missing config\.json; found: model\.safetensors"):
        collapse(only_weights, w, tmp_path / "o")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(moe / "config.json", only_config)
    with pytest.raises(UmmError, match=r"missing weights .*; found: config\.json"):
        collapse(only_config, w, tmp_path / "o")
    with pytest.raises(UmmError, match="MoE folder not found"):
        collapse(tmp_path / "nowhere", w, tmp_path / "o")
    plain = _rewrite(moe, tmp_path / "plain", edit_config=lambda c: c.pop("umm"))
    with pytest.raises(UmmError, match="not a umm MoE: run umm upcycle first"):
        collapse(plain, w, tmp_path / "o")
    edited = _rewrite(moe, tmp_path / "edited", edit_config=lambda c: c["umm"].pop("shared_scale"))
    with pytest.raises(UmmError, match=r"umm\.shared_scale: Field required"):
        collapse(edited, w, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_refuses_weights_that_do_not_match_the_moe(llama, tmp_path):
    _, moe = llama
    with pytest.raises(UmmError, match=r"it has 4 experts .* the MoE has 2 shared and 3 routed"):
        collapse(moe, MergeWeights.uniform(expert_names(1, E), 2), tmp_path / "o")
    with pytest.raises(UmmError, match=r"weights for layers \[0, 1, 2\] .*not in the MoE: \[2\]"):
        collapse(moe, MergeWeights.uniform(expert_names(2, E), 3), tmp_path / "o")
    with pytest.raises(UmmError, match=r"missing: \[1\]"):
        collapse(moe, MergeWeights.uniform(expert_names(2, E), 1), tmp_path / "o")
    partial = MergeWeights.uniform(expert_names(2, E), 2)
    del partial.layers["1"]["down_proj"]
    with pytest.raises(UmmError, match=r"layers\.1 has no weights for down_proj"):
        collapse(moe, partial, tmp_path / "o")
    bad = tmp_path / "bad.json"
    data = MergeWeights.uniform(expert_names(2, E), 2).model_dump()
    data["layers"]["0"]["up_proj"][0] += 0.01
    bad.write_text(json.dumps(data))
    with pytest.raises(UmmError, match=r"layers\.0\.up_proj: weights sum to 1\.01"):
        collapse(moe, bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _add(tensors):
    def edit(sd):
        sd.update(tensors)
        return sd

    return edit


def test_attention_biases_the_source_cannot_hold(llama, tmp_path, caplog):
    _, moe = llama
    w = MergeWeights.uniform(expert_names(2, E), 2)
    biases = {f"model.layers.{lyr}.self_attn.{p}.bias": torch.zeros(n) for lyr in range(2)
              for p, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))}
    zero = _rewrite(moe, tmp_path / "zero-bias", _add(biases), lambda c: c.update(qkv_bias=True))
    with caplog.at_level(logging.INFO, logger="umm_tools.collapse"):
        out = collapse(zero, w, tmp_path / "o-zero")
    assert "dropping model.layers.0.self_attn.q_proj.bias" in caplog.text
    assert "model.layers.0.self_attn.q_proj.bias" not in load_file(out / "model.safetensors")
    assert "model.layers.1.self_attn.v_proj.bias" in json.loads((out / PROVENANCE_FILE).read_text())["tensors"][
        "dropped"]

    biases["model.layers.1.self_attn.k_proj.bias"] = torch.full((32,), 0.01)
    trained = _rewrite(moe, tmp_path / "trained-bias", _add(biases), lambda c: c.update(qkv_bias=True))
    with pytest.raises(UmmError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias is non-zero .*"
                                       r"LlamaForSequenceClassification has no q/k/v biases"):
        collapse(trained, w, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra",
    ["model.layers.0.mlp.experts.0.gate_proj.bias", "lm_head.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
     "model.layers.0.self_attn.o_proj.bias"],
)
def test_refuses_tensors_that_would_be_lost(llama, tmp_path, extra):
    _, moe = llama
    shape = (96, 64) if extra.endswith("proj.weight") else (128, 64) if extra.startswith("lm_head") else (64,)
    broken = _rewrite(moe, tmp_path / "extra", _add({extra: torch.ones(shape)}))
    with pytest.raises(UmmError, match=rf"have no place in LlamaForSequenceClassification .*{extra}"):
        collapse(broken, MergeWeights.uniform(expert_names(2, E), 2), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_refuses_incomplete_moe(llama, tmp_path):
    _, moe = llama
    w = MergeWeights.uniform(expert_names(2, E), 2)

    def drop(name):
        def edit(sd):
            del sd[name]
            return sd

        return edit

    gone = _rewrite(moe, tmp_path / "gone", drop("model.layers.1.mlp.experts.2.down_proj.weight"))
    with pytest.raises(UmmError, match=r"missing tensors of layer 1: model\.layers\.1\.mlp\.experts\.2\.down_proj"):
        collapse(gone, w, tmp_path / "o")
    no_norm = _rewrite(moe, tmp_path / "no-norm", drop("model.norm.weight"))
    with pytest.raises(UmmError, match=r"needs tensor\(s\) the MoE does not have: model\.norm\.weight"):
        collapse(no_norm, w, tmp_path / "o")

    def both_layouts(sd):
        fused = _fused(dict(sd))
        sd.update({k: v for k, v in fused.items() if k.startswith("model.layers.0.mlp.experts.")})
        return sd

    both = _rewrite(moe, tmp_path / "both", both_layouts)
    with pytest.raises(UmmError, match="layer 0 stores routed experts in both layouts"):
        collapse(both, w, tmp_path / "o")

    def wrong_width(sd):
        sd["model.layers.0.mlp.shared_expert.up_proj.weight"] = sd["model.layers.0.mlp.shared_expert.up_proj.weight"][
            :96]
        return sd

    narrow = _rewrite(moe, tmp_path / "narrow", wrong_width)
    with pytest.raises(UmmError, match=r"shared_expert\.up_proj\.weight has shape \(96, 64\), expected \(192, 64\)"):
        collapse(narrow, w, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- atomic output
def test_nothing_left_at_output_dir_after_a_failure(llama, tmp_path, monkeypatch):
    from umm_tools import tensorio

    _, moe = llama
    w = MergeWeights.uniform(expert_names(2, E), 2)
    real_write = tensorio.StreamingSafetensorsWriter.write
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 6:
            raise RuntimeError("disk full")
        real_write(self, name, tensor)

    monkeypatch.setattr(tensorio.StreamingSafetensorsWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        collapse(moe, w, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # an existing output survives a failed --overwrite untouched
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("old")
    with pytest.raises(UmmError, match="already exists"):
        collapse(moe, w, tmp_path / "o")
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        collapse(moe, w, tmp_path / "o", CollapseOptions(overwrite=True))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    monkeypatch.setattr(tensorio.StreamingSafetensorsWriter, "write", real_write)
    out = collapse(moe, w, tmp_path / "o", CollapseOptions(overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_shard_size"):
        CollapseOptions(max_shard_size="lots")
    with pytest.raises(ValueError, match="extra"):
        CollapseOptions(dtyp="float32")
