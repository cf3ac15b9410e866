"""``umm upcycle``: a dense Llama / Mistral / Qwen2 RM becomes a function-preserving Qwen2-MoE RM.

Every decoder layer's FFN ``f(x) = D·(act(G·x) ⊙ U·x)`` becomes

    y = Σ_{i ∈ topk(x)} p̃_i(x) · f_i(x) + σ(g·x) · f_shared(x)

with E routed experts ``(G, U, (1-c)·D)`` and one shared expert of width S·I that stacks S copies
``(G, U, (2c/S)·D)``. With the shared gate ``g = 0`` (σ(0) = 1/2) the shared expert adds ``c·f(x)``; the
renormalised top-k probabilities sum to 1, so the routed experts add ``(1-c)·f(x)`` whatever the router
says. Hence ``y = f(x)``: the MoE RM scores exactly like its source at initialisation. Symmetry between
the routed experts is broken by the router (random, or k-means centroids of real hidden states), not by
noise on the experts (``expert_noise``, off by default).

Tensors are streamed: read one at a time from the source's safetensors and written shard by shard with
mergekit's ``TensorWriter``; the model is never instantiated (except for ``router_init=kmeans``, which
needs a forward pass to see hidden states).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from umm_tools import __version__
from umm_tools.arch import FFN_PROJECTIONS, SourceArch, attention_layout, source_arch
from umm_tools.config import Options
from umm_tools.errors import UmmError
from umm_tools.tensorio import StreamingSafetensorsWriter
from umm_tools.utils import atomic_output_dir, progress, write_json

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_KEEP = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
}
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_QKV_BIAS = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}


class UpcycleOptions(Options):
    """Options of ``umm upcycle``."""

    num_experts: int = Field(4, ge=1, description="Number of routed experts E per layer.")
    top_k: int = Field(2, ge=1, description="Routed experts active per token k (must be <= num_experts).")
    shared_experts: int = Field(
        1, ge=1, description="Number of always-on shared experts S (stored as one shared expert of width S·I)."
    )
    shared_share: float = Field(
        0.5,
        description="Share c of the FFN output carried by the shared expert(s) at initialisation, in (0, 1); "
        "the routed experts carry 1-c.",
    )
    router_init: Literal["random", "kmeans"] = Field(
        "random",
        description="Router initialisation: 'random' (normal with std router_std) or 'kmeans' (centroids of each "
        "layer's FFN inputs on the prompts in router_data).",
    )
    router_std: float = Field(0.02, ge=0, description="Standard deviation of the random router weights.")
    router_data: str | None = Field(
        None,
        description="Prompts for router_init=kmeans: a .txt file (one prompt a line) or a .jsonl/.json/.csv/.parquet "
        "file with a router_data_column column.",
    )
    router_data_column: str = Field("prompt", description="Column of router_data that holds the prompts.")
    router_max_prompts: int = Field(256, ge=1, description="At most this many prompts are used for kmeans.")
    router_max_length: int = Field(256, ge=8, description="Prompts are cut to this many tokens for kmeans.")
    expert_noise: float = Field(
        0.0,
        ge=0,
        description="Relative Gaussian noise added to the routed experts' gate/up weights (std = noise × the "
        "tensor's std). 0 keeps the upcycle exactly function-preserving.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the written tensors; 'auto' keeps each source tensor's dtype."
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard written, e.g. '2GB' or '500MB'.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub SOURCE.")
    overwrite: bool = Field(False, description="Replace OUTPUT_DIR if it exists (only once the new one is complete).")
    seed: int = Field(0, description="Seed for the router, the score head of a CausalLM source, and noise.")


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, flags=re.I)
    if not m:
        raise UmmError(f"max_shard_size {text!r}: expected a size like '5GB', '500MB' or a number of bytes.")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(value * base**power)


class SourceWeights:
    """Lazy access to a folder's safetensors: validates the index and every shard before anything is written."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            from umm_tools.utils import read_json

            weight_map = read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UmmError(f"{index} has no weight_map; the download is incomplete or the file is corrupt.")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise UmmError(
                    f"{index} names shard(s) {', '.join(missing)} that are missing from {folder}; "
                    "re-download the model (all shards are needed)."
                )
        elif (folder / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(p.name for p in folder.iterdir())
            hint = ""
            if any(n.endswith(".bin") for n in found):
                hint = " Only safetensors weights are supported: convert pytorch_model*.bin with transformers' save_pretrained."
            raise UmmError(
                f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json); "
                f"found: {', '.join(found) or 'nothing'}.{hint}"
            )
        self.handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        for f in files:
            try:
                h = safe_open(str(folder / f), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises several types for a damaged header
                raise UmmError(f"{folder / f} is corrupt or not a safetensors file ({e}); re-download it.") from e
            self.handles[f] = h
            for k in keys:
                self.where[k] = f
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if k not in self.where]
            if absent:
                raise UmmError(f"{index} lists tensor {absent[0]} but no shard holds it; re-download the model.")

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str):
        f = self.where[name]
        try:
            return self.handles[f].get_tensor(name)
        except Exception as e:
            raise UmmError(f"{self.folder / f}: cannot read tensor {name} ({e}); the file is corrupt, re-download it.") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str):
        import torch

        return getattr(torch, _ST_DTYPES[self.handles[self.where[name]].get_slice(name).get_dtype()])


