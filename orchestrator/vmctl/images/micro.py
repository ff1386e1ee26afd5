"""The micro image: a kernel (vmctl.images.micro_kernel) plus a busybox initramfs built here.

Everything it contains is named in its cache key (kernel package, busybox
and library contents, the init template, the exec agent, the agents), so
`build_micro` rebuilds exactly when an input changes and is a cheap lookup
otherwise. The init is rendered from guest-contract.json, the same file
the NixOS module reads.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from vmctl import contract, paths, ui
from vmctl.errors import ConfigError, VMError
from vmctl.images import micro_agents, micro_kernel
from vmctl.images.cpio import Archive
from vmctl.images.manifest import write_manifest
from vmctl.images.micro_kernel import Kernel, run

REVISION = 6  # bump when the image layout below changes
OPENCODE_VERSION = micro_agents.AGENTS["opencode"].version
KNOWN_AGENTS = tuple(sorted(micro_agents.AGENTS))
#: cryptomgr.notests: the crypto self-tests were the two slowest initcalls
#: under TCG (about 1.8 s of guest time); tsc=reliable: TCG's TSCs look
#: unsynchronised, and the HPET fallback makes every clock read an MMIO exit.
#: lpj= (the second CPU's delay calibration took ~0.2 s; delays use the TSC)
#: and no_timer_check (the IO-APIC timer test) as KVM guests already skip
#: them; two self-tests cryptomgr.notests misses (KDF108, BLAKE2s) and the
#: AppArmor and audit set-up, which nothing in this guest uses; one UART.
CMDLINE = (
    "console=ttyS0 panic=-1 loglevel=4 cryptomgr.notests tsc=reliable"
    " lpj=10400000 no_timer_check initcall_blacklist=crypto_kdf108_init,blake2s_mod_init"
    " apparmor=0 audit=0 8250.nr_uarts=1"
)
BUSYBOX = Path("/bin/busybox")
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")
#: opencode unpacks native add-ons to /tmp that need these; ldd does not show them.
EXTRA_LIBS = ("libstdc++.so.6", "libgcc_s.so.1", "librt.so.1")
_SIG_MARKER = b"~Module signature appended~\n"
INITTAB = """\
::once:/init ready
::respawn:/init agent
::respawn:/init power-button
ttyS0::respawn:/init console
::respawn:/init ports
"""
#: The console login (as `agent`, like the NixOS guest's autologin) sees the
#: same environment as exec'd commands: /etc/vmctl/env read literally.
PROFILE = """\
if [ -r /etc/vmctl/env ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in [A-Za-z_]*=*) key=${line%%=*}
            case $key in *[!A-Za-z0-9_]*) ;; *) export "$line" ;; esac ;; esac
    done </etc/vmctl/env
fi
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
while read -r _ mnt _; do [ "$mnt" = /workspace ] && { cd /workspace; break; }; done </proc/mounts
"""
#: The log console's shell tells the host when it exits, from inside the
#: shell while it still holds the terminal (printed by init afterwards, the
#: line was sometimes lost to the session's hang-up); `vmctl shell` (a pty)
#: does not. The hang-up also discards output the UART has not sent yet,
#: which under a loaded TCG host was the marker itself: `stty` applies its
#: settings only once the output has drained (TCSETSW), so the pair of
#: them waits for the line to reach QEMU and leaves the terminal as it was.
CONSOLE_EXIT = """if [ "$(tty 2>/dev/null)" = /dev/ttyS0 ]; then
    trap 'printf "\\036%s\\n" {marker}; stty -echo; stty echo' EXIT
