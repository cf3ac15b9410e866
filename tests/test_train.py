"""umm train: learning, the router losses, routing statistics, freezing, resume, bad data, LoRA, two processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import make_dense, make_pairs
from umm_tools.data import load_preference_data
from umm_tools.errors import UmmError
from umm_tools.train import (
    CHECKPOINTS,
    INCOMPLETE,
    ROUTING_STATE_FILE,
    ROUTING_STATS_FORMAT,
    TrainOptions,
    router_losses,
    train,
)
from umm_tools.upcycle import UpcycleOptions, upcycle

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = 200
E, K = 4, 2
# 160 training pairs / 8 per step = 20 steps per epoch; 60 steps are 3 epochs.
LEARN = dict(max_steps=60, learning_rate=3e-3, batch_size=8, eval_fraction=0.2, logging_steps=5, eval_steps=20,
             save_steps=1000)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def load_rm(folder):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_dense(root / "dense")
    upcycle(str(root / "dense"), root / "moe", UpcycleOptions(num_experts=E, top_k=K))
    return {"root": root, "dense": root / "dense", "moe": root / "moe",
            "pairs": write_jsonl(root / "pairs.jsonl", make_pairs(N_PAIRS, seed=1))}


def _tokens_per_epoch(tiny, opts: TrainOptions) -> int:
    """Real (non-padding) tokens of every training pair, chosen and rejected: what one epoch routes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny["moe"]))
    data = load_preference_data(tiny["pairs"], tok, opts.data_options())
    return sum(len(c) + len(r) for c, r in zip(data.train["chosen_ids"], data.train["rejected_ids"], strict=True))


# --- learning ---------------------------------------------------------------------------------------------


def test_moe_learns_and_writes_a_complete_folder(tiny):
    out = train(str(tiny["moe"]), tiny["pairs"], tiny["root"] / "moe-out", TrainOptions(**LEARN))
    metrics = json.loads((out / "metrics.json").read_text())

    # The loss falls and held-out accuracy rises from chance-or-worse to well above it.
    curve = metrics["loss_curve"]
    assert curve[0]["step"] == 1 and curve[-1]["step"] == 60
    assert curve[-1]["bt_loss"] < curve[0]["bt_loss"] / 5
    assert all("router_aux_loss" in h and "router_z_loss" in h for h in curve)  # the router losses are logged
    evals = metrics["eval_curve"]
    assert [h["step"] for h in evals] == [0, 20, 40, 60]
    assert evals[-1]["accuracy"] > 0.8 and evals[-1]["accuracy"] > evals[0]["accuracy"]
    assert "router_aux_loss" in evals[-1]
    final = metrics["eval"]
    assert final["pairs"] == 40 and final["accuracy"] > 0.8 and final["mean_margin"] > 0
    assert metrics["kind"] == "moe" and metrics["global_step"] == 60 and metrics["frozen_parameters"] == []
    assert metrics["data_stats"]["train_pairs"] == 160 and metrics["data_stats"]["eval_pairs"] == 40

    # A standard model folder: same tensor names as the upcycled one, the umm key intact, tokenizer, provenance.
    before, after = weights(tiny["moe"]), weights(out)
    assert set(after) == set(before)
    config = json.loads((out / "config.json").read_text())
    assert config["umm"] == json.loads((tiny["moe"] / "config.json").read_text())["umm"]
    assert (out / "tokenizer.json").is_file() and (out / "umm_upcycle.json").is_file()
    options = json.loads((out / "train_options.json").read_text())
    assert options["options"]["max_steps"] == 60 and options["resolved"]["eval_fraction"] == 0.2
    assert not (out / INCOMPLETE).exists() and not (out / CHECKPOINTS).exists()

    # Router, routed experts, shared expert, shared gate and score head all moved.
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp."
        assert {p + "gate.weight", p + "shared_expert_gate.weight", p + "shared_expert.up_proj.weight"} <= moved
        assert all(f"{p}experts.{i}.{proj}.weight" in moved for i in range(E) for proj in ("gate_proj", "down_proj"))
    assert "score.weight" in moved

    # The exact eval accuracy matches scoring the held-out pairs afresh.
    from umm_tools.evaluate import pairwise_accuracy, score_pairs

    rm = load_rm(out)
    opts = TrainOptions(**LEARN)
    from transformers import AutoTokenizer

    held_out = load_preference_data(tiny["pairs"], AutoTokenizer.from_pretrained(str(out)), opts.data_options()).eval
    chosen, rejected = score_pairs(rm, held_out, 8, rm.config.pad_token_id)
    fresh = pairwise_accuracy(chosen, rejected)
    assert fresh["accuracy"] == pytest.approx(final["accuracy"])
    assert fresh["mean_margin"] == pytest.approx(final["mean_margin"], abs=1e-3)

    # Routing statistics: every layer, shares summing to 1, and exactly the real tokens of 3 epochs.
    stats = json.loads((out / "routing_stats.json").read_text())
    assert stats["format"] == ROUTING_STATS_FORMAT and (stats["num_experts"], stats["top_k"]) == (E, K)
    assert set(stats["layers"]) == {"0", "1"}
    assert stats["tokens"] == 3 * _tokens_per_epoch(tiny, opts)  # padding excluded, evaluation not counted
    for entry in stats["layers"].values():
        assert entry["tokens"] == stats["tokens"]
        for key in ("routed_prob_share", "routed_topk_share"):
            assert len(entry[key]) == E and sum(entry[key]) == pytest.approx(1.0, abs=1e-9)
            assert all(v >= 0 for v in entry[key])
        assert 0.0 < entry["shared_gate_mean"] < 1.0
    assert metrics["expert_load"]["per_layer"]["0"] == stats["layers"]["0"]["routed_topk_share"]