def upcycle(source: str, output_dir: str | Path, opts: UpcycleOptions | None = None) -> Path:
    """Upcycle the dense RM at ``source`` (folder or Hub id) into a Qwen2-MoE RM at ``output_dir``."""
    import torch
    from transformers import AutoConfig

    from umm_tools.hub import resolve_model

    opts = opts or UpcycleOptions()
    E, k, S, c = opts.num_experts, opts.top_k, opts.shared_experts, opts.shared_share
    if k > E:
        raise UmmError(f"top_k={k} is larger than num_experts={E}; choose top_k <= num_experts.")
    if not 0.0 < c < 1.0:
        raise UmmError(f"shared_share={c} is outside (0, 1); the shared expert carries c and the routed ones 1-c.")
    if opts.router_init == "kmeans" and not opts.router_data:
        raise UmmError("router_init=kmeans needs --router-data FILE (prompts to cluster); or use --router-init random.")
    if opts.router_data and not Path(opts.router_data).is_file():
        raise UmmError(f"router data file not found: {opts.router_data}")
    max_shard = parse_size(opts.max_shard_size)
    out = Path(output_dir)
    if out.exists() and not opts.overwrite:
        raise UmmError(f"{out} already exists; choose another output folder or pass --overwrite to replace it.")

    folder = resolve_model(source, opts.revision)
    if not (folder / "config.json").is_file():
        raise UmmError(f"{folder}: config.json is missing; is this a transformers model folder?")
    try:
        src_cfg = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise UmmError(f"{folder}/config.json cannot be read by transformers: {e}") from e
    arch, head = source_arch(src_cfg, str(source))
    weights = SourceWeights(folder)
    plan = _plan(weights, src_cfg, arch, head, str(source))

    H, I, L = src_cfg.hidden_size, src_cfg.intermediate_size, src_cfg.num_hidden_layers
    routed_scale = 1.0 - c
    shared_scale = 2.0 * c / S
    out_dtype = None if opts.dtype == "auto" else getattr(torch, opts.dtype)

    gen = torch.Generator().manual_seed(opts.seed)
    if opts.router_init == "kmeans":
        routers = _kmeans_routers(folder, src_cfg, head, opts)
    else:
        routers = [torch.randn(E, H, generator=gen) * opts.router_std for _ in range(L)]
    score = None
    if head == "causal":  # a new one-output head, initialised as transformers initialises a Linear head
        std = getattr(src_cfg, "initializer_range", 0.02)
        score = torch.randn(1, H, generator=gen) * std

    moe_cfg, umm_meta = _moe_config(src_cfg, arch, head, opts, str(source), routed_scale, shared_scale)
    layout = _layout(weights, plan, opts, routers, score, routed_scale, shared_scale)
    with atomic_output_dir(out, overwrite=opts.overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, [(n, shape, dt) for n, shape, dt, _ in layout], max_shard)
        try:
            for name, _shape, dtype, make in progress(layout, desc="upcycle", unit="tensor"):
                writer.write(name, make().to(dtype))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        moe_cfg.dtype = str(out_dtype or weights.dtype(plan["embed"])).replace("torch.", "")
        moe_cfg.save_pretrained(str(tmp))
        for fname in TOKENIZER_FILES:
            if (folder / fname).is_file():
                shutil.copy2(folder / fname, tmp / fname)
        write_json(tmp / "umm_upcycle.json", {"source": str(source), "options": opts.model_dump(), "umm": umm_meta})
    logger.info("wrote %s: %d MoE layers, E=%d routed + S=%d shared experts of width %d, top-%d, c=%.2f",
                out, L, E, S, I, k, c)
    return out


