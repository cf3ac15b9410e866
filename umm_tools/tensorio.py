"""Streaming safetensors writer: memory bounded by one tensor, not by one shard.

mergekit's ``TensorWriter`` (and ``save_file``) keep a whole shard in memory until it is flushed, so their
peak memory grows with ``max_shard_size``. When every tensor's name, shape and dtype is known before any
is computed (true for upcycle and collapse: they are fixed by the configs), the safetensors header can be
written first and each tensor's bytes appended as soon as it exists. This writer does exactly that: peak
memory is the largest single tensor, whatever the shard size.

Usage::

    w = StreamingSafetensorsWriter(folder, [(name, shape, dtype), ...], max_shard_size)
    for name, ... in same order: w.write(name, tensor)
    w.close()   # checks everything was written; writes model.safetensors.index.json if sharded
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from umm_tools.errors import UmmError

_DTYPES = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float64": ("F64", 8),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}


def _dtype_info(dtype: Any) -> tuple[str, int]:
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype for safetensors streaming: {dtype}")
    return _DTYPES[key]


class StreamingSafetensorsWriter:
    """Write tensors of a known layout into safetensors shards, one tensor in memory at a time."""

    def __init__(self, folder: str | Path, layout: list[tuple[str, tuple[int, ...], Any]], max_shard_size: int,
                 basename: str = "model", metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Assign tensors to shards in order, starting a new shard when the next tensor would overflow.
        shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            code, itemsize = _dtype_info(dtype)
            n = itemsize
            for d in shape:
                n *= int(d)
            if shards[-1] and max_shard_size > 0 and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(int(d) for d in shape), code, n))
            size += n
        total = len(shards)
        self.total_size = sum(n for shard in shards for *_, n in shard)
        self._order: list[str] = []
        self._expect: dict[str, tuple[int, str, tuple[int, ...], int]] = {}
        self._files = []
        self.weight_map: dict[str, str] = {}
        for idx, shard in enumerate(shards):
            fname = f"{basename}.safetensors" if total == 1 else f"{basename}-{idx + 1:05d}-of-{total:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
            offset = 0
            for name, shape, code, n in shard:
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
                self._order.append(name)
                self._expect[name] = (idx, code, shape, n)
                self.weight_map[name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
            f = open(self.folder / fname, "wb")  # noqa: SIM115 (closed in close())
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            self._files.append(f)
        self._next = 0

    def write(self, name: str, tensor: Any) -> None:
        """Append ``tensor``; tensors must come in layout order with the declared shape and dtype."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise RuntimeError(f"streaming writer: got {name}, expected {want}")
        idx, code, shape, n = self._expect[name]
        if tuple(tensor.shape) != shape or _dtype_info(tensor.dtype)[0] != code:
            raise RuntimeError(f"streaming writer: {name} is {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {code}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
        assert data.nbytes == n
        self._files[idx].write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        """Finish: every declared tensor must have been written; writes the index when sharded."""
        for f in self._files:
            f.close()
        if self._next != len(self._order):
            raise UmmError(f"internal error: only {self._next} of {len(self._order)} tensors were written")
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for f in self._files:
            f.close()
