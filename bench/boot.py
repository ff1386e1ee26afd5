"""Boot overhead of `vmctl up` against raw QEMU, exec round trip, vmctl's memory.

One run, side by side, alternating so both see the same host load:
  up_ratio        median(vmctl up --detach -> ready) / median(raw QEMU -> same marker)
                  (raw QEMU gets the very argv vmctl builds, started by this script)
  exec_median_ms  median `vmctl exec NAME -- true` (a fresh CLI process each time)
  exec_inproc_median_ms  the same session through ExecChannel, no process start
  vmctl_rss_mb    RSS of a foreground `vmctl up` while its guest runs
  mirror_listen_to_connect_median_s  a guest's busybox httpd returns from the exec that
                  started it (so after its listen()) -> the host's first page on 127.0.0.1
  mirror_exec_to_connect_median_s    the same from sending that exec (an upper bound)
  review_snapshot_s_per_10k / cp_r_s_per_10k / review_vs_cp_ratio
                  `vmctl up --review`'s snapshot (copy + manifest) of 10,000 small files
                  against a plain `cp -r` of the same tree, alternating, medians
Usage: .venv/bin/python bench/boot.py [--runs 5] [--image micro|MANIFEST]
                                      [--only boot,mirror,review] [--accel auto|tcg|kvm]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The console script, as users run it (`python -m vmctl` adds runpy's cost).
_SCRIPT = Path(sys.executable).with_name("vmctl")
VMCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "vmctl"]


def timed_vmctl_up(env: dict[str, str], ws: Path, manifest: str, name: str) -> float:
    t0 = time.monotonic()
    argv = [*VMCTL, "up", "-d", str(ws), "--image", manifest, "--name", name]
    subprocess.run([*argv, "--net", "none", "--ephemeral", "--detach"], env=env, check=True)
    took = time.monotonic() - t0
    subprocess.run([*VMCTL, "down", name], env=env, check=True, timeout=60)
    return took


def timed_raw_qemu(ws: Path, manifest: str, scratch: Path) -> float:
    from vmctl import contract, paths
    from vmctl.images import manifest as images
    from vmctl.vm import accel
    from vmctl.vm.console import wait_for_marker
    from vmctl.vm.qemu import InstanceSpec, qemu_argv

    ip = paths.InstancePaths(Path(tempfile.mkdtemp(dir=scratch)))
    spec = InstanceSpec(name="raw", workspace=ws)
    qemu = accel.qemu_binary()
    argv = qemu_argv(
        spec, images.load_manifest(Path(manifest)), ip, accel.choose("auto", qemu), qemu
    )
    # vmctl starts QEMU paused (-S) and continues it once attached to the
    # console; raw QEMU just runs.
    argv = [a for a in argv if a != "-S"]
    for n in range(len(contract.exec_ports())):
        for fifo in ip.exec_fifos(n)[:2]:
            os.mkfifo(fifo, 0o600)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_marker(ip.console_log, contract.ready_marker(), 120)
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait(10)


def exec_round_trips(env: dict[str, str], name: str, n: int) -> tuple[float, float]:
    from vmctl.vm.console import ExecChannel

    for _ in range(5):  # warm-up: the guest is still settling right after ready
        subprocess.run([*VMCTL, "exec", name, "--", "true"], env=env, check=True, timeout=30)
    cli = []
    for _ in range(n):
        t0 = time.monotonic()
        # No `timeout=`: with one, subprocess polls the child with sleeps of
        # up to 50 ms and adds ~35 ms to every sample.
        subprocess.run([*VMCTL, "exec", name, "--", "true"], env=env, check=True)
        cli.append(time.monotonic() - t0)
    ip = Path(env["VMCTL_HOME"]) / "instances" / name
    chan = ExecChannel.for_instance(ip, name)
    inproc = []
    for _ in range(n):
        t0 = time.monotonic()
        assert chan.run("true", lambda b: None, timeout=30) == 0
        inproc.append(time.monotonic() - t0)
    return statistics.median(cli) * 1000, statistics.median(inproc) * 1000


def rss_while_running(env: dict[str, str], ws: Path, manifest: str) -> float:
    from vmctl.vm.console import wait_for_marker

    argv = [*VMCTL, "up", "-d", str(ws), "--image", manifest, "--name", "rss", "--net", "none"]
    proc = subprocess.Popen([*argv, "--ephemeral"], env=env, stdin=subprocess.DEVNULL)
    try:
        log = Path(env["VMCTL_HOME"]) / "instances" / "rss" / "console.log"
        wait_for_marker(log, "VMCTL-READY", 120)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kb = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])
        return kb / 1024
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def mirror_latency(
    env: dict[str, str], ws: Path, manifest: str, n: int, accel: str
) -> tuple[float, float]:
    """Medians of (exec return -> host page, exec sent -> host page) over `n` ports."""
    import socket
    import urllib.request

    from vmctl.vm.console import ExecChannel

    argv = [*VMCTL, "up", "-d", str(ws), "--image", manifest, "--name", "mir", "--detach"]
    argv += ["--ephemeral", "--net", "model", "--model-endpoint", "127.0.0.1:9", "--model", "m"]
    argv += ["--accel", accel]
    subprocess.run(argv, env=env, check=True)
    ip = Path(env["VMCTL_HOME"]) / "instances" / "mir"
    chan = ExecChannel.for_instance(ip, "mir")
    chan.run("mkdir -p /tmp/w && echo ok > /tmp/w/index.html", lambda b: None, timeout=30)
    after, total = [], []
    try:
        for _ in range(n):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            t0 = time.monotonic()
            chan.run(f"httpd -p {port} -h /tmp/w", lambda b: None, timeout=30)
            t1 = time.monotonic()
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                        r.read()
                    break
                except OSError:
                    if time.monotonic() - t1 > 30:
                        raise
                    time.sleep(0.01)
            t2 = time.monotonic()
            after.append(t2 - t1)
            total.append(t2 - t0)
            chan.run("killall httpd", lambda b: None, timeout=30)
    finally:
        subprocess.run([*VMCTL, "down", "mir"], env=env, check=False, timeout=60)
    return statistics.median(after), statistics.median(total)


def review_cost(scratch: Path, runs: int) -> tuple[float, float, str]:
    """Medians of (review snapshot, cp -r) for a tree of 10,000 files of 1-4 KiB."""
    import shutil

    from vmctl.review import snapshot

    src = scratch / "tree"
    for i in range(10_000):
        d = src / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(os.urandom(512 + (i % 7) * 512))
    snaps, cps, method = [], [], ""
    for i in range(runs):
        t0 = time.monotonic()
        subprocess.run(["cp", "-r", str(src), str(scratch / f"cp{i}")], check=True)
        cps.append(time.monotonic() - t0)
        shutil.rmtree(scratch / f"cp{i}")
        _, cost = snapshot.create(f"bench{i}", src)
        snaps.append(cost.seconds)
        method = cost.method
        snapshot.drop(f"bench{i}")
    return statistics.median(snaps), statistics.median(cps), method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="micro")
    parser.add_argument("--only", default="boot,mirror,review", help="what to measure")
    parser.add_argument("--accel", default="auto", help="accelerator for the mirror guest")
    args = parser.parse_args()
    only = set(args.only.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="vb"))
    env = {**os.environ, "VMCTL_HOME": str(scratch / "h"), "VMCTL_QUIET": "1"}
    os.environ["VMCTL_HOME"] = env["VMCTL_HOME"]
    from vmctl.images import manifest as images

    manifest = str(images.resolve_image(args.image).path)
    ws = scratch / "ws"
    ws.mkdir()
    if "boot" in only:
        boot_figures(env, ws, manifest, scratch, args.runs)
    if "mirror" in only:
        after, total = mirror_latency(env, ws, manifest, max(args.runs, 5), args.accel)
        print(f"mirror_listen_to_connect_median_s={after:.3f}")
        print(f"mirror_exec_to_connect_median_s={total:.3f}")
    if "review" in only:
        snap, cp, method = review_cost(scratch, max(args.runs, 3))
        print(f"review_snapshot_s_per_10k={snap:.2f}")
        print(f"cp_r_s_per_10k={cp:.2f}")
        print(f"review_vs_cp_ratio={snap / cp:.2f}")
        print(f"review_method={method.split(' ')[0]}")


def boot_figures(env: dict[str, str], ws: Path, manifest: str, scratch: Path, runs: int) -> None:
    ups, raws = [], []
    for i in range(runs):
        raws.append(timed_raw_qemu(ws, manifest, scratch))
        ups.append(timed_vmctl_up(env, ws, manifest, f"b{i}"))
    print(f"up_median_s={statistics.median(ups):.2f}")
    print(f"raw_median_s={statistics.median(raws):.2f}")
    print(f"up_ratio={statistics.median(ups) / statistics.median(raws):.2f}")
    argv = [*VMCTL, "up", "-d", str(ws), "--image", manifest, "--name", "ex", "--net", "none"]
    subprocess.run([*argv, "--detach", "--ephemeral"], env=env, check=True)
    try:
        cli_ms, inproc_ms = exec_round_trips(env, "ex", 25)
    finally:
        subprocess.run([*VMCTL, "down", "ex"], env=env, check=False, timeout=60)
    print(f"exec_median_ms={cli_ms:.0f}")
    print(f"exec_inproc_median_ms={inproc_ms:.0f}")
    print(f"vmctl_rss_mb={rss_while_running(env, ws, manifest):.1f}")


if __name__ == "__main__":
    main()
