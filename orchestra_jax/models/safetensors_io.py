"""A streaming reader and writer for the safetensors format.

The `safetensors` package memory-maps whole files; every page it touches stays in this process's RSS until
the file is closed, so loading an 8B checkpoint through it costs the checkpoint's bytes on top of the
params. Reading each tensor with `readinto` into its own buffer keeps host memory at one tensor beyond the
destination, and writing tensor by tensor never holds a whole shard. Format: 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}} padded with spaces, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file (and tensor)."""


class SafetensorsFile:
    """The header of one file; `read(name)` returns one tensor as a fresh numpy array."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise SafetensorsError(f"{self.path}: corrupt safetensors header length {header_len}")
                header = json.loads(f.read(header_len))
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not an object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name!r}: bad header entry {info!r}") from None
            if (
                end - begin != dtype.itemsize * int(np.prod(shape))
                or begin < 0
                or self._data_start + end > size
            ):
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r}: byte range [{begin}, {end}) does not fit its shape or the file"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise SafetensorsError(f"{self.path}: tensor {name!r}: file truncated")
        return out


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors named in `specs` (in that order), calling `produce(name)` for one at a time. Returns bytes."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    order = []
    for name, dtype, shape in specs:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
        header[name] = {
            "dtype": CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        order.append((name, np.dtype(dtype), tuple(shape)))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in order:
            array = np.ascontiguousarray(produce(name))
            if array.dtype != dtype or array.shape != shape:
                raise ValueError(
                    f"{path}: tensor {name!r} is {array.dtype}{array.shape}, expected {dtype}{shape}"
                )
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offset