def test_dense_rm_learns_without_router_terms(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="umm_tools.train"):
        out = train(str(tiny["dense"]), tiny["pairs"], tiny["root"] / "dense-out", TrainOptions(**LEARN))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "dense" and metrics["expert_load"] is None
    assert metrics["loss_curve"][-1]["bt_loss"] < metrics["loss_curve"][0]["bt_loss"] / 5
    assert "router_aux_loss" not in metrics["loss_curve"][-1]
    assert metrics["eval"]["accuracy"] > 0.8 and metrics["eval_curve"][0]["accuracy"] < metrics["eval"]["accuracy"]
    assert not (out / "routing_stats.json").exists() and "no routing statistics" in caplog.text
    assert "trainable parameters" in caplog.text
    before, after = weights(tiny["dense"]), weights(out)
    assert set(before) == set(after)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_causal_lm_gets_a_new_score_head(tiny):
    make_dense(tiny["root"] / "causal", head="causal", tokenizer=True)
    out = train(str(tiny["root"] / "causal"), tiny["pairs"], tiny["root"] / "causal-out",
                TrainOptions(max_steps=2, batch_size=4, eval_fraction=0, learning_rate=1e-3))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert "score.weight" in weights(out) and "lm_head.weight" not in weights(out)
    load_rm(out)


# --- the router losses ----------------------------------------------------------------------------------------


def test_router_losses_exclude_padding_and_are_one_when_balanced():
    torch.manual_seed(0)
    real = torch.randn(10, E)
    padded = torch.cat([real, 100 * torch.randn(6, E)])  # padding rows with wild logits
    mask = torch.tensor([1] * 10 + [0] * 6)
    aux, z = router_losses([padded], mask, K)
    aux_ref, z_ref = router_losses([real], None, K)
    assert aux.item() == pytest.approx(aux_ref.item(), rel=1e-6) and z.item() == pytest.approx(z_ref.item(), rel=1e-6)
    aux_uniform, z_uniform = router_losses([torch.zeros(8, E)], None, K)
    assert aux_uniform.item() == pytest.approx(1.0)
    assert z_uniform.item() == pytest.approx(torch.log(torch.tensor(float(E))).item() ** 2)
    # One expert taking every token and all the probability: E.
    aux_collapsed, _ = router_losses([torch.tensor([[50.0, 0, 0, 0]] * 8)], None, 1)
    assert aux_collapsed.item() == pytest.approx(E, rel=1e-4)