fi
"""


def guest_file(name: str) -> str:
    """A file of data/guest/ (the init template, the exec agent)."""
    return paths.data_text(f"guest/{name}")


def _fw_cfg_entries(user: dict[str, Any]) -> list[dict[str, Any]]:
    """Each fw_cfg file with numeric owners and the folders to create for it.

    The folders are in the initramfs (`build_archive`); /init writes each
    present file under a umask giving its mode and chowns the agent's in one
    go: a process per file instead of five (each ~15 ms under TCG).
    """
    ids = f"{user['uid']}:{user['gid']}"
    home = Path(user["home"])
    entries = []
    for f in contract.fw_cfg_files():
        parent = Path(f.dest).parent
        dirs = [
            {"path": str(d), "owner": ids}
            for d in [*reversed(parent.parents), parent]
            if home in d.parents
        ]
        if not dirs:
            dirs = [{"path": str(parent), "owner": "0:0"}]
        owner = ids if f.owner == user["name"] else "0:0"
        mode = int(f.mode, 8)
        entry: dict[str, Any] = {"name": f.name, "dest": f.dest, "owner": owner, "mode": f.mode}
        entry["dirs"] = dirs
        # cat creates the file 0666 & ~umask; only execute bits need a chmod.
        entry |= {"umask": f"{0o777 & ~mode:04o}", "chmod": bool(mode & 0o7111)}
        entries.append(entry)
    return entries


def render_init(modules: list[str], agents: tuple[str, ...]) -> str:
    """/init from the template and the contract (pure: testable without a guest).

    `modules` are paths in load order; /init names those it needs at boot
    to one `modprobe -a`, and virtio-fs's only when the workspace uses it.
    """
    c = contract.raw()
    names = [micro_kernel.module_name(m) for m in modules]
    import jinja2  # only when building: `vmctl up` finds a built image without it

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["q"] = lambda s: shlex.quote(str(s))
    shares = [
        {"tag": a.tag, "mountpoint": a.mountpoint, "options": micro_agents.SHARE_OPTIONS}
        for a in (micro_agents.AGENTS[name] for name in agents)
    ]
    return env.from_string(guest_file("micro-init.sh.j2")).render(
        exec_port=c["console"]["exec_port"],
        boot_marker=c["console"]["boot_marker"],
        ready_marker=c["console"]["ready_marker"],
        poweroff_marker=c["console"]["poweroff_marker"],
        console_exit_marker=c["console"]["console_exit_marker"],
        user=c["user"],
        workspace=c["workspace"],
        cmdline=c["kernel_cmdline"],
        network=c["network"],
        mirror=c["mirror"],
        fw_cfg=_fw_cfg_entries(c["user"]),
        modules=[n for n in names if n not in micro_kernel.ON_DEMAND],
        on_demand=[n for n in names if n in micro_kernel.ON_DEMAND],
        transports=contract.transports(),
        shares=shares,
    )


def build_exec_mux() -> bytes:
    """The exec agent's session mux (C, data/guest/), linked statically by the host's cc.

    Static so it needs nothing from the image (the micro image carries no
    libc unless an agent needs one); about 0.8 MB.
    """
    with tempfile.TemporaryDirectory(prefix="vmctl-mux-") as tmp:
        src, out = Path(tmp) / "mux.c", Path(tmp) / "mux"
        src.write_text(guest_file("vmctl-exec-mux.c"))
        hint = "apt-get install gcc libc6-dev (a C compiler and a static libc)"
        run(
            ["cc", "-static", "-Os", "-s", "-o", str(out), str(src)], "compiling the exec mux", hint
        )
        return out.read_bytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def busybox_version() -> str:
    """Debian's busybox-static version; VMError naming the package if absent."""
    hint = "apt-get install busybox-static"
    if not BUSYBOX.is_file():
        raise VMError("busybox not found at /bin/busybox", hint)
    out = run(["dpkg-query", "-W", "-f", "${Version}", "busybox-static"], "busybox-static", hint)
    return out.strip()


def find_lib(soname: str) -> Path:
    for d in LIB_DIRS:
        if (Path(d) / soname).exists():
            return (Path(d) / soname).resolve()
    raise VMError(f"shared library {soname} not found on this host", "apt-get install libstdc++6")


def needed_libs(binaries: list[Path]) -> dict[str, Path]:
    """soname -> host file for the binaries' libraries (ldd) plus EXTRA_LIBS."""
    libs: dict[str, Path] = {}
    for binary in binaries:
        out = run(["ldd", str(binary)], f"ldd {binary.name}", "apt-get install libc-bin")
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs[parts[0]] = Path(parts[2]).resolve()
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                libs["ld-linux-x86-64.so.2"] = Path(parts[0]).resolve()
    for soname in EXTRA_LIBS:
        libs.setdefault(soname, find_lib(soname))
    return dict(sorted(libs.items()))


