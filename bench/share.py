"""The workspace share against its alternatives, one guest, side by side.

One micro guest boots with the same N-file tree behind every transport
(today's contract 9p settings on /workspace, candidate 9p settings and
virtio-fs daemons, started exactly as `vmctl up --share virtiofs` starts
them, on /mnt/<mode>), a copy in guest RAM, and the host for scale. QEMU
runs in the user namespace `vmctl up` uses, and the operations run as the
guest's agent, as an agent's would. Each operation runs on every mode in
turn, `--runs` times, so all see the same host load:
  <op>_<mode>_s        median seconds (mode: today, host, ram and the candidates)
  speedup_<op>_<mode>  today / mode
  speedup_<op>         today / chosen (`--chosen`, the contract's virtio-fs)
  share_vs_ram_<op>    chosen / ram (share_vs_ram_<op>_<mode>: every mode's)
  coherent_<mode>      1 if a host edit shows at once in the guest (file held open there)
  coherent_1s_<mode>   1 if it shows within a second
The guest's init runs the bench through an appended initramfs (an extra
inittab line); ops are busybox's, plus the host's `rg`.
Usage: .venv/bin/python bench/share.py [--files 10000] [--runs 3] [--chosen virtiofs]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

XATTR = "security_model=mapped-xattr,fmode=0644,dmode=0755"
BASE = "trans=virtio,version=9p2000.L,access=user,nosuid,nodev"
#: mode -> (QEMU -fsdev options, guest mount options). `today` is the
#: contract's own /workspace mount and is not listed here.
CANDIDATES = {
    "mmap": (XATTR, f"{BASE},msize=262144,cache=mmap"),
    "msize1m": (XATTR, f"{BASE},msize=1048576"),
    "loose": (XATTR, f"{BASE},msize=262144,cache=loose"),
    "secnone": ("security_model=none", f"{BASE},msize=262144"),
}
#: virtio-fs modes -> the daemon's cache mode (vmctl.vm.virtiofs.daemon_argv).
VIRTIOFS = {"virtiofs": "auto", "vfsnone": "none"}
#: name -> guest shell command run inside the tree's parent ($D is the tree).
OPS = {
    "find": "find $D | wc -l",
    "rg": "rg -c zebra $D | wc -l",
    "grep": "grep -rc zebra $D | wc -l",
    "tar": "tar cf - $D | wc -c",
    "cp": "cp -r $D $D.copy",
    "rm": "rm -r $D.copy",
}
#: The same commands on the host, for scale.
HOST_OPS = OPS


def make_tree(root: Path, files: int) -> None:
    """`files` small text files in folders of 100, a few lines each."""
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        word = "zebra" if i % 7 == 0 else "horse"
        (d / f"f{i:05d}.txt").write_text(f"line {i}\n{word} {i * 31}\n" * (1 + i % 20))


def _root(m: str) -> str:
    return {"today": "/workspace", "ram": "/mnt/ram"}.get(m, f"/mnt/{m}")


def guest_script(modes: list[str], runs: int) -> str:
    """The root-run script: mount, copy to RAM, then run the ops as the agent."""
    from vmctl import contract

    lines = [
        "#!/bin/sh",
        "exec >/dev/console 2>&1",
        "while ! grep -qs ' /workspace ' /proc/mounts; do usleep 50000; done",
        "exec 3</dev/ttyS1",
    ]
    vfs = contract.transports()["virtiofs"]  # mounted as the guest's init mounts it
    if any(m in VIRTIOFS for m in modes):
        lines += [f"modprobe -a {' '.join(vfs.modules)} 2>/dev/null"]  # built in: nothing to do
    for m in modes:
        if m in CANDIDATES:
            lines += [f"mkdir -p /mnt/{m}", f"mount -t 9p -o {CANDIDATES[m][1]} {m} /mnt/{m}"]
        elif m in VIRTIOFS:
            mount = f"mount -t {vfs.fstype} -o {vfs.options} {m} /mnt/{m}"
            lines += [f"mkdir -p /mnt/{m}", mount]
    lines += ["mkdir -p /mnt/ram/tree && cp -r /workspace/tree/. /mnt/ram/tree/"]
    lines += ["chown -R agent:agent /mnt/ram", "echo BENCH-START"]
    lines += ["su -s /bin/sh agent -c /bench/ops.sh", "sync; echo BENCH-DONE; poweroff -f"]
    return "\n".join(lines) + "\n"


def ops_script(modes: list[str], runs: int) -> str:
    """The agent's part: every op on every mode, then the coherence probes (fd 3: the host)."""
    lines = ["#!/bin/sh", "now() { cut -d' ' -f1 /proc/uptime; }"]
    for r in range(runs):
        for op, cmd in OPS.items():
            # Each run starts the rotation one mode later: no mode is always first.
            for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
                lines += [
                    f"cd {_root(m)}; D=tree; t0=$(now); {cmd} >/dev/null; t1=$(now)",
                    f'echo "BENCH {op} {m} $(awk "BEGIN{{print $t1-$t0}}")"',
                ]
    # Coherence: the guest holds the file open, the host rewrites it, the
    # guest reads it again by path at once, and again a second later.
    for m in modes:
        if m == "ram":
            continue
        root = _root(m)
        lines += [
            f"cat {root}/probe >/dev/null; sleep 1000 <{root}/probe & h=$!",
            f"echo BENCH-EDIT {m}; read -r ack <&3",
            f'echo "BENCH-SEES {m} $(cat {root}/probe)"; usleep 1200000',
            f'echo "BENCH-SEES1 {m} $(cat {root}/probe)"; kill $h',
        ]
    return "\n".join(lines) + "\n"


