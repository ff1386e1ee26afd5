"""Boot a guest: the order of `vmctl up`'s steps, and why each comes where it does.

Everything that can fail on the user's input (accelerator, id mapping, the
share mode, the `-p` ports) is checked before the instance folder is
claimed. The folder and its record exist before any process does, so a
crash at any later step leaves something `reap` can find and clean up.
The sidecar is recorded before QEMU starts; the guest boots with the
sidecars held (vmctl.sidecars.hold), so their own start-up does not compete
with the guest's; `up` returns only once the guest is ready, and on any
failure it leaves nothing behind (Instance.close).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

from vmctl import contract, paths, ui
from vmctl.errors import VMError
from vmctl.procs import ProcessRef
from vmctl.sidecars import floor, guestlaunch, mirror
from vmctl.state import StateError
from vmctl.vm import accel, companions, idmap, virtiofs
from vmctl.vm.instance import Instance, reap_one
from vmctl.vm.qemu import ManifestLike, qemu_argv
from vmctl.vm.spec import InstanceRecord, InstanceSpec, check_forwards_free


def new_instance(spec: InstanceSpec, image: str, notices: list[str] | None = None) -> Instance:
    """Claim the instance folder and record the spec before anything starts."""
    ipaths = paths.instance(spec.name)
    if ipaths.root.exists() and not reap_one(ipaths):
        with contextlib.suppress(StateError):
            if Instance(InstanceRecord.read(ipaths.meta)).alive():
                raise VMError(f"instance {spec.name!r} is running", f"vmctl down {spec.name}")
        # A stopped persistent instance: its folder (and disk) is reused.
    paths.private_dir(ipaths.root)
    record = InstanceRecord.of(
        spec, image, time.time(), ProcessRef.of(os.getpid()), notices=tuple(notices or ())
    )
    inst = Instance(record)
    inst.save()
    return inst


def up(
    spec: InstanceSpec,
    manifest: ManifestLike,
    *,
    image: str = "micro",
    fwcfg: dict[str, bytes] | None = None,
    timeout: float = 120.0,
    detach: bool = False,
    notices: list[str] | None = None,
    max_conns: int = guestlaunch.MAX_CONNS,
) -> Instance:
    """Boot a guest and return it once ready; on any failure nothing is left behind."""
    qemu_bin = accel.qemu_binary()
    acc = accel.choose(spec.accel, qemu_bin, kernel=manifest.kernel)
    ids = idmap.prepare(spec.workspace, [host for host, _ in spec.forwards])
    if spec.share == "virtiofs":
        virtiofs.check(ids, tuple(getattr(manifest, "transports", ("9p",))))
    check_forwards_free([host for host, _ in spec.forwards])
    disk_floor = floor.resolve(spec.workspace, spec.disk_floor)
    inst = new_instance(spec, image, notices)
    gate, opened = os.pipe()  # the sidecars start up when `opened` closes: see below
    try:
        inst.forget_floor()  # a reused persistent folder: its last guard's state is stale
        paths.private_dir(inst.paths.fwcfg)
        for name in spec.fw_cfg:
            (inst.paths.fwcfg / Path(name).name).write_bytes((fwcfg or {})[name])
        for n in range(len(contract.exec_ports())):
            for fifo in inst.paths.exec_fifos(n)[:2]:
                os.mkfifo(fifo, 0o600)
        if spec.share == "virtiofs":  # QEMU connects to the daemon as it starts
            ref = virtiofs.spawn(inst.paths, ids, spec.workspace, detach)
            inst.record = replace(inst.record, virtiofsd=ref)
            inst.save()
        # The sidecar is recorded before QEMU exists: it is what stops a
        # detached guest whose `vmctl up` is killed while it boots, so there
        # is no moment with a QEMU and nobody watching. It and the proxy
        # listen at once but start up when `opened` closes: once the guest
        # is ready and up() is done, or when this process dies
        # (vmctl.sidecars.hold).
        ref, sidecar_listening = companions.spawn_sidecar(
            inst.paths, spec, max_conns, gate, disk_floor
        )
        inst.record = replace(inst.record, sidecar=ref)
        inst.save()
        fd = inst.listen_console()
        argv = qemu_argv(spec, manifest, inst.paths, acc, qemu=qemu_bin, ids=ids, console_fd=fd)
        with ui.step(f"booting {spec.name} ({acc.name}, net {spec.net})"):
            inst.start(argv, detach=detach)
            if acc.reason:  # said while the guest boots
                ui.warn(acc.reason)
            proxy_listening = None
            if spec.policy is not None:
                ref, proxy_listening = companions.spawn_proxy(inst.paths, spec, gate)
                inst.record = replace(inst.record, proxy=ref)
                inst.save()
            os.close(gate)
            gate = -1
            took = inst.wait_ready(timeout)
            sidecar_listening()  # long since: they listened while QEMU and the guest started
            if proxy_listening is not None:
                proxy_listening()
        if spec.mirrors:
            ref = mirror.start(inst.paths, spec.name, [h for h, _ in spec.forwards])
            inst.record = replace(inst.record, mirror_sidecar=ref)
            inst.save()
        how = f"{image}, {acc.name}, net {spec.net}, share {spec.share}"
        inst.event("up", reason="ready", detail=f"{how}, ready in {took:.1f} s")
        if detach:
            inst.release()
    except BaseException as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else "boot_failed"
        inst.close(powerdown_timeout=0, reason=why, detail=getattr(e, "message", None))
        raise
    finally:
        if gate >= 0:
            os.close(gate)
        os.close(opened)  # last: their start-up would slow this process's own
    return inst