def build_archive(kernel: Kernel, agents: tuple[str, ...], libs: dict[str, Path]) -> Archive:
    """Every file of the initramfs, owners and modes stated."""
    c = contract.raw()
    uid, gid, home = c["user"]["uid"], c["user"]["gid"], c["user"]["home"]
    a = Archive()
    for d in ("proc", "sys", "dev", "run", "etc/vmctl", "usr/local/bin", "workspace"):
        a.dir(d)
    a.dir("tmp", 0o1777)
    a.dir("root", 0o700)
    a.chardev("dev/console", 5, 1)
    a.file("init", render_init(kernel.load_order(), agents).encode(), 0o755)
    a.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = run(
        [str(BUSYBOX), "--list-full"], "busybox --list-full", "apt-get install busybox-static"
    )
    for applet in applets.split():
        if applet.strip("/") != "bin/busybox":
            a.symlink(applet, "/bin/busybox")
    a.file("etc/inittab", INITTAB.encode())
    a.file(
        "etc/passwd",
        f"root:x:0:0:root:/root:/bin/sh\nagent:x:{uid}:{gid}::{home}:/bin/sh\n".encode(),
    )
    a.file("etc/group", f"root:x:0:\nagent:x:{gid}:\n".encode())
    a.file("etc/hosts", b"127.0.0.1 localhost\n")
    marker = shlex.quote(c["console"]["console_exit_marker"])
    a.file("etc/profile", (PROFILE + CONSOLE_EXIT.format(marker=marker)).encode())
    a.file(
        "usr/libexec/vmctl/vmctl-exec-agent.sh", guest_file("vmctl-exec-agent.sh").encode(), 0o755
    )
    a.file("usr/libexec/vmctl/vmctl-exec-mux", build_exec_mux(), 0o755)
    a.file(
        "usr/libexec/vmctl/vmctl-ports-watch.sh",
        guest_file("vmctl-ports-watch.sh").encode(),
        0o755,
    )
    a.dir(home, 0o755, uid, gid)
    for entry in _fw_cfg_entries(c["user"]):
        for d in entry["dirs"]:
            owner, group = (int(i) for i in d["owner"].split(":"))
            a.dir(d["path"], 0o755, owner, group)
    _add_modules(a, kernel)
    for soname, path in libs.items():
        a.file(f"lib/x86_64-linux-gnu/{soname}", path.read_bytes(), 0o755)
    if libs:
        a.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        a.file("etc/ssl/certs/ca-certificates.crt", _ca_bundle())
    for tool in micro_agents.host_tools(agents):
        a.file(f"usr/bin/{tool.name}", tool.read_bytes(), 0o755)
    for name in agents:
        micro_agents.add_parts(a, micro_agents.AGENTS[name], uid, gid, home)
    return a


def _add_modules(a: Archive, kernel: Kernel) -> None:
    """The modules where busybox modprobe looks, with a modules.dep of no edges.

    /init names every module in dependency order, so modprobe needs no
    edges; one process loads them all.
    """
    order = kernel.load_order()
    for rel in order:
        data = unsigned((kernel.modules_dir / rel).read_bytes())
        a.file(f"lib/modules/{kernel.release}/{rel}", data)
    a.file(f"lib/modules/{kernel.release}/modules.dep", "".join(f"{r}:\n" for r in order).encode())


def unsigned(module: bytes) -> bytes:
    """A module without its appended signature (the bytes that were signed).

    Checking a signature hashes the whole module, in software under TCG;
    an unsigned module skips that (the kernel is not in lockdown and does
    not enforce signatures: it only marks itself tainted).
    """
    if not module.endswith(_SIG_MARKER):
        return module
    end = len(module) - len(_SIG_MARKER) - 12  # struct module_signature
    (sig_len,) = struct.unpack(">I", module[end + 8 : end + 12])
    return module[: end - sig_len]


def _ca_bundle() -> bytes:
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        raise VMError(
            "no CA bundle at /etc/ssl/certs/ca-certificates.crt", "apt-get install ca-certificates"
        )
    return bundle.read_bytes()


def _check_agents(with_agents: tuple[str, ...]) -> tuple[str, ...]:
    agents = tuple(sorted(set(with_agents)))
    for agent in agents:
        if agent not in KNOWN_AGENTS:
            raise ConfigError(
                f"unknown agent {agent!r} for --with", f"choose from {', '.join(KNOWN_AGENTS)}"
            )
    return agents


