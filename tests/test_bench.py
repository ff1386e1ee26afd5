"""The guest benchmarks still run end to end, at their smallest size.

Benchmarks are run by hand and their figures recorded in the README; this
only keeps bench/share.py, bench/boot.py and bench/serve.py from rotting
(share.py once lost its guest's second UART to a boot speed-up, and an
import to a module move, unnoticed). It checks that every figure is
printed for real guests and servers, not what the figures are: timing
belongs to the benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need
from vmctl.vm import virtiofs

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_share_bench_prints_every_figure_for_both_transports(tmp_path: Path) -> None:
    need(virtiofs.find_daemon() is not None, "virtiofsd (qemu-system-common)")
    env = {**os.environ, "VMCTL_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "share.py"), "--files", "40", "--runs", "1",
         "--modes", "today,virtiofs,ram"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    figures = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    for op in ("find", "rg", "grep", "tar", "cp", "rm"):
        host = [f"{op}_host_s"] if op != "rg" or shutil.which("rg") else []  # rg: if installed
        for key in (f"{op}_today_s", f"{op}_virtiofs_s", f"{op}_ram_s", *host):
            assert float(figures[key]) >= 0, key  # a 40-file RAM copy may take 0.00 s
        assert float(figures[f"speedup_{op}"]) > 0 and float(figures[f"share_vs_ram_{op}"]) > 0
    assert figures["coherent_today"] == "1" and figures["coherent_1s_virtiofs"] == "1"


def test_boot_bench_prints_every_figure(tmp_path: Path) -> None:
    """One vmctl and one raw boot (the same argv, console fd included), the breakdown, exec."""
    env = {**os.environ, "VMCTL_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "boot.py"), "--only", "boot,breakdown",
         "--runs", "1"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    figures = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    timed = ("up_median_s", "raw_median_s", "up_ratio", "up_ratio_paired", "up_cpu_ratio")
    timed += ("exec_median_ms",)
    phases = [f"boot_{p}_s" for p in ("firmware", "kernel", "init", "userspace", "total")]
    for key in (*timed, *phases):
        assert float(figures[key]) > 0, key
    assert 0 < float(figures["up_before_qemu_s"]) < float(figures["up_median_s"])
    assert float(figures["vmctl_rss_mb"]) > 0


def test_serve_bench_prints_every_figure(tmp_path: Path, llama_server_bin: Path) -> None:
    """The gateway's ceiling (stand-in server), then two real sandboxed servers of the model."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "VMCTL_LLAMA_SERVER": str(llama_server_bin)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--rounds", "1", "--tokens", "8"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    figures = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    for key in (
        "ceiling_chunks_ratio", "guest_conn_kb", "gateway_ratio", "sandbox_ratio",
        "ttft_ratio", "gateway_tokens_per_s", "serve_to_healthy_s",
    ):  # fmt: skip
        assert float(figures[key]) > 0, key
    float(figures["ttfb_added_median_ms"])  # a difference: may come out below zero
