"""GPU grants: which kinds a llama-server build needs, and how a profile states them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import need
from vmctl.errors import SandboxError
from vmctl.sandbox import gpu, policy
from vmctl.sandbox.launch import SandboxContext
from vmctl.sandbox.resolve import resolve


@pytest.fixture(scope="module")
def vulkan_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ELF linked against a library named like the Vulkan loader."""
    need(shutil.which("cc") is not None, "a C compiler (build-essential)")
    d = tmp_path_factory.mktemp("elf")
    (d / "stub.c").write_text("int vkStub(void) { return 0; }\n")
    (d / "main.c").write_text("int vkStub(void);\nint main(void) { return vkStub(); }\n")
    cc = ["cc", "-o", str(d / "libvulkan.so.1"), "-shared", "-fPIC", str(d / "stub.c")]
    subprocess.run([*cc, "-Wl,-soname,libvulkan.so.1"], check=True)
    subprocess.run(
        ["cc", "-o", str(d / "llama-server"), str(d / "main.c"), str(d / "libvulkan.so.1")],
        check=True,
    )
    return d / "llama-server"


def test_needed_libraries_read_from_the_elf(vulkan_build: Path) -> None:
    assert "libvulkan.so.1" in gpu.needed_libraries(vulkan_build)
    assert gpu.kinds_of(vulkan_build) == ("vulkan",)
    assert gpu.choose(vulkan_build, None) == ("vulkan",)
    assert gpu.choose(vulkan_build, False) == ()


def test_cpu_build_and_non_elf_have_no_gpu(tmp_path: Path, llama_server_bin: Path) -> None:
    assert "libc.so.6" in gpu.needed_libraries(llama_server_bin)
    assert gpu.kinds_of(llama_server_bin) == ()
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\n")
    assert gpu.needed_libraries(script) == []
    truncated = tmp_path / "t"
    truncated.write_bytes(llama_server_bin.read_bytes()[:80])
    assert gpu.needed_libraries(truncated) == []


def test_shipped_profile_states_each_kind() -> None:
    pol = policy.load("llama-server")
    for kind in policy.GPU_KINDS:
        rules = pol.gpu_rules(kind)
        assert rules is not None and rules.devices, kind
        assert all(d.removeprefix("?").startswith("/dev/") for d in rules.devices)
    assert "/dev/nvidia[0-9]*" in pol.gpu_rules("nvidia").devices  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('[gpu.cuda]\ndevices = ["/dev/nvidia0"]', "unknown GPU kind"),
        ('[gpu.nvidia]\ndevices = ["/etc/passwd"]', "not a path under /dev"),
        ('[gpu.nvidia]\ndevices = ["/dev/../etc"]', "not a path under /dev"),
        ('[gpu.nvidia]\nwrite = ["/tmp"]', "unknown key 'write'"),
        ('[gpu.nvidia]\nenv = ["HF_TOKEN"]', "looks like a credential"),
    ],
)
def test_gpu_tables_are_parsed_strictly(tmp_path: Path, table: str, words: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(f'description = "x"\n{table}\n')
    with pytest.raises(Exception, match=words):
        policy.load_file(f)


def test_missing_driver_is_one_clear_error(tmp_path: Path) -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this host has an NVIDIA driver")
    ctx = SandboxContext(
        binary=Path("/bin/true"), cache=tmp_path, runtime=tmp_path, gpu=("nvidia",)
    )
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    ctx = SandboxContext(
        binary=Path("/bin/true"), cache=tmp_path, runtime=tmp_path, model=(model,), gpu=("nvidia",)
    )
    with pytest.raises(SandboxError, match="is the GPU driver loaded"):
        resolve(policy.load("llama-server"), ctx, "linux")
    # macOS needs no grant (Metal is in the [darwin] table): nothing to check there.
    assert resolve(policy.load("llama-server"), ctx, "darwin", strict=False).devices == ()


def test_serve_gpu_without_any_gpu_is_one_line(tmp_path: Path, llama_server_bin: Path) -> None:
    if gpu.host_kinds():
        pytest.skip("this host has a GPU")
    from vmctl.serve import server

    with pytest.raises(Exception, match="neither llama-server nor this host shows a GPU"):
        server.gpu_kinds(llama_server_bin, True)
    assert server.gpu_kinds(llama_server_bin, None) == ()
