"""The mergekit extension: ``umm_learned``, a learned-weight average, registered in mergekit on import.

``import umm_tools.merge_method`` registers the method in mergekit 0.1.5's registry
(``mergekit.merge_methods.register``, looked up by name with ``mergekit.merge_methods.get`` when mergekit
plans a merge), so a mergekit YAML with ``merge_method: umm_learned`` validates and runs in this process.
Importing it again (or reloading it) is harmless. ``import umm_tools`` alone does not import mergekit.

The method returns ``Σ_k w_k · T_k`` over its input tensors. The weights come from a merge-weights file
(:mod:`umm_tools.merge_weights`), looked up by the *output* tensor's name: exact ``tensors`` entry, then
``tensors`` pattern, then the layer's entry, then ``default``. A tensor the file does not cover is an error
unless the file sets ``"default"`` (e.g. ``"uniform"``).

In a mergekit YAML::

    merge_method: umm_learned
    models:
      - model: /path/rm_a
        parameters: {expert: rm_a}    # optional: the name in the file's "experts" list
      - model: /path/rm_b
        parameters: {expert: rm_b}
    parameters:
      weights_file: /path/merge_weights.json

``weights_file`` (required) is read as mergekit reads model paths: relative to the working folder. Inputs
match the file's ``experts`` by their ``expert`` parameter when every input sets one, else by position
(the order of ``models``). Run it with :func:`run_mergekit_yaml` or the ``umm-mergekit-yaml`` script
(:func:`mergekit_yaml_main`); plain ``mergekit-yaml`` does not know the method.

The same arithmetic serves ``umm collapse`` on in-memory tensors: :func:`weighted_average`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from umm_tools.errors import UmmError
from umm_tools.merge_weights import MergeWeights, load_merge_weights

logger = logging.getLogger(__name__)

METHOD_NAME = "umm_learned"


def weighted_average(
    tensors: Iterable[torch.Tensor | None], weights: Sequence[float], name: str = "tensor"
) -> torch.Tensor:
    """``Σ_k weights[k] · tensors[k]``, accumulated in float32 (float64 for float64 inputs).

    ``tensors`` may be a lazy iterable (a generator that loads one tensor at a time), so at most one input
    and the accumulator are alive at once. An input whose weight is exactly 0 is skipped and may be None
    (never loaded). The result keeps the accumulator's dtype; cast it as needed.
    """
    acc: torch.Tensor | None = None
    shape = None
    n = 0
    for n, tensor in enumerate(tensors, start=1):
        if n > len(weights):
            raise UmmError(f"{name}: more inputs than the {len(weights)} merge weights")
        w = float(weights[n - 1])
        if tensor is None:
            if w != 0.0:
                raise UmmError(f"{name}: input {n - 1} is missing but has merge weight {w}")
            continue
        if shape is None:
            shape = tensor.shape
        elif tensor.shape != shape:
            raise UmmError(f"{name}: input {n - 1} has shape {tuple(tensor.shape)}, input 0 has {tuple(shape)}")
        if w == 0.0:
            continue
        if acc is None:
            acc = torch.zeros(shape, dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
        acc.add_(tensor.to(device=acc.device, dtype=acc.dtype), alpha=w)
    if n != len(weights):
        raise UmmError(f"{name}: {n} inputs but {len(weights)} merge weights; they must match one to one")
    if shape is None:
        raise UmmError(f"{name}: every input is missing")
    if acc is None:  # all weights zero: impossible for convex weights, but stay well defined
        acc = torch.zeros(shape, dtype=torch.float32)
    return acc


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> MergeWeights:
    return load_merge_weights(path)


def read_weights_file(path: str | os.PathLike) -> MergeWeights:
    """Load a merge-weights file, cached per (path, modification time, size): mergekit asks per tensor."""
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise UmmError(
            f"{METHOD_NAME}: weights_file {str(path)!r} not found (looked at {p}); "
            "give the path of a merge_weights.json written by umm learn-merge."
        )
    st = p.stat()
    return _load_cached(str(p), st.st_mtime_ns, st.st_size)


class LearnedWeightAverage(GroupMergeMethod):
    """mergekit merge method ``umm_learned``: learned convex weights per output tensor, from a file."""

    def __init__(self) -> None:
        self.spec = MergeMethodSpec(
            name=METHOD_NAME,
            pretty_name="UMM learned-weight average",
            reference_url="https://arxiv.org/abs/2512.00724",
            parameters=(
                ParameterSpec(
                    name="weights_file",
                    value_type=str,
                    scope=ParameterScope.SHARED,
                    description="Path of the merge-weights JSON (format umm-merge-weights/1).",
                ),
                ParameterSpec(
                    name="expert",
                    value_type=Optional[str],
                    scope=ParameterScope.INPUT,
                    default=None,
                    description="This input's name in the weights file's 'experts' list (default: by position).",
                ),
            ),
            contract=InputContract(base=BasePolicy.IGNORED, min_inputs=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        weights_file = parameters["weights_file"]
        expert: Mapping[Any, str | None] = parameters.get("expert") or PerInputValues([])
        name = group.metadata.name or "tensor"
        mw = read_weights_file(weights_file)
        weights = mw.weights_for(name, source=f"weights file {weights_file}")
        entries = group.entries
        names = [expert.get(e.id) for e in entries]
        if all(n is None for n in names):
            if len(entries) != len(mw.experts):
                raise UmmError(
                    f"{name}: {len(entries)} input models but weights file {weights_file} has "
                    f"{len(mw.experts)} experts {mw.experts}; list one model per expert, in that order, "
                    "or name each model's expert with parameters: {expert: NAME}."
                )
            ordered = [e.tensor for e in entries]
        elif any(n is None for n in names):
            raise UmmError(
                f"{name}: only some input models set the 'expert' parameter; set it on every model or on none."
            )
        else:
            by_name = dict(zip(names, entries, strict=True))
            unknown = sorted(set(names) - set(mw.experts))
            if unknown or len(by_name) != len(names):
                raise UmmError(
                    f"{name}: 'expert' names {names} must be distinct names from the weights file's "
                    f"experts {mw.experts} (unknown: {unknown})."
                )
            missing = [e for e, w in zip(mw.experts, weights, strict=True) if e not in by_name and w != 0.0]
            if missing:
                raise UmmError(f"{name}: no input model for expert(s) {missing}, which have non-zero weight.")
            ordered = [by_name[e].tensor if e in by_name else None for e in mw.experts]
        first = entries[0].tensor
        return weighted_average(ordered, weights, name=name).to(first.dtype)


def register() -> merge_methods.MergeMethod:
    """Register ``umm_learned`` in mergekit's registry (idempotent); return the registered method."""
    for method in merge_methods.registered_methods():
        if method.spec.name == METHOD_NAME:
            cls = type(method)
            if cls.__module__ == __name__ and cls.__qualname__ == LearnedWeightAverage.__qualname__:
                return method
            raise UmmError(
                f"mergekit already has a merge method named {METHOD_NAME!r} ({cls.__module__}.{cls.__qualname__}); "
                "remove the conflicting plugin."
            )
    method = LearnedWeightAverage()
    merge_methods.register(method)
    return method