def _layout(weights: SourceWeights, plan: dict[str, Any], opts: UpcycleOptions, routers: list, score: Any,
            routed_scale: float, shared_scale: float) -> list[tuple[str, tuple[int, ...], Any, Any]]:
    """Every output tensor in write order: (name, shape, dtype, function that computes it).

    Known before anything is computed, so the safetensors headers can be written first and each tensor
    streamed out as soon as it exists. An FFN source tensor feeds E + 1 outputs; a one-entry cache reads it once.
    """
    import torch

    E, S = opts.num_experts, opts.shared_experts
    out_dtype = None if opts.dtype == "auto" else getattr(torch, opts.dtype)
    # Derived tensors of the FFN source tensor being expanded, each computed once in the output dtype and
    # written E or E + 1 times: converting dtypes per output would dominate the run time.
    cache: dict[str, torch.Tensor] = {}
    cached_name: list[str] = [""]

    def derived(name: str, variant: str, dtype: Any) -> torch.Tensor:
        if cached_name[0] != name:
            cache.clear()
            cached_name[0] = name
            cache["raw"] = weights.get(name)
        if variant not in cache:
            w = cache["raw"]
            down = name.endswith("down_proj.weight")

            def scaled(scale: float) -> torch.Tensor:
                # Same bits as (w.float() * scale).to(dtype): CPU bf16/fp16 arithmetic rounds from float32.
                return (w * scale) if w.dtype == dtype else (w.float() * scale).to(dtype)

            if variant == "routed":
                cache[variant] = scaled(routed_scale) if down else w.to(dtype)
            elif down:  # shared, (H, S·I): S copies side by side, each scaled by 2c/S
                block = scaled(shared_scale)
                cache[variant] = block if S == 1 else torch.cat([block] * S, dim=1)
            else:  # shared, (S·I, H): S copies stacked
                block = w.to(dtype)
                cache[variant] = block if S == 1 else torch.cat([block] * S, dim=0)
        return cache[variant]

    def noisy(name: str, dtype: Any) -> torch.Tensor:
        w = cache["raw"].float() if cached_name[0] == name else weights.get(name).float()
        return (w + torch.randn(w.shape, generator=gen) * (opts.expert_noise * w.std())).to(dtype)

    gen = torch.Generator().manual_seed(opts.seed + 1)
    layout: list[tuple[str, tuple[int, ...], Any, Any]] = []
    for name in plan["copy_order"]:
        kind = plan["kind"][name]
        if kind == "drop":
            continue
        dtype = out_dtype or weights.dtype(name)
        shape = weights.shape(name)
        if kind == "copy":
            layout.append((name, shape, dtype, lambda name=name: weights.get(name)))
            continue
        layer, proj = kind
        prefix = f"model.layers.{layer}.mlp"
        for i in range(E):
            if opts.expert_noise > 0 and proj != "down_proj":
                make = lambda name=name, dtype=dtype: noisy(name, dtype)  # noqa: E731
            else:
                make = lambda name=name, dtype=dtype: derived(name, "routed", dtype)  # noqa: E731
            layout.append((f"{prefix}.experts.{i}.{proj}.weight", shape, dtype, make))
        shared_shape = (shape[0], shape[1] * S) if proj == "down_proj" else (shape[0] * S, shape[1])
        layout.append((f"{prefix}.shared_expert.{proj}.weight", shared_shape, dtype,
                       lambda name=name, dtype=dtype: derived(name, "shared", dtype)))
        if proj == "gate_proj":
            hidden = shape[1]
            layout.append((f"{prefix}.gate.weight", (E, hidden), dtype, lambda layer=layer: routers[layer]))
            layout.append((f"{prefix}.shared_expert_gate.weight", (1, hidden), dtype,
                           lambda hidden=hidden: torch.zeros(1, hidden)))
    if score is not None:
        embed = plan["embed"]
        layout.append(("score.weight", tuple(score.shape), out_dtype or weights.dtype(embed), lambda: score))
    return layout


