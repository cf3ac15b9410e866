"""The mergekit extension: ``umm_learned`` registered on import, its lookup, and mergekit YAMLs that use it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_dense

from umm_tools import merge_method
from umm_tools.errors import UmmError
from umm_tools.merge_method import (
    METHOD_NAME,
    mergekit_yaml_main,
    run_mergekit_yaml,
    weighted_average,
    write_mergekit_yaml,
)
from umm_tools.merge_weights import MergeWeights, load_merge_weights


@pytest.fixture(scope="module")
def dense3(tmp_path_factory):
    """Three tiny dense Llama RMs (seeds 0, 1, 2) and their tensors."""
    root = tmp_path_factory.mktemp("dense3")
    paths = []
    for seed in range(3):
        make_dense(root / f"rm{seed}", "llama", seed=seed)
        paths.append(root / f"rm{seed}")
    return paths, [load_file(p / "model.safetensors") for p in paths]


def _expected(sds, weight_of):
    """Hand-computed Σ_k w_k T_k for every tensor, in float64; ``weight_of(name)`` gives the 3 weights."""
    return {n: sum(w * sd[n].double() for w, sd in zip(weight_of(n), sds, strict=True)) for n in sds[0]}


def _assert_close(out_dir, expected):
    got = load_file(out_dir / "model.safetensors")
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == torch.float32, name
        assert (got[name].double() - want).abs().max().item() <= 1e-6, name


# ------------------------------------------------------------------------------------------ registry
def test_import_umm_tools_leaves_mergekit_alone_and_import_registers():
    code = textwrap.dedent("""
        import sys
        import umm_tools
        assert "mergekit" not in sys.modules, "import umm_tools imported mergekit"
        from mergekit import merge_methods
        assert "umm_learned" not in {m.spec.name for m in merge_methods.registered_methods()}
        import umm_tools.merge_method
        assert merge_methods.get("umm_learned") is umm_tools.merge_method.METHOD
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_registering_twice_is_harmless():
    from mergekit import merge_methods

    assert merge_method.register() is merge_methods.get(METHOD_NAME)
    importlib.reload(merge_method)  # runs register() again at import
    assert merge_methods.get(METHOD_NAME) is merge_method.register()
    assert [m.spec.name for m in merge_methods.registered_methods()].count(METHOD_NAME) == 1


# ------------------------------------------------------------------------------------------- lookup
def test_lookup_precedence():
    mw = MergeWeights(
        experts=["a", "b"],
        layers={0: {"gate_proj": [1, 0], "mlp": [0.9, 0.1], "*": [0.8, 0.2]}, "1": {"self_attn": [0.7, 0.3]}},
        tensors={"model.layers.0.mlp.up_proj.weight": [0.6, 0.4], "model.layers.0.mlp.*": [0.5, 0.5]},
        default=[0.25, 0.75],
    )
    exact = "model.layers.0.mlp.up_proj.weight"
    assert mw.lookup(exact) == ([0.6, 0.4], f"tensors[{exact!r}]")
    assert mw.lookup("model.layers.0.mlp.gate_proj.weight")[1] == "tensors['model.layers.0.mlp.*']"
    assert mw.lookup("model.layers.0.input_layernorm.weight")[0] == [0.8, 0.2]
    assert mw.lookup("model.layers.1.self_attn.q_proj.weight")[0] == [0.7, 0.3]
    assert mw.lookup("model.layers.1.mlp.up_proj.weight")[0] == [0.25, 0.75]
    assert mw.lookup("model.layers.12.mlp.up_proj.weight")[1] == "default"
    assert mw.lookup("model.norm.weight", allow_default=False) is None
    no_default = MergeWeights(experts=["a", "b"], layers={0: {"gate_proj": [1, 0], "mlp": [0.9, 0.1]}})
    # the longest key naming a dotted part wins
    assert no_default.lookup("model.layers.0.mlp.gate_proj.weight")[0] == [1, 0]
    with pytest.raises(UmmError, match="no weights for tensor 'score.weight'"):
        no_default.weights_for("score.weight")
    assert MergeWeights(experts=["a", "b"], default="uniform").weights_for("x") == [0.5, 0.5]


