"""A seccomp filter that keeps special files and mode bits out of a folder.

Used for the workspace's virtio-fs daemon (vmctl.vm.virtiofs): the daemon
creates what the guest asks for, and a hostile guest asks for setuid
binaries, fifos and device nodes. The user namespace it runs in already
stops device nodes and foreign owners; this filter refuses, with EPERM,
every `mknod` (fifos, sockets, devices) and every chmod, create or mkdir
whose mode carries a setuid, setgid or sticky bit. Symlinks and hard links
are allowed: the guest resolves them itself, inside the guest. `getgroups`
answers "none" (see NONE).

The program is classic BPF built here (no libseccomp binding is needed),
for x86_64 and aarch64; any other ABI of the same kernel (i386, x32) is
killed. `install()` runs in the child between fork and exec, so the filter
holds for the daemon and everything it execs.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

#: AUDIT_ARCH_* and, per syscall, the rule: DENY, NOSYS, ("mode", N): deny
#: when argument N has a bit of 07000, or ("create", F, M): the same for
#: argument M when argument F (open flags) creates (O_CREAT or O_TMPFILE).
Rule = tuple[str, int, int]
DENY: Rule = ("deny", 0, 0)
NOSYS: Rule = ("nosys", 0, 0)
#: getgroups answers 0 groups: QEMU's virtiofsd drops supplementary groups at
#: start and exits when it cannot, and an unprivileged user namespace may not
#: (its setgroups is denied); the groups stay, and only widen nothing.
NONE: Rule = ("none", 0, 0)
ARCHES: dict[str, tuple[int, dict[int, Rule]]] = {
    "x86_64": (
        0xC000003E,
        {
            133: DENY,  # mknod
            259: DENY,  # mknodat
            90: ("mode", 1, 0),  # chmod
            91: ("mode", 1, 0),  # fchmod
            268: ("mode", 2, 0),  # fchmodat
            452: ("mode", 2, 0),  # fchmodat2
            83: ("mode", 1, 0),  # mkdir
            258: ("mode", 2, 0),  # mkdirat
            85: ("mode", 1, 0),  # creat
            2: ("create", 1, 2),  # open
            257: ("create", 2, 3),  # openat
            437: NOSYS,  # openat2: its mode hides in a struct; callers fall back to openat
            115: NONE,  # getgroups
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            33: DENY,  # mknodat
            52: ("mode", 1, 0),  # fchmod
            53: ("mode", 2, 0),  # fchmodat
            452: ("mode", 2, 0),  # fchmodat2
            34: ("mode", 2, 0),  # mkdirat
            56: ("create", 2, 3),  # openat
            437: NOSYS,  # openat2
            158: NONE,  # getgroups
        },
    ),
}
SPECIAL_BITS = 0o7000
CREATES = 0o100 | 0o20000000  # O_CREAT | __O_TMPFILE (the same on both arches)
X32_BIT = 0x40000000

LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL = 0x7FFF0000, 0x80000000
EPERM, ENOSYS = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
ERRNO_ZERO = 0x00050000  # SECCOMP_RET_ERRNO with 0: the call is skipped and returns 0
NR, ARCH = 0, 4


def _arg(n: int) -> int:
    """Offset of the low 32 bits of argument n in struct seccomp_data (little-endian)."""
    return 16 + 8 * n


class _Asm:
    """Just enough of a BPF assembler: forward jumps to named labels."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, int, object, object]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.ops.append((code, k, jt, jf))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ops)

    def assemble(self) -> bytes:
        out = b""
        for i, (code, k, jt, jf) in enumerate(self.ops):
            rel = [self.labels[j] - i - 1 if isinstance(j, str) else int(str(j)) for j in (jt, jf)]
            if not all(0 <= r < 256 for r in rel):
                raise ValueError(f"jump out of range at {i}")
            out += struct.pack("<HBBI", code, rel[0], rel[1], k)
        return out


def program(arch: str) -> bytes:
    """The filter for `arch` (a `platform.machine()` name) as sock_filter structs."""
    if arch not in ARCHES:
        raise ValueError(f"no seccomp filter for {arch}")
    audit, rules = ARCHES[arch]
    a = _Asm()
    a.op(LD_ABS, ARCH)
    a.op(JEQ, audit, 0, "kill")
    a.op(LD_ABS, NR)
    if arch == "x86_64":
        a.op(JGE, X32_BIT, "kill", 0)
    for nr in sorted(rules):
        a.op(JEQ, nr, f"rule{nr}", 0)
    a.op(RET, ALLOW)
    for nr, rule in sorted(rules.items()):
        a.label(f"rule{nr}")
        kind, first, second = rule
        if kind == "deny":
            a.op(RET, EPERM)
        elif kind == "nosys":
            a.op(RET, ENOSYS)
        elif kind == "none":
            a.op(RET, ERRNO_ZERO)
        elif kind == "mode":
            a.op(LD_ABS, _arg(first))
            a.op(JSET, SPECIAL_BITS, "deny", "allow")
        else:  # create
            a.op(LD_ABS, _arg(first))
            a.op(JSET, CREATES, 0, "allow")
            a.op(LD_ABS, _arg(second))
            a.op(JSET, SPECIAL_BITS, "deny", "allow")
    a.label("allow")
    a.op(RET, ALLOW)
    a.label("deny")
    a.op(RET, EPERM)
    a.label("kill")
    a.op(RET, KILL)
    return a.assemble()


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ARCHES


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(prog: bytes | None = None) -> None:
    """Apply the filter to this process (no_new_privs first); OSError if the kernel refuses.

    Meant for a child between fork and exec (subprocess's preexec_fn).
    """
    prog = prog if prog is not None else program(platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(prog)
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
