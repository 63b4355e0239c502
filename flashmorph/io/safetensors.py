"""safetensors one tensor at a time: a writer whose header is planned up front, and a reader with one-line errors.

The writer lets reshard fill several files (one per TP rank) in step while only the tensor in hand is in memory.
"""

import json
import os
import sys
from pathlib import Path

import torch

from flashmorph.errors import CheckpointError

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
_HEADER_ALIGN = 8  # safetensors pads its header so tensor data starts aligned


def dtype_of(code: str) -> torch.dtype:
    if code not in _DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {code}")
    return _DTYPES[code]


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """Writes `path` in the safetensors format for the tensors `plan` declares ({name: (shape, dtype)}, in order).

    Call `write(name, tensor)` once per name in plan order, then `close()`; only the tensor passed is held.
    """

    def __init__(self, path: str | os.PathLike, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise CheckpointError("safetensors stores little-endian data; this host is big-endian")
        self.path = Path(path)
        self._plan = list(plan.items())
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, (shape, dtype) in self._plan:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % _HEADER_ALIGN)
        self._file = open(self.path, "wb")
        self._file.write(len(encoded).to_bytes(8, "little") + encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, (shape, dtype) = self._plan[self._next]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CheckpointError(f"{self.path.name}: got {name} {list(tensor.shape)} {tensor.dtype}, planned "
                                  f"{expected} {list(shape)} {dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._plan):
            raise CheckpointError(f"{self.path.name}: wrote {self._next} of {len(self._plan)} planned tensors")

    def abort(self) -> None:
        """Close without the completeness check (the staging directory holding the file is thrown away)."""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsFile:
    """A lazily read safetensors file: header checked on open (so truncation is caught), tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file {self.path} does not exist; the checkpoint is incomplete")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self.specs = {}
            for name in self._handle.keys():
                piece = self._handle.get_slice(name)
                self.specs[name] = (tuple(piece.get_shape()), dtype_of(piece.get_dtype()))
            self.metadata = self._handle.metadata() or {}
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises SafetensorError, OSError or RuntimeError depending on damage
            raise _damaged(self.path, err) from err

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as err:
            raise _damaged(self.path, err) from err


def _damaged(path: Path, err: Exception) -> CheckpointError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"corrupted or truncated safetensors file {path} ({reason}); re-create it from its source")