@pytest.mark.parametrize(
    "layers, message",
    [
        ({"0": {"gate_proj": [0.5, 0.4]}}, r"layers\.0\.gate_proj: weights sum to 0\.9"),
        ({"0": {"down_proj": [1.5, -0.5]}}, r"layers\.0\.down_proj: weight -0\.5 is negative"),
        ({"1": {"up_proj": [1.0]}}, r"layers\.1\.up_proj: expected 2 weights"),
        ({"x": {"up_proj": [1.0, 0.0]}}, r"'x' is not a layer index"),
    ],
)
def test_bad_weights_file_names_layer_and_projection(tmp_path, layers, message):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"format": "umm-merge-weights/1", "experts": ["a", "b"], "layers": layers}))
    with pytest.raises(UmmError, match=message) as e:
        load_merge_weights(path)
    assert str(path) in str(e.value)


def test_weights_file_format_and_missing(tmp_path):
    with pytest.raises(UmmError, match="merge weights file not found"):
        load_merge_weights(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text(json.dumps({"experts": ["a"]}))
    with pytest.raises(UmmError, match="not a umm merge weights file"):
        load_merge_weights(tmp_path / "other.json")


def test_sum_within_tolerance_is_accepted():
    MergeWeights(experts=["a", "b"], layers={0: {"*": [0.5 + 4e-6, 0.5]}})
    with pytest.raises(ValueError, match="must sum to 1"):
        MergeWeights(experts=["a", "b"], layers={0: {"*": [0.5 + 2e-5, 0.5]}})


# ------------------------------------------------------------------------------------ in-memory use
def test_weighted_average_streams_and_skips_zero_weights():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)

    def lazy():
        yield a
        yield None  # weight 0: never loaded
        yield b

    out = weighted_average(lazy(), [0.25, 0.0, 0.75])
    torch.testing.assert_close(out, 0.25 * a + 0.75 * b, atol=1e-6, rtol=0)
    with pytest.raises(UmmError, match="2 inputs but 3 merge weights"):
        weighted_average([a, b], [0.2, 0.3, 0.5], name="t")
    with pytest.raises(UmmError, match="missing but has merge weight"):
        weighted_average([a, None], [0.5, 0.5])
    with pytest.raises(UmmError, match="shape"):
        weighted_average([a, torch.randn(4, 3)], [0.5, 0.5])


def test_mergekit_api_on_in_memory_tensors(tmp_path):
    from mergekit.merge_methods import merge_tensors

    path = MergeWeights(experts=["x", "y"], layers={2: {"*": [0.3, 0.7]}}).save(tmp_path / "w.json")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, 6, generator=g).bfloat16() for _ in range(2))
    out = merge_tensors([a, b], METHOD_NAME, parameters={"weights_file": str(path)},
                        name="model.layers.2.self_attn.q_proj.weight")
    assert out.dtype == torch.bfloat16  # computed in float32, returned in the inputs' dtype
    torch.testing.assert_close(out.float(), 0.3 * a.float() + 0.7 * b.float(), rtol=2**-8, atol=0)
    # inputs matched by name, in any order
    out = merge_tensors([b, a], METHOD_NAME, parameters={"weights_file": str(path), "expert": ["y", "x"]},
                        name="model.layers.2.mlp.up_proj.weight", dtype=torch.float32)
    torch.testing.assert_close(out, 0.3 * a.float() + 0.7 * b.float())
    with pytest.raises(UmmError, match="no weights for tensor 'model.norm.weight'"):
        merge_tensors([a, b], METHOD_NAME, parameters={"weights_file": str(path)}, name="model.norm.weight")
    with pytest.raises(UmmError, match="3 input models but weights file .* has 2 experts"):
        merge_tensors([a, b, a], METHOD_NAME, parameters={"weights_file": str(path)},
                      name="model.layers.2.mlp.up_proj.weight")


