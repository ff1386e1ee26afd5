"""Boot overhead of `vmctl up` against raw QEMU, exec round trip, vmctl's memory.

One run, side by side, alternating so both see the same host load:
  up_ratio        median(vmctl up --detach -> ready) / median(raw QEMU -> same marker)
                  (raw QEMU gets the very argv vmctl builds, started by this script)
  up_ratio_paired median of each vmctl boot / the raw boot run just before it
                  (a shared host's speed drifts by up to a third within an hour)
  up_before_qemu_s  of that, the median from vmctl's start to QEMU's (10 ms clock ticks)
  up_cpu_ratio    the same with CPU seconds (vmctl's own plus its QEMU's, against QEMU's):
                  steadier than wall time when other work shares the host
  boot_<phase>_s / boot_<phase>_cpu_s  where a raw boot's time goes, wall and QEMU's
                  CPU time, from a run with `loglevel=7`: firmware (QEMU start to the
                  kernel's first line), kernel (to `Run /init`), init (to VMCTL-BOOTED),
                  userspace (modules, mounts, fw_cfg, exec agent: to VMCTL-READY), total
  loadavg         the host's 1-minute load average at the end
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
                                      [--only boot,breakdown,mirror,review] [--accel ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The console script, as users run it (`python -m vmctl` adds runpy's cost).
_SCRIPT = Path(sys.executable).with_name("vmctl")
VMCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "vmctl"]


def timed_vmctl_up(
    env: dict[str, str], ws: Path, manifest: str, name: str
) -> tuple[float, float, float]:
    """(wall s, CPU s of vmctl and its QEMU, s from vmctl's start to QEMU's) to ready."""
    import json
    import resource

    from vmctl import paths

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    argv = [*VMCTL, "up", "-d", str(ws), "--image", manifest, "--name", name]
    proc = subprocess.Popen([*argv, "--net", "none", "--ephemeral", "--detach"], env=env)
    started = start_ticks(proc.pid)
    if proc.wait() != 0:
        raise SystemExit(f"vmctl up failed with status {proc.returncode}")
    took = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta = paths.InstancePaths(Path(env["VMCTL_HOME"]) / "instances" / name).meta
    qemu_pid = int(json.loads(meta.read_text())["qemu"]["pid"])
    cpu = cpu_seconds(qemu_pid) + sum(
        getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime")
    )
    before_qemu = (start_ticks(qemu_pid) - started) / os.sysconf("SC_CLK_TCK")
    subprocess.run([*VMCTL, "down", name], env=env, check=True, timeout=60)
    return took, cpu, before_qemu


def start_ticks(pid: int) -> int:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat's 22nd field)."""
    return int(stat_fields(pid)[19])


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def raw_argv(
    ws: Path, manifest: str, scratch: Path, append: str = ""
) -> tuple[list[str], Path, list[socket.socket]]:
    """The argv `vmctl up` builds (user namespace included); its console log and sockets.

    The console is bound and connected as vmctl does (console.listen):
    QEMU waits for that connection, and the caller passes the listener on.
    """
    from vmctl import contract, paths
    from vmctl.images.manifest import load_manifest
    from vmctl.vm import accel, console, idmap
    from vmctl.vm.qemu import qemu_argv
    from vmctl.vm.spec import InstanceSpec

    ip = paths.InstancePaths(Path(tempfile.mkdtemp(dir=scratch)))
    spec = InstanceSpec(name="raw", workspace=ws)
    qemu = accel.qemu_binary()
    mf = load_manifest(Path(manifest))
    acc = accel.choose("auto", qemu, kernel=mf.kernel)
    listener, client = console.listen(ip.console)
    argv = qemu_argv(spec, mf, ip, acc, qemu, ids=idmap.choose(), console_fd=listener.fileno())
    if append:
        i = argv.index("-append") + 1
        argv[i] = f"{argv[i]} {append}"
    for n in range(len(contract.exec_ports())):
        for fifo in ip.exec_fifos(n)[:2]:
            os.mkfifo(fifo, 0o600)
    return argv, ip.console_log, [listener, client]