def _plan(weights: SourceWeights, cfg: Any, arch: SourceArch, head: str, where: str) -> dict[str, Any]:
    """Classify every source tensor: copied, an FFN projection to expand, or dropped (never silently)."""
    kind: dict[str, Any] = {}
    seen_ffn: set[tuple[int, str]] = set()
    unknown: list[str] = []
    for name in weights.names():
        m = _LAYER_RE.match(name)
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            kind[name] = "copy"
        elif name == "score.weight":
            if head != "seqcls":
                unknown.append(name)
            kind[name] = "copy"
        elif name == "lm_head.weight" and head == "causal":
            kind[name] = "drop"  # the language-model head is replaced by a one-output score head
        elif m and m.group(2) in _LAYER_KEEP or m and m.group(2) in _QKV_BIAS and arch.qkv_bias:
            kind[name] = "copy"
        elif m and m.group(2).endswith("rotary_emb.inv_freq"):
            kind[name] = "drop"  # a buffer recomputed from the config, saved by old checkpoints
        elif m and m.group(2).startswith("mlp.") and m.group(2)[4:-7] in FFN_PROJECTIONS and name.endswith(".weight"):
            layer, proj = int(m.group(1)), m.group(2)[4:-7]
            kind[name] = (layer, proj)
            seen_ffn.add((layer, proj))
        else:
            unknown.append(name)
    if unknown:
        raise UmmError(
            f"{where}: tensor {unknown[0]} (and {len(unknown) - 1} more) has no place in a Qwen2-MoE model and would "
            "be lost; umm refuses rather than drop it."
            if len(unknown) > 1
            else f"{where}: tensor {unknown[0]} has no place in a Qwen2-MoE model and would be lost; umm refuses "
            "rather than drop it."
        )
    missing = [
        f"model.layers.{layer}.mlp.{p}.weight"
        for layer in range(cfg.num_hidden_layers)
        for p in FFN_PROJECTIONS
        if (layer, p) not in seen_ffn
    ]
    if "model.embed_tokens.weight" not in kind:
        missing.insert(0, "model.embed_tokens.weight")
    if head == "seqcls" and "score.weight" not in kind:
        missing.append("score.weight")
    if missing:
        raise UmmError(f"{where}: the weights lack {missing[0]} ({len(missing)} missing tensors); re-download the model.")
    order = sorted(kind, key=_tensor_order)
    return {"kind": kind, "copy_order": order, "embed": "model.embed_tokens.weight"}


def _tensor_order(name: str) -> tuple[int, str]:
    m = _LAYER_RE.match(name)
    if m:
        return (int(m.group(1)) + 1, m.group(2))
    return (0, name) if name.startswith("model.embed") else (10**9, name)