def extra_cpio(script: str, ops: str, inittab: str) -> bytes:
    """An initramfs layer: the scripts, an inittab that runs them, and `rg` with its libraries."""
    from vmctl.images.cpio import Archive

    a = Archive()
    a.file("etc/inittab", inittab.encode())
    a.file("bench/run.sh", script.encode(), 0o755)
    a.file("bench/ops.sh", ops.encode(), 0o755)
    rg = shutil.which("rg")
    if rg:
        a.file("usr/bin/rg", Path(rg).read_bytes(), 0o755)
        out = subprocess.run(["ldd", rg], capture_output=True, text=True, check=True).stdout
        for ln in out.splitlines():
            parts = ln.split()
            lib = next((p for p in parts if p.startswith("/")), None)
            if lib:
                a.file(lib.lstrip("/"), Path(lib).read_bytes(), 0o755)
    buf = io.BytesIO()
    a.write(buf)
    return buf.getvalue()


def host_times(tree_parent: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {op: [] for op in HOST_OPS}
    for _ in range(runs):
        for op, cmd in HOST_OPS.items():
            if op == "rg" and not shutil.which("rg"):
                continue
            t0 = time.monotonic()
            subprocess.run(cmd, shell=True, cwd=tree_parent, env={**os.environ, "D": "tree"},
                           stdout=subprocess.DEVNULL, check=True)  # fmt: skip
            out[op].append(time.monotonic() - t0)
    return out


def run_guest(scratch: Path, modes: list[str], runs: int) -> tuple[list[str], dict[str, str]]:
    """Boot the guest, answer its edit prompts, return (console lines, coherence)."""
    from vmctl.images import manifest as images
    from vmctl.images.choose import resolve_image
    from vmctl.images.micro import INITTAB
    from vmctl.vm import accel, idmap, virtiofs
    from vmctl.vm.qemu import SHARED_RAM

    mf = images.load_manifest(resolve_image("micro").path)
    initrd = scratch / "initrd.cpio"
    inittab = "::once:/bench/run.sh\n" + INITTAB
    layer = extra_cpio(guest_script(modes, runs), ops_script(modes, runs), inittab)
    base = mf.initrd.read_bytes()
    initrd.write_bytes(base + b"\0" * (-len(base) % 512) + layer)
    log, ttys1 = scratch / "console.log", scratch / "ttyS1"
    os.mkfifo(f"{ttys1}.in")
    os.mkfifo(f"{ttys1}.out")
    ids = idmap.choose()
    q = accel.qemu_binary()
    machine = "q35" + (f",memory-backend={SHARED_RAM}" if any(m in VIRTIOFS for m in modes) else "")
    argv = [*ids.prefix, q, "-M", machine, "-accel", "tcg", "-cpu", "max", "-m", "2G"]
    argv += ["-smp", "2", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += ["-object", f"memory-backend-memfd,id={SHARED_RAM},size=2G,share=on"]
    argv += ["-kernel", str(mf.kernel), "-initrd", str(initrd)]
    # Two UARTs (the image allows one): ttyS1 carries the host's acks.
    keys = "vmctl.instance=bench vmctl.net=none vmctl.workspace=9p 8250.nr_uarts=2"
    argv += ["-append", f"{mf.cmdline} {keys}"]
    argv += ["-serial", f"file:{log}", "-serial", f"pipe:{ttys1}"]
    argv += ["-fsdev", f"local,id=ws,path={scratch / 'today'},{XATTR}"]
    argv += ["-device", "virtio-9p-pci,fsdev=ws,mount_tag=workspace"]
    daemons = []
    for m in modes:
        if m in CANDIDATES:
            argv += ["-fsdev", f"local,id={m},path={scratch / m},{CANDIDATES[m][0]}"]
            argv += ["-device", f"virtio-9p-pci,fsdev={m},mount_tag={m}"]
        elif m in VIRTIOFS:
            sock = scratch / f"{m}.sock"
            daemons.append(
                virtiofs.start_daemon(
                    ids, scratch / m, sock, scratch / f"{m}.log", detach=False, cache=VIRTIOFS[m]
                )
            )
            argv += ["-chardev", f"socket,id={m},path={sock}"]
            argv += ["-device", f"vhost-user-fs-pci,chardev={m},tag={m},queue-size=1024"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    ack = None
    seen_edits: set[str] = set()
    try:
        deadline = time.monotonic() + 6 * 3600
        while proc.poll() is None and time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            for ln in text.splitlines():
                if ln.startswith("BENCH-EDIT ") and ln not in seen_edits:
                    seen_edits.add(ln)
                    m = ln.split()[1]
                    (scratch / m / "probe").write_text("new\n")
                    if ack is None:
                        ack = open(f"{ttys1}.in", "w")  # noqa: SIM115 - held for the run
                    ack.write("ok\n")
                    ack.flush()
            if "BENCH-DONE" in text:
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(10)
        for d in daemons:
            d.kill()
            d.wait(10)
        if ack:
            ack.close()
    lines = log.read_text(errors="replace").splitlines()
    seen = {
        ("" if ln.startswith("BENCH-SEES ") else "1s_") + ln.split()[1]: ln.split()[2]
        for ln in lines
        if ln.startswith("BENCH-SEES") and len(ln.split()) > 2
    }
    return lines, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chosen", default="virtiofs", help="the mode to compare with today")
    parser.add_argument("--modes", default="today,loose,virtiofs,vfsnone,ram")
    args = parser.parse_args()
    modes = args.modes.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="vshare"))
    os.environ.setdefault("VMCTL_HOME", str(scratch / "h"))
    make_tree(scratch / "today" / "tree", args.files)
    for m in modes:
        if m in CANDIDATES or m in VIRTIOFS:
            shutil.copytree(scratch / "today" / "tree", scratch / m / "tree")
        if m != "ram":
            (scratch / m).mkdir(exist_ok=True)
            (scratch / m / "probe").write_text("old\n")
    shutil.copytree(scratch / "today" / "tree", scratch / "host" / "tree")
    print(f"files={args.files}")
    print(f"loadavg_start={os.getloadavg()[0]:.1f}")
    host = host_times(scratch / "host", args.runs)
    lines, seen = run_guest(scratch, modes, args.runs)
    times: dict[tuple[str, str], list[float]] = {}
    for ln in lines:
        if ln.startswith("BENCH "):
            _, op, m, s = ln.split()
            times.setdefault((op, m), []).append(float(s))
    if not times:
        sys.exit("no BENCH lines:\n" + "\n".join(lines[-30:]))
    med = {k: statistics.median(v) for k, v in times.items()}
    for op in OPS:
        for m in modes:
            if (op, m) in med:
                print(f"{op}_{m}_s={med[op, m]:.2f}")
        if host.get(op):
            print(f"{op}_host_s={statistics.median(host[op]):.3f}")
    for op in OPS:
        chosen, today, ram = (
            med.get((op, args.chosen)),
            med.get((op, "today")),
            med.get((op, "ram")),
        )
        for m in modes:
            if m not in ("today", "ram") and today and med.get((op, m)):
                print(f"speedup_{op}_{m}={today / max(med[op, m], 0.01):.2f}")
            if m != "ram" and ram and (op, m) in med:
                print(f"share_vs_ram_{op}_{m}={med[op, m] / max(ram, 0.01):.1f}")
        if chosen and today:
            print(f"speedup_{op}={today / max(chosen, 0.01):.2f}")
        if chosen and ram:
            print(f"share_vs_ram_{op}={chosen / max(ram, 0.01):.1f}")
    for m, got in seen.items():
        print(f"coherent_{m}={int(got == 'new')}")
    print(f"loadavg_end={os.getloadavg()[0]:.1f}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
