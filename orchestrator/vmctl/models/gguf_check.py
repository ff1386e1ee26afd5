"""Check a GGUF file before it may reach llama-server.

Two passes. First a bounded walk of the header written here (struct on a
memory map): magic, version, counts, every length checked against the
file size, and the end of the tensor data computed, so a hostile header
(an array claiming 2^60 items) or a truncated download is refused in
milliseconds with one line. Then ggml's own `gguf.GGUFReader` parses it
again as a second opinion. Neither reads the tensor data itself, so a
multi-GB file is checked as fast as a small one.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from vmctl import paths, state
from vmctl.errors import ModelError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_COUNT = 1 << 24  # tensors or metadata keys: real models have < 100k
HINT = "delete the file and pull it again (`vmctl pull MODEL`)"

# GGUF value types: fixed-size scalars, STRING = 8, ARRAY = 9.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    architecture: str | None  # None for parts 2..N of a split model
    tensor_count: int
    kv_count: int
    size: int
    data_end: int  # where the last tensor's data ends
    split: tuple[int, int] | None  # (index from 0, count) for split models


class _Bad(Exception):
    """Internal: the header walk found a problem (message without the path)."""


class _Short(_Bad):
    pass


class _Walker:
    """A bounded cursor over the header bytes."""

    def __init__(self, buf: mmap.mmap | bytes, size: int):
        self.buf, self.size, self.off = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.off + n > self.size:
            raise _Short("header")
        start, self.off = self.off, self.off + n
        return start

    def u32(self) -> int:
        return int(struct.unpack_from("<I", self.buf, self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack_from("<Q", self.buf, self.take(8))[0])

    def string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def value(self, vtype: int, depth: int = 0) -> object:
        """Read one value; only short strings and ints are kept."""
        if vtype in _SCALAR:
            start = self.take(_SCALAR[vtype])
            fmt = _INT_FMT.get(vtype)
            return None if fmt is None else int(struct.unpack_from(fmt, self.buf, start)[0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth == 0:
            itype, count = self.u32(), self.u64()
            if itype in _SCALAR:
                self.take(_SCALAR[itype] * count)  # bounded by the file size
            elif itype == _STRING:
                if count * 8 > self.size - self.off:
                    raise _Short("header")
                for _ in range(count):
                    self.take(self.u64())
            else:
                raise _Bad(f"unsupported array type {itype}")
            return None
        raise _Bad(f"unknown metadata type {vtype}")


def _tensor_nbytes(ggml_type: int, dims: list[int]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as e:
        raise _Bad(f"unknown tensor type {ggml_type}") from e
    n = 1
    for d in dims:
        n *= d
    return n * type_size // block


def _walk(buf: mmap.mmap | bytes, size: int) -> tuple[int, dict[str, object], int, int]:
    """Walk the header: (version, kept metadata, tensor count, data end)."""
    w = _Walker(buf, size)
    if bytes(buf[:4]) != MAGIC:
        raise _Bad("bad magic")
    w.take(4)
    version = w.u32()
    if version not in VERSIONS:
        raise _Bad(f"unsupported GGUF version {version}")
    n_tensors, n_kv = w.u64(), w.u64()
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise _Bad(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = w.string().decode("utf-8", "replace")
        meta[key] = w.value(w.u32())
    infos: list[tuple[int, int]] = []
    for _ in range(n_tensors):
        w.string()
        n_dims = w.u32()
        if n_dims > 8:
            raise _Bad(f"tensor with {n_dims} dimensions")
        dims = [w.u64() for _ in range(n_dims)]
        ggml_type, offset = w.u32(), w.u64()
        infos.append((offset, _tensor_nbytes(ggml_type, dims)))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Bad("invalid general.alignment")
    data_start = -(-w.off // align) * align
    data_end = max((data_start + off + n for off, n in infos), default=data_start)
    return version, meta, n_tensors, data_end


def check_gguf(path: Path, *, first: bool = True) -> GGUFInfo:
    """Validate `path` as a GGUF file; `first=False` for parts 2..N of a split."""
    path = Path(path)
    what = f"not a GGUF file: {path}"
    if path.is_dir():
        raise ModelError(f"{what} (a directory)", "give the path of a .gguf file")
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise ModelError(f"{what} (empty)", HINT)
            if f.seek(0) != 0 or f.read(4) != MAGIC:
                raise _Bad("bad magic")
            if size < 24:
                raise _Short("header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                version, meta, n_tensors, data_end = _walk(buf, size)
    except _Short:
        msg = f"truncated GGUF: {path} is {size} bytes, its header is cut short"
        raise ModelError(msg, HINT) from None
    except _Bad as e:
        raise ModelError(f"{what} ({e})", HINT) from None
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror}", HINT) from None
    if size < data_end:
        raise ModelError(
            f"truncated GGUF: {path} is {size} bytes, tensor data ends at {data_end}", HINT
        )
    arch = meta.get("general.architecture")
    arch_s = arch.decode("utf-8", "replace") if isinstance(arch, bytes) else None
    split_no, split_count = meta.get("split.no"), meta.get("split.count")
    split = None
    if isinstance(split_no, int) and isinstance(split_count, int) and split_count > 1:
        split = (split_no, split_count)
    if first and not arch_s:
        raise ModelError(f"{what} (no general.architecture)", HINT)
    if first and n_tensors == 0 and split is None:
        raise ModelError(f"{what} (no tensors)", HINT)
    _second_opinion(path, n_tensors)
    return GGUFInfo(path, version, arch_s, n_tensors, len(meta), size, data_end, split)


def file_stamp(path: Path) -> dict[str, int]:
    """What changes whenever the file does (ctime cannot be set back by users)."""
    st = path.stat()
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _stamp_file(path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:32]
    return paths.private_dir(paths.home() / "models" / "gguf-checked") / f"{key}.json"


def _second_opinion(path: Path, n_tensors: int) -> None:
    """Parse the header with ggml's own reader (memory-mapped, data untouched).

    Its Python loops take seconds on a 150k-token vocabulary, so a pass is
    remembered per file identity and skipped until the file changes.
    """
    from gguf import GGUFReader

    stamp, record = file_stamp(path), _stamp_file(path)
    try:
        if state.read_json(record, {"stamp": dict})["stamp"] == stamp:
            return
    except state.StateError:
        pass
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError...
        raise ModelError(f"not a GGUF file: {path} (gguf: {e})", HINT) from None
    if len(reader.tensors) != n_tensors:
        raise ModelError(f"not a GGUF file: {path} (tensor count disagrees)", HINT)
    state.write_json(record, {"path": str(path), "stamp": stamp})