def _moe_config(src: Any, arch: SourceArch, head: str, opts: UpcycleOptions, source: str,
                routed_scale: float, shared_scale: float):
    from transformers import Qwen2MoeConfig

    E, k, S = opts.num_experts, opts.top_k, opts.shared_experts
    I = src.intermediate_size
    src_dict = src.to_dict()
    src_dict["architectures"] = [arch.seqcls_class]
    src_dict["id2label"] = {"0": "LABEL_0"}
    src_dict["label2id"] = {"LABEL_0": 0}
    src_dict.pop("num_labels", None)
    umm_meta = {
        "version": __version__,
        "source": source,
        "source_revision": opts.revision,
        "source_model_type": arch.model_type,
        "source_architecture": arch.seqcls_class,
        "source_head": head,
        "source_config": src_dict,
        "num_experts": E,
        "top_k": k,
        "shared_experts": S,
        "shared_share": opts.shared_share,
        "intermediate_size": I,
        "routed_scale": routed_scale,
        "shared_scale": shared_scale,
        "router_init": opts.router_init,
        "score_init": "source" if head == "seqcls" else f"normal(0, {getattr(src, 'initializer_range', 0.02)})",
    }
    kw: dict[str, Any] = dict(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=I,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or src.num_attention_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=getattr(src, "initializer_range", 0.02),
        rms_norm_eps=src.rms_norm_eps,
        rope_parameters=getattr(src, "rope_parameters", None),
        attention_dropout=getattr(src, "attention_dropout", 0.0) or 0.0,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=I,
        shared_expert_intermediate_size=S * I,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=True,  # renormalised top-k probabilities sum to 1: required for exactness
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        pad_token_id=src.pad_token_id,
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
        num_labels=1,
        **attention_layout(src, arch),
    )
    head_dim = getattr(src, "head_dim", None)
    if head_dim:
        kw["head_dim"] = head_dim
    cfg = Qwen2MoeConfig(**kw)
    cfg.architectures = ["Qwen2MoeForSequenceClassification"]
    cfg.umm = umm_meta
    return cfg, umm_meta


def _read_prompts(path: str, column: str, limit: int) -> list[str]:
    p = Path(path)
    if p.suffix == ".txt":
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        import datasets

        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise UmmError(f"{p}: unsupported router data format; use .txt, .jsonl, .json, .csv or .parquet.")
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        except Exception as e:
            raise UmmError(f"{p}: cannot read router data ({e}).") from e
        if column not in ds.column_names:
            raise UmmError(f"{p}: no column {column!r} (found {ds.column_names}); set --router-data-column.")
        prompts = [x for x in ds[column] if isinstance(x, str) and x.strip()]
    if not prompts:
        raise UmmError(f"{p}: no prompts found for kmeans router initialisation.")
    return prompts[:limit]


def _kmeans_routers(folder: Path, cfg: Any, head: str, opts: UpcycleOptions) -> list:
    """Per layer: k-means of the FFN inputs over the prompts' tokens into E centroids -> router rows.

    Rows are the centred, unit-norm centroids, scaled so that router logits over these tokens have unit
    standard deviation (so routing is decisive but not saturated whatever the model width).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    prompts = _read_prompts(opts.router_data, opts.router_data_column, opts.router_max_prompts)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    layers = model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(idx):
        def fn(_module, args):
            x = args[0]
            m = mask_holder["mask"].reshape(-1).bool()
            captured[idx].append(x.reshape(-1, x.shape[-1])[m].detach())

        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in progress(range(0, len(prompts), 16), desc="kmeans: hidden states"):
                batch = tok(prompts[start : start + 16], return_tensors="pt", padding=True, truncation=True,
                            max_length=opts.router_max_length)
                mask_holder["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(opts.seed)
    routers = []
    for idx, chunks in enumerate(captured):
        X = torch.cat(chunks)  # (N, H) FFN inputs of non-padding tokens
        if X.shape[0] < opts.num_experts:
            raise UmmError(
                f"{opts.router_data}: only {X.shape[0]} tokens for {opts.num_experts} clusters; give more prompts."
            )
        centroids = kmeans(X, opts.num_experts, gen)
        W = centroids - centroids.mean(0, keepdim=True)
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
        logits = X @ W.T
        W = W / logits.std().clamp_min(1e-8)
        routers.append(W)
        logger.debug("layer %d: kmeans on %d tokens", idx, X.shape[0])
    del model
    return routers


def kmeans(X, n: int, gen, iters: int = 25):
    """Plain k-means with k-means++ seeding on the rows of ``X`` (N, H) -> (n, H) centroids."""
    import torch

    N = X.shape[0]
    first = torch.randint(N, (1,), generator=gen).item()
    centroids = [X[first]]
    d2 = ((X - X[first]) ** 2).sum(1)
    for _ in range(1, n):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((N,), 1.0 / N)
        nxt = torch.multinomial(probs, 1, generator=gen).item()
        centroids.append(X[nxt])
        d2 = torch.minimum(d2, ((X - X[nxt]) ** 2).sum(1))
    C = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(X, C).argmin(1)
        for j in range(n):
            members = X[assign == j]
            if len(members):
                C[j] = members.mean(0)
    return C