def spawn_raw(argv: list[str], socks: list[socket.socket]) -> subprocess.Popen[bytes]:
    """Start raw QEMU with the console listener, its console read as vmctl reads it.

    The queued connection stays open and a thread drains it, as pexpect
    does under `vmctl up`: a console nobody reads, or one that hung up,
    would make QEMU's UART retry and the raw boot slower than vmctl's.
    """
    import threading

    quiet = subprocess.DEVNULL
    proc = subprocess.Popen(
        argv, stdin=quiet, stdout=quiet, stderr=quiet, pass_fds=(socks[0].fileno(),)
    )
    listener, client = socks
    listener.close()

    def drain() -> None:
        with client, contextlib.suppress(OSError):  # QEMU killed: the console ends
            while client.recv(65536):
                pass

    threading.Thread(target=drain, daemon=True).start()
    return proc


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid` and its live children."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = stat_fields(p)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


#: Console lines that close each phase of the boot breakdown, in order.
PHASES = (
    ("firmware", "Linux version"),
    ("kernel", "Run /init"),
    ("init", "VMCTL-BOOTED"),
    ("userspace", "VMCTL-READY"),
)


def boot_breakdown(ws: Path, manifest: str, scratch: Path) -> dict[str, tuple[float, float]]:
    """phase -> (wall s, QEMU CPU s) of one raw boot with the kernel's messages shown."""
    argv, log, socks = raw_argv(ws, manifest, scratch, "loglevel=7")
    t0 = time.monotonic()
    proc = spawn_raw(argv, socks)
    marks: list[tuple[float, float]] = []
    try:
        while len(marks) < len(PHASES) and time.monotonic() - t0 < 300:
            text = log.read_text(errors="replace") if log.exists() else ""
            while len(marks) < len(PHASES) and PHASES[len(marks)][1] in text:
                marks.append((time.monotonic() - t0, cpu_seconds(proc.pid)))
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait(10)
    out, prev = {}, (0.0, 0.0)
    for (name, _), mark in zip(PHASES, marks, strict=False):
        out[name] = (mark[0] - prev[0], mark[1] - prev[1])
        prev = mark
    out["total"] = prev
    return out


def timed_raw_qemu(ws: Path, manifest: str, scratch: Path) -> tuple[float, float]:
    from vmctl import contract
    from vmctl.vm.console import wait_for_marker

    argv, console_log, socks = raw_argv(ws, manifest, scratch)
    t0 = time.monotonic()
    proc = spawn_raw(argv, socks)
    try:
        wait_for_marker(console_log, contract.ready_marker(), 120)
        return time.monotonic() - t0, cpu_seconds(proc.pid)
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
    parser.add_argument("--only", default="boot,breakdown,mirror,review", help="what to measure")
    parser.add_argument("--accel", default="auto", help="accelerator for the mirror guest")
    args = parser.parse_args()
    only = set(args.only.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="vb"))
    env = {**os.environ, "VMCTL_HOME": str(scratch / "h"), "VMCTL_QUIET": "1"}
    os.environ["VMCTL_HOME"] = env["VMCTL_HOME"]
    from vmctl.images.choose import resolve_image

    manifest = str(resolve_image(args.image).path)
    ws = scratch / "ws"
    ws.mkdir()
    if "boot" in only:
        boot_figures(env, ws, manifest, scratch, args.runs)
    if "breakdown" in only:
        phases: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            for name, took in boot_breakdown(ws, manifest, scratch).items():
                phases.setdefault(name, []).append(took)
        for name, took in phases.items():
            print(f"boot_{name}_s={statistics.median(t[0] for t in took):.2f}")
            print(f"boot_{name}_cpu_s={statistics.median(t[1] for t in took):.2f}")
    print(f"loadavg={os.getloadavg()[0]:.1f}")
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
    up_s, raw_s = statistics.median(u[0] for u in ups), statistics.median(r[0] for r in raws)
    up_cpu, raw_cpu = statistics.median(u[1] for u in ups), statistics.median(r[1] for r in raws)
    print(f"up_median_s={up_s:.2f}")
    print(f"raw_median_s={raw_s:.2f}")
    print(f"up_ratio={up_s / raw_s:.2f}")
    # Each vmctl boot against the raw boot just before it: steadier than the
    # ratio of medians when the host's speed drifts during the run.
    paired = statistics.median(u[0] / r[0] for u, r in zip(ups, raws, strict=True))
    print(f"up_ratio_paired={paired:.2f}")
    print(f"up_cpu_s={up_cpu:.2f}")
    print(f"raw_cpu_s={raw_cpu:.2f}")
    print(f"up_cpu_ratio={up_cpu / raw_cpu:.2f}")
    print(f"up_before_qemu_s={statistics.median(u[2] for u in ups):.2f}")
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