def test_aux_loss_reaches_the_router_gradient(tiny):
    """The trainer's loss with router_aux_coef=1 minus the loss with 0 is the logged aux loss, and it has a
    non-zero gradient on every router."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig

    from umm_tools.train import UmmRewardTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny["moe"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["moe"]), dtype=torch.float32)
    data = load_preference_data(tiny["pairs"], tok)
    args = RewardConfig(output_dir=str(tiny["root"] / "unused"), use_cpu=True, bf16=False, report_to=[],
                        activation_checkpointing=False, max_length=None, per_device_train_batch_size=4,
                        dataset_num_proc=None)
    trainer = UmmRewardTrainer(model=model, args=args, train_dataset=data.train, processing_class=tok,
                               router_aux_coef=0.0)
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    model.train()
    routers = [model.model.layers[i].mlp.gate.weight for i in (0, 1)]

    without = trainer.compute_loss(model, dict(batch))
    trainer.router_aux_coef = 1.0
    with_aux = trainer.compute_loss(model, dict(batch))
    logged = trainer._metrics["train"]["router_aux_loss"]
    assert len(logged) == 2 and logged[0] == pytest.approx(logged[1])
    assert (with_aux - without).item() == pytest.approx(logged[-1], rel=1e-4) and logged[-1] >= 1.0
    grads = torch.autograd.grad(with_aux - without, routers)
    assert all(g.abs().sum() > 0 for g in grads)
    trainer.moe.remove()


# --- freezing ---------------------------------------------------------------------------------------------------


def test_biases_a_llama_source_lacks_are_frozen(tiny):
    """A MoE whose config grew q/k/v biases (a llama source has none): they are frozen, everything else trains."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny["moe"]))
    assert config.qkv_bias is False and config.umm["source_model_type"] == "llama"
    assert not any(n.endswith(".bias") for n in weights(tiny["moe"]))  # the upcycle wrote no biases at all
    config.qkv_bias = True
    model = AutoModelForSequenceClassification.from_config(config)
    source = AutoModelForSequenceClassification.from_pretrained(str(tiny["moe"]))
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(n.endswith("_proj.bias") for n in missing) and len(missing) == 6
    with torch.no_grad():
        for n in missing:
            model.get_parameter(n).zero_()
    folder = tiny["root"] / "moe-biased"
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny["moe"])).save_pretrained(str(folder))

    out = train(str(folder), tiny["pairs"], tiny["root"] / "biased-out",
                TrainOptions(max_steps=5, batch_size=8, learning_rate=1e-2, eval_fraction=0))
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["frozen_parameters"]) == sorted(missing)
    before, after = weights(folder), weights(out)
    for n in missing:
        assert torch.equal(after[n], before[n]) and not after[n].any()
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])


# --- resume ------------------------------------------------------------------------------------------------------


class _Crash(Exception):
    pass


def _callback(crash_at: int | None = None, seen: list | None = None):
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if seen is not None:
                seen.append(state.global_step)
            if state.global_step == crash_at:
                raise _Crash(f"crash at step {crash_at}")

    return Callback()