# ------------------------------------------------------------------------------------ mergekit YAMLs
def test_generated_yaml_merges_three_rms_with_per_layer_weights(dense3, tmp_path):
    paths, sds = dense3
    w0, w1_mlp, w1, other = [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]
    yaml_path = write_mergekit_yaml(
        paths, {0: w0, 1: {"mlp": w1_mlp, "*": w1}}, tmp_path / "merge.yaml", default=other
    )
    assert (tmp_path / "merge.weights.json").is_file()
    out = run_mergekit_yaml(yaml_path, tmp_path / "merged")

    def weight_of(name):
        if name.startswith("model.layers.0."):
            return w0
        if name.startswith("model.layers.1.mlp."):
            return w1_mlp
        if name.startswith("model.layers.1."):
            return w1
        return other

    _assert_close(out, _expected(sds, weight_of))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_handwritten_yaml_by_position_through_the_console_entry(dense3, tmp_path):
    paths, sds = dense3
    weights = {
        "format": "umm-merge-weights/1",
        "experts": ["first", "second", "third"],
        "layers": {"0": {"*": [1.0, 0.0, 0.0]}, "1": {"gate_proj": [0.0, 0.0, 1.0], "*": [0.0, 1.0, 0.0]}},
        "tensors": {"score.weight": [0.1, 0.2, 0.7]},
        "default": "uniform",
    }
    (tmp_path / "w.json").write_text(json.dumps(weights))
    (tmp_path / "m.yaml").write_text(textwrap.dedent(f"""
        merge_method: umm_learned
        models:
          - model: {paths[0]}
          - model: {paths[1]}
          - model: {paths[2]}
        parameters:
          weights_file: {tmp_path / "w.json"}
    """))
    code = mergekit_yaml_main([str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--quiet"])
    assert code == 0

    def weight_of(name):
        if name.startswith("model.layers.0."):
            return [1.0, 0.0, 0.0]
        if name == "model.layers.1.mlp.gate_proj.weight":
            return [0.0, 0.0, 1.0]
        if name.startswith("model.layers.1."):
            return [0.0, 1.0, 0.0]
        return [0.1, 0.2, 0.7] if name == "score.weight" else [1 / 3] * 3

    _assert_close(tmp_path / "out", _expected(sds, weight_of))


def test_yaml_errors(dense3, tmp_path, capsys):
    paths, _ = dense3
    # tensors the file does not cover, and no default: the merge stops, naming the tensor; nothing is left
    yaml_path = write_mergekit_yaml(paths, {0: [1, 0, 0], 1: [0, 1, 0]}, tmp_path / "a.yaml", default=None)
    with pytest.raises(UmmError, match=r"no weights for tensor '(model\.embed_tokens|model\.norm|score)\.weight'"):
        run_mergekit_yaml(yaml_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert mergekit_yaml_main([str(yaml_path), str(tmp_path / "out2"), "--quiet"]) == 1
    assert "no weights for tensor" in capsys.readouterr().err

    # weights file missing
    text = yaml_path.read_text().replace("a.weights.json", "gone.json")
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(UmmError, match="weights_file .*gone.json.* not found"):
        run_mergekit_yaml(tmp_path / "b.yaml", tmp_path / "out")

    # weights that do not sum to 1: refused before merging, naming layer and projection
    bad = json.loads((tmp_path / "a.weights.json").read_text())
    bad["layers"]["1"] = {"up_proj": [0.5, 0.2, 0.2], "*": [0, 1, 0]}
    (tmp_path / "a.weights.json").write_text(json.dumps(bad))
    with pytest.raises(UmmError, match=r"layers\.1\.up_proj: weights sum to 0\.9"):
        run_mergekit_yaml(yaml_path, tmp_path / "out")

    # no weights_file at all; unknown mergekit option
    (tmp_path / "c.yaml").write_text(f"merge_method: umm_learned\nmodels:\n  - model: {paths[0]}\n")
    with pytest.raises(UmmError, match="needs parameters"):
        run_mergekit_yaml(tmp_path / "c.yaml", tmp_path / "out")
    with pytest.raises(UmmError, match="unknown mergekit option"):
        run_mergekit_yaml(yaml_path, tmp_path / "out", out_shard_sise=10)
    assert not (tmp_path / "out").exists()