def own_key(agents: tuple[str, ...]) -> str:
    """A key over the inputs vmctl itself ships (init, exec agent, contract).

    It needs no apt, ldd or hashing of large binaries, so `vmctl up` can
    find a built image in milliseconds; an image built by an older vmctl
    (another init or agent) never matches. `vmctl image build` checks the
    full key, host packages included.
    """
    return _sha(json.dumps(_own_inputs(agents), sort_keys=True).encode())[:16]


def _own_inputs(agents: tuple[str, ...]) -> dict[str, Any]:
    """What vmctl ships into the image: part of both keys."""
    return {
        "revision": REVISION,
        "init": _sha(guest_file("micro-init.sh.j2").encode()),
        "agent": _sha(guest_file("vmctl-exec-agent.sh").encode()),
        "mux": _sha(guest_file("vmctl-exec-mux.c").encode()),
        "ports": _sha(guest_file("vmctl-ports-watch.sh").encode()),
        "profile": _sha((PROFILE + CONSOLE_EXIT).encode()),
        "contract": contract.raw(),
        "cmdline": CMDLINE,
        "agents": {a: micro_agents.AGENTS[a].version for a in agents},
        "kernel_kind": [micro_kernel.kind(), _sha(micro_kernel.guest_config().encode())],
    }


def find_built(agents: tuple[str, ...]) -> Path | None:
    """The newest built micro image for `agents` matching this vmctl, if any."""
    key = own_key(_check_agents(agents))
    found = []
    for manifest in paths.images_dir().glob("micro-*/manifest.json"):
        stamp = manifest.parent / "own-key"
        if stamp.is_file() and stamp.read_text().strip() == key:
            found.append((manifest.stat().st_mtime, manifest))
    return max(found)[1] if found else None


def image_key(inputs: dict[str, Any]) -> str:
    """A short content key over every input (same inputs, same folder)."""
    return _sha(json.dumps(inputs, sort_keys=True).encode())[:16]


def micro_inputs(
    agents: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Path], dict[str, Path]]:
    """Everything the image is made of: (key inputs, libraries, agent shares)."""
    kernel = micro_kernel.kernel_inputs()
    folders = {a: micro_agents.install(micro_agents.AGENTS[a]) for a in agents}
    tools = micro_agents.host_tools(agents)
    natives = [
        f for a, d in folders.items() for f in micro_agents.native_files(micro_agents.AGENTS[a], d)
    ]
    libs = needed_libs([*natives, *tools]) if agents else {}
    inputs = {
        **_own_inputs(agents),
        "kernel": kernel,
        "busybox": [busybox_version(), _sha(BUSYBOX.read_bytes())],
        "libs": {k: _sha(v.read_bytes()) for k, v in libs.items()},
        "extra": [*(_sha(t.read_bytes()) for t in tools), _sha(_ca_bundle())] if agents else [],
    }
    return inputs, libs, folders


def build_micro(with_agents: tuple[str, ...] = (), force: bool = False) -> Path:
    """Build (or reuse) the micro image; returns its manifest path."""
    agents = _check_agents(with_agents)
    inputs, libs, folders = micro_inputs(agents)
    folder = paths.images_dir() / f"micro-{image_key(inputs)}"
    manifest = folder / "manifest.json"
    if manifest.exists() and not force:
        (folder / "own-key").write_text(own_key(agents) + "\n")
        return manifest
    kernel = micro_kernel.get_kernel(inputs["kernel"])
    with ui.step(f"building the micro image{' with ' + ', '.join(agents) if agents else ''}"):
        tmp = Path(tempfile.mkdtemp(prefix=".micro-", dir=paths.images_dir()))
        try:
            shutil.copyfile(kernel.vmlinux, tmp / "vmlinux")
            with open(tmp / "initrd.cpio", "wb") as out:
                build_archive(kernel, agents, libs).write(out)
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
            (tmp / "own-key").write_text(own_key(agents) + "\n")
            shares = [
                {"tag": micro_agents.AGENTS[a].tag, "path": f"../agents/{d.name}", "readonly": True}
                for a, d in folders.items()
            ]
            fields: dict[str, Any] = {"name": "micro", "system": "x86_64-linux"}
            fields |= {"kernel": "vmlinux", "initrd": "initrd.cpio", "cmdline": CMDLINE}
            fields["transports"] = list(contract.transports())
            write_manifest(tmp, {**fields, "shares": shares, "features": list(agents)})
            micro_agents.publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