def test_resume_continues_from_the_saved_step(tiny):
    opts = TrainOptions(max_steps=6, save_steps=2, batch_size=8, learning_rate=3e-3, eval_fraction=0.2,
                        eval_steps=3, logging_steps=1)
    out = tiny["root"] / "resumed"
    with pytest.raises(_Crash):
        train(str(tiny["moe"]), tiny["pairs"], out, opts, callbacks=[_callback(crash_at=5)])
    # A crashed run does not look finished, and is not silently restarted or overwritten.
    assert (out / INCOMPLETE).exists() and not (out / "metrics.json").exists() and not (out / "config.json").exists()
    assert (out / CHECKPOINTS / "checkpoint-4" / ROUTING_STATE_FILE).is_file()
    with pytest.raises(UmmError, match="unfinished training run.*--resume"):
        train(str(tiny["moe"]), tiny["pairs"], out, opts)

    seen: list[int] = []
    train(str(tiny["moe"]), tiny["pairs"], out, opts.model_copy(update={"resume": True}),
          callbacks=[_callback(seen=seen)])
    assert seen == [5, 6]  # the global step continued from the checkpoint; nothing was redone from 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["global_step"] == 6
    assert [h["step"] for h in metrics["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert not (out / INCOMPLETE).exists()

    # The same run without the crash gives the same model and the same routing statistics.
    straight = train(str(tiny["moe"]), tiny["pairs"], tiny["root"] / "straight", opts)
    a, b = weights(out), weights(straight)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
    sa, sb = (json.loads((d / "routing_stats.json").read_text()) for d in (out, straight))
    assert sa["tokens"] == sb["tokens"]
    for layer in sa["layers"]:
        assert sa["layers"][layer]["routed_prob_share"] == pytest.approx(sb["layers"][layer]["routed_prob_share"],
                                                                         abs=1e-5)

    # A finished run is left alone by --resume, and an existing folder is refused without --overwrite.
    before = (out / "metrics.json").read_text()
    train(str(tiny["moe"]), tiny["pairs"], out, opts.model_copy(update={"resume": True}))
    assert (out / "metrics.json").read_text() == before
    with pytest.raises(UmmError, match="already exists.*--overwrite"):
        train(str(tiny["moe"]), tiny["pairs"], out, opts)


# --- bad data -------------------------------------------------------------------------------------------------------


def _broken(tmp: Path, n: int, broken: list[int]) -> str:
    lines = []
    for i, row in enumerate(make_pairs(n, seed=3), 1):
        lines.append("{not json" if i in broken else json.dumps(row))
    tmp.write_text("\n".join(lines) + "\n")
    return str(tmp)


def test_broken_rows_stop_the_run_or_warn(tiny, caplog):
    many = _broken(tiny["root"] / "many.jsonl", 50, [3, 10, 20, 30, 45])  # 10%
    out = tiny["root"] / "broken-out"
    with pytest.raises(UmmError, match=r"5 of 50 rows.*line 3: not valid JSON.*bad_row_threshold"):
        train(str(tiny["moe"]), many, out, TrainOptions(max_steps=1))
    assert not out.exists()  # nothing written before the data was known to be usable

    few = _broken(tiny["root"] / "few.jsonl", 50, [7])  # 2%
    with caplog.at_level(logging.WARNING, logger="umm_tools.data"):
        train(str(tiny["moe"]), few, out, TrainOptions(max_steps=1, batch_size=4, eval_fraction=0))
    assert "line 7" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["data_stats"]["train"]["bad_rows"] == {"malformed": 1}


def test_user_errors(tiny):
    with pytest.raises(UmmError, match="lora_dropout.*experts.gate_up_proj"):
        train(str(tiny["moe"]), tiny["pairs"], tiny["root"] / "e1", TrainOptions(lora=True, lora_dropout=0.1))
    with pytest.raises(UmmError, match="lora_targets: 'nope'"):
        train(str(tiny["moe"]), tiny["pairs"], tiny["root"] / "e2", TrainOptions(lora=True, lora_targets=["nope"]))
    with pytest.raises(UmmError, match="not a training checkpoint"):
        train(str(tiny["moe"]), tiny["pairs"], tiny["root"] / "e3", TrainOptions(resume_from=str(tiny["moe"])))
    with pytest.raises(UmmError, match="config.json is missing"):
        train(str(tiny["root"]), tiny["pairs"], tiny["root"] / "e4", TrainOptions())
    assert not any((tiny["root"] / f"e{i}").exists() for i in range(1, 5))
    with pytest.raises(UmmError, match="holds MODEL"):  # --overwrite would delete the model being trained
        train(str(tiny["moe"]), tiny["pairs"], tiny["moe"], TrainOptions(overwrite=True))
    assert (tiny["moe"] / "config.json").is_file()


def test_options_resolve_the_eval_split():
    assert TrainOptions().data_options().eval_fraction == 0.05
    assert TrainOptions(eval_data="x.jsonl").data_options().eval_fraction == 0.0
    assert TrainOptions(eval_fraction=0).data_options().eval_fraction == 0.0
    with pytest.raises(ValueError, match="not both"):
        TrainOptions(eval_fraction=0.1, eval_data="x.jsonl")
    with pytest.raises(ValueError, match="exclude each other"):
        TrainOptions(resume=True, overwrite=True)
    for name, field in TrainOptions.model_fields.items():
        assert field.description, name


# --- LoRA ---------------------------------------------------------------------------------------------------------


def test_lora_moe_saves_merged_weights_and_the_adapter(tiny):
    from peft import PeftModel

    out = train(str(tiny["moe"]), tiny["pairs"], tiny["root"] / "lora-out",
                TrainOptions(**(LEARN | {"max_steps": 40, "eval_steps": 40, "lora": True, "lora_rank": 4})))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] > 0.8
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 2
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "routing_stats.json").is_file()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert {"mlp.gate", "mlp.shared_expert_gate", "score"} <= set(adapter["modules_to_save"])

    merged = load_rm(out)  # plain transformers, nothing from umm or peft
    assert "umm" in json.loads((out / "config.json").read_text())
    before, after = weights(tiny["moe"]), weights(out)
    assert set(before) == set(after)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(before[name], after[name])  # not LoRA targets: untouched
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.2.down_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight", "score.weight"):
        assert not torch.equal(before[name], after[name])

    # The merged weights score exactly like the base model with the adapter.
    adapted = PeftModel.from_pretrained(load_rm(tiny["moe"]), str(out / "adapter")).eval()
    ids = torch.randint(4, 100, (3, 12))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4)


# --- two processes ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes(tiny):
    """torchrun, 2 CPU processes (gloo DDP): the run completes, files are written once, statistics are summed."""
    out = tiny["root"] / "ddp"
    # 160 training pairs, 2 processes x 8 pairs: 10 steps are exactly one epoch.
    options = {"max_steps": 10, "batch_size": 8, "eval_fraction": 0.2, "learning_rate": 3e-3, "save_steps": 5,
               "logging_steps": 2, "eval_steps": 5}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UMM_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "stage_launch.py"), "train", str(tiny["moe"]), tiny["pairs"], str(out), json.dumps(options)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 10 and metrics["eval"]["pairs"] == 40
    assert json.loads((out / "train_options.json").read_text())["num_processes"] == 2
    stats = json.loads((out / "routing_stats.json").read_text())
    assert stats["tokens"] == _tokens_per_epoch(tiny, TrainOptions(**options))  # both processes' tokens
    assert not (out / INCOMPLETE).exists()
    load_rm(out)
