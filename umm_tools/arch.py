"""Which dense source architectures umm supports, and how each maps onto Qwen2-MoE.

A source is a Llama, Mistral or Qwen2 ``…ForCausalLM`` or ``…ForSequenceClassification`` checkpoint.
Their decoder layers differ from Qwen2-MoE's only in the feed-forward block and in attention biases, so
the attention, norms, embeddings and score head carry over tensor for tensor:

* Llama / Mistral: no q/k/v biases -> the MoE is written with ``qkv_bias=false`` (no bias tensors at all,
  so nothing exists that training could move and the collapse could not carry back);
* Qwen2: q/k/v biases -> ``qkv_bias=true`` with the source's biases.

A Llama with ``attention_bias`` (which also biases ``o_proj``) or ``mlp_bias`` has tensors Qwen2-MoE cannot
hold, and is refused. Mistral's sliding window applies to every layer; it is carried over as Qwen2-MoE
``layer_types`` of ``sliding_attention`` with the same window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from umm_tools.errors import UmmError

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SourceArch:
    model_type: str
    seqcls_class: str
    causal_class: str
    qkv_bias: bool


SUPPORTED: dict[str, SourceArch] = {
    "llama": SourceArch("llama", "LlamaForSequenceClassification", "LlamaForCausalLM", qkv_bias=False),
    "mistral": SourceArch("mistral", "MistralForSequenceClassification", "MistralForCausalLM", qkv_bias=False),
    "qwen2": SourceArch("qwen2", "Qwen2ForSequenceClassification", "Qwen2ForCausalLM", qkv_bias=True),
}


def source_arch(config: Any, where: str) -> tuple[SourceArch, str]:
    """Check a dense source config; return its :class:`SourceArch` and head kind ("seqcls" | "causal").

    ``where`` names the folder or Hub id in error messages.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UmmError(
            f"{where}: model_type {model_type!r} is not supported; umm upcycles "
            f"{', '.join(sorted(SUPPORTED))} models (…ForCausalLM or …ForSequenceClassification)."
        )
    arch = SUPPORTED[model_type]
    archs = list(getattr(config, "architectures", None) or [])
    if arch.seqcls_class in archs:
        head = "seqcls"
    elif arch.causal_class in archs or not archs:
        head = "causal"
    else:
        raise UmmError(
            f"{where}: architecture {archs} is not one umm upcycles; expected {arch.causal_class} or "
            f"{arch.seqcls_class}."
        )
    if getattr(config, "attention_bias", False):
        raise UmmError(
            f"{where}: attention_bias=true (biases on q/k/v/o projections); Qwen2-MoE has no o_proj bias, so "
            "that tensor would be lost. umm refuses such a source."
        )
    if getattr(config, "mlp_bias", False):
        raise UmmError(
            f"{where}: mlp_bias=true (biases on the feed-forward projections); Qwen2-MoE experts have no biases, "
            "so those tensors would be lost. umm refuses such a source."
        )
    if head == "seqcls" and getattr(config, "num_labels", 1) != 1:
        raise UmmError(
            f"{where}: num_labels={config.num_labels}; a reward model has exactly one output. Use a model with "
            "num_labels=1, or its …ForCausalLM base (umm then adds a one-output score head)."
        )
    return arch, head


def attention_layout(config: Any, arch: SourceArch) -> dict[str, Any]:
    """The Qwen2-MoE config fields that reproduce the source's attention exactly."""
    n_layers = config.num_hidden_layers
    out: dict[str, Any] = {"qkv_bias": arch.qkv_bias}
    if arch.model_type == "mistral":
        window = getattr(config, "sliding_window", None)
        if window:
            out.update(use_sliding_window=True, sliding_window=window, layer_types=["sliding_attention"] * n_layers)
        else:
            out.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * n_layers)
    elif arch.model_type == "qwen2":
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
        out.update(
            use_sliding_window=bool(getattr(config, "use_sliding_window", False)),
            sliding_window=getattr(config, "sliding_window", None),
            max_window_layers=getattr(config, "max_window_layers", n_layers),
            layer_types=layer_types,
        )
        if "sliding_attention" in layer_types and not out["sliding_window"]:
            raise UmmError("qwen2 source declares sliding_attention layers but no sliding_window size.")
    else:
        out.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * n_layers)
    return out