METHOD = register()


# ------------------------------------------------------------------------------------- running YAMLs
def _weights_files_in(node: Any) -> list[str]:
    """Every ``weights_file`` setting in a mergekit config dict (any ``parameters`` block)."""
    found: list[str] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "weights_file":
                items = value if isinstance(value, list) else [value]
                for item in items:
                    item = item.get("value") if isinstance(item, Mapping) else item
                    if isinstance(item, str):
                        found.append(item)
            else:
                found.extend(_weights_files_in(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_weights_files_in(item))
    return found


def run_mergekit_yaml(config_path: str | os.PathLike, out_path: str | os.PathLike, *, overwrite: bool = False,
                      **options: Any) -> Path:
    """Run a mergekit YAML with ``umm_learned`` registered; write the merged model to ``out_path``.

    ``options`` are mergekit's ``MergeOptions`` fields (``out_shard_size``, ``copy_tokenizer``, ``cuda``,
    ``lazy_unpickle``, ...). The output appears at ``out_path`` only once the merge is complete; an existing
    ``out_path`` is refused unless ``overwrite``. Weights files named in the YAML are checked before merging.
    """
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from pydantic import ValidationError

    from umm_tools.utils import atomic_output_dir, is_quiet

    unknown = sorted(set(options) - set(MergeOptions.model_fields))
    if unknown:
        raise UmmError(f"unknown mergekit option(s) {unknown}; known: {', '.join(sorted(MergeOptions.model_fields))}")
    options.setdefault("quiet", is_quiet())
    try:
        merge_options = MergeOptions(**options)
    except ValidationError as e:
        raise UmmError(f"invalid mergekit options: {e}") from e

    config_path = Path(config_path)
    if not config_path.is_file():
        raise UmmError(f"mergekit config not found: {config_path}")
    source = config_path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as e:
        raise UmmError(f"{config_path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UmmError(f"{config_path}: a mergekit config is a mapping, found {type(data).__name__}")
    try:
        config = MergeConfiguration.model_validate(data)
    except (ValidationError, ValueError, RuntimeError) as e:
        raise UmmError(f"{config_path} is not a valid mergekit config: {e}") from e
    known = {m.spec.name for m in merge_methods.registered_methods()}
    if config.merge_method not in known:
        raise UmmError(
            f"{config_path}: unknown merge_method {config.merge_method!r}; known: {', '.join(sorted(known))}"
        )
    files = _weights_files_in(data)
    if config.merge_method == METHOD_NAME and not files:
        raise UmmError(f"{config_path}: merge_method {METHOD_NAME} needs parameters: {{weights_file: PATH}}")
    for f in files:
        read_weights_file(f)

    out = Path(out_path).absolute()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        logger.info("mergekit: merging %s into %s", config_path, out)
        run_merge(config, str(tmp), options=merge_options, config_source=source)
    return out


def mergekit_yaml_main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``umm-mergekit-yaml``: mergekit's ``mergekit-yaml`` with ``umm_learned`` registered.

    Same arguments and options as ``mergekit-yaml CONFIG OUT_PATH``. Returns the exit code (a console
    script wrapper passes it to ``sys.exit``); a :class:`UmmError` is printed without a traceback.
    """
    import click
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        code = mergekit_yaml.main(
            args=list(sys.argv[1:] if argv is None else argv), prog_name="umm-mergekit-yaml", standalone_mode=False
        )
    except click.exceptions.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    except UmmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


# ---------------------------------------------------------------------------- writing a YAML for models
def write_mergekit_yaml(
    models: Sequence[str | os.PathLike],
    layer_weights: Mapping[int | str, Sequence[float] | Mapping[str, Sequence[float]]],
    yaml_path: str | os.PathLike,
    *,
    weights_path: str | os.PathLike | None = None,
    default: Sequence[float] | str | None = "uniform",
    tensors: Mapping[str, Sequence[float]] | None = None,
    mode: str = "learned",
    dtype: str | None = None,
    out_dtype: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a mergekit YAML (and its weights file) that merges dense ``models`` with ``umm_learned``.

    ``layer_weights[l]`` holds one weight per model for decoder layer ``l``: a list (every tensor of the
    layer) or a mapping ``{module key or '*': list}`` as in the weights file's ``layers``. Tensors outside
    the layers (embeddings, final norm, score head) take ``tensors`` entries, else ``default`` (uniform
    unless told; None makes them an error). The weights file goes to ``weights_path`` (default: beside the
    YAML, ``<yaml stem>.weights.json``); both files use absolute paths. Returns the YAML's path.
    """
    import yaml

    yaml_path = Path(yaml_path).absolute()
    if not models:
        raise UmmError("write_mergekit_yaml: give at least one model")
    refs = [str(Path(m).absolute()) if Path(m).exists() else str(m) for m in models]
    experts = [f"model.{i}" for i in range(len(refs))]
    layers = {
        str(layer): (dict(w) if isinstance(w, Mapping) else {"*": list(w)}) for layer, w in layer_weights.items()
    }
    meta = {"models": refs, **(meta or {})}
    try:
        mw = MergeWeights(
            mode=mode, experts=experts, layers=layers, tensors=dict(tensors or {}),
            default=list(default) if isinstance(default, Sequence) and not isinstance(default, str) else default,
            meta=meta,
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise UmmError(f"merge weights for {yaml_path.name} are invalid: {e}") from e
    weights_path = Path(weights_path).absolute() if weights_path else yaml_path.with_suffix(".weights.json")
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    mw.save(weights_path)
    config: dict[str, Any] = {
        "merge_method": METHOD_NAME,
        "models": [{"model": ref, "parameters": {"expert": e}} for ref, e in zip(refs, experts, strict=True)],
        "parameters": {"weights_file": str(weights_path)},
    }
    if dtype:
        config["dtype"] = dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    header = (
        f"# umm: learned-weight average of {len(refs)} dense models (merge method {METHOD_NAME}),\n"
        f"# weights in {weights_path.name}. Needs umm's method registered; run it with\n"
        f"#   umm mergekit {yaml_path.name} OUT_DIR     or     umm-mergekit-yaml {yaml_path.name} OUT_DIR\n"
    )
    yaml_path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return yaml_path
