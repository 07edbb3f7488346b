"""Read a GGUF file's header (metadata and tensor table) without loading the model.

Used by `forge models show` and to explain a failed load precisely (not a GGUF, truncated,
unsupported version) instead of repeating llama.cpp's generic "failed to load model".
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_cli.errors import ModelError

MAGIC = b"GGUF"

# GGUF value types -> struct format of a scalar (strings and arrays are handled apart).
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (elements per block, bytes per block), to know where the data must end.
BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17), 40: (64, 36), 41: (128, 18),
}


@dataclass
class GGUFInfo:
    """What a GGUF header says: metadata (large arrays summarised), tensors and sizes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    n_tensors: int
    n_params: int
    file_size: int
    needed_size: int | None  # bytes the tensor table says the file must hold; None if unknown
    tensor_types: dict[int, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def truncated(self) -> bool:
        return self.needed_size is not None and self.file_size < self.needed_size


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ModelError(
                f"{self.path} is truncated: its GGUF header ends at byte {len(self.buf)}, "
                "in the middle of the metadata"
            )
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path} is truncated inside its GGUF header")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("Q")  # not `self.pos += self.take(…)`: take() moves pos itself
        self.pos += n

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, count = self.take("I"), self.take("Q")
            if sub == _STRING:
                # Token lists hold 100k+ strings; keep the count, not the contents.
                for _ in range(count):
                    self.skip_string()
                return f"[{count} strings]"
            if sub in _SCALARS:
                self.pos = self.pos + struct.calcsize("<" + _SCALARS[sub]) * count
                return f"[{count} values]"
            return [self.value(sub) for _ in range(count)]
        raise ModelError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")


def read_info(path: str | Path) -> GGUFInfo:
    """Parse the header of a GGUF file; ModelError saying what is wrong if it is not one.

    >>> read_info("model.gguf").chat_template is not None    # doctest: +SKIP
    True
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size < 24:
                raise ModelError(f"{path} is not a GGUF model: {size} bytes is too short")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a directory, not a GGUF model file") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    try:
        return _parse(_Reader(buf, path), path, size)
    finally:
        buf.close()


def _parse(r: _Reader, path: Path, size: int) -> GGUFInfo:
    magic = bytes(r.buf[:4])
    if magic != MAGIC:
        raise ModelError(f"{path} is not a GGUF model: it starts with {magic!r}, expected b'GGUF'")
    r.pos = 4
    version = r.take("I")
    if version not in (2, 3):
        raise ModelError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.take("I"))
    n_params = 0
    needed = 0
    known = True
    types: dict[int, int] = {}
    for _ in range(n_tensors):
        r.skip_string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        kind, offset = r.take("I"), r.take("Q")
        count = 1
        for d in dims:
            count *= d
        n_params += count
        types[kind] = types.get(kind, 0) + 1
        block = BLOCKS.get(kind)
        if block is None:
            known = False
        else:
            needed = max(needed, offset + count // block[0] * block[1])
    align = metadata.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 else 32
    data_start = (r.pos + align - 1) // align * align
    return GGUFInfo(
        path=path,
        version=version,
        metadata=metadata,
        n_tensors=n_tensors,
        n_params=n_params,
        file_size=size,
        needed_size=data_start + needed if known else None,
        tensor_types=types,
    )


def check_loadable(path: str | Path) -> GGUFInfo:
    """read_info, plus ModelError when the tensor data runs past the end of the file."""
    info = read_info(path)
    if info.truncated:
        raise ModelError(
            f"{info.path} is truncated: its tensors need {info.needed_size} bytes, "
            f"the file has {info.file_size}",
            hint="delete it and download it again: `forge models rm NAME`, "
            "then `forge models pull NAME`",
        )
    return info
