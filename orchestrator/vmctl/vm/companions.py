"""The processes beside a guest's QEMU: its sidecar and its egress proxy.

Each starts in its own session, so they serve a detached guest and
outlive the `vmctl up` that started them. Each listens at once but starts
up only when `vmctl up` closes its gate, once the guest is ready, so its
Python start-up does not slow the boot (vmctl.sidecars.hold; nothing in a
guest reaches them before it is ready). Each spawn returns the process and
a wait for its socket. vmctl.vm.boot records them; vmctl.vm.instance stops them with
the guest.
"""

from __future__ import annotations

from collections.abc import Callable

from vmctl import paths, procs
from vmctl.errors import VMError
from vmctl.procs import ProcessRef
from vmctl.sidecars import guestlaunch
from vmctl.vm.spec import InstanceRecord, InstanceSpec


def spawn_sidecar(
    ipaths: paths.InstancePaths,
    spec: InstanceSpec,
    max_conns: int,
    gate: int | None = None,
    disk_floor: int = 0,
) -> tuple[ProcessRef, Callable[[], None]]:
    """The guest's sidecar: its model path (net model), the workspace's x bits, its watchdog.

    It exits with QEMU, stops a QEMU whose `vmctl up` died before the guest
    was ready, and pauses the guest below the workspace's `disk_floor`.
    """
    host, port = spec.model_endpoint if spec.net == "model" and spec.model_endpoint else ("", 0)
    config = guestlaunch.SidecarConfig(
        spec.name, str(ipaths.sidecar), str(ipaths.meta), host, port, max_conns,
        # virtio-fs carries real modes itself; only 9p's mapped modes need the reconciler.
        workspace=str(spec.workspace) if spec.share == "9p" else "",
        disk_floor=disk_floor, disk_path=str(spec.workspace),
    )  # fmt: skip
    try:
        proc = guestlaunch.spawn(ipaths, config, gate)
    except OSError as e:
        raise VMError(str(e), f"see {ipaths.sidecar_log}") from None

    def listening() -> None:
        try:
            guestlaunch.listening(ipaths, proc)
        except OSError as e:
            raise VMError(str(e), f"see {ipaths.sidecar_log}") from None

    return procs.hold(proc), listening


def spawn_proxy(
    ipaths: paths.InstancePaths, spec: InstanceSpec, gate: int | None = None
) -> tuple[ProcessRef, Callable[[], None]]:
    """The guest's egress proxy (vmctl.sidecars.proxy_serve), under `--policy`."""
    from vmctl.sidecars import proxy_serve

    proxy_serve.write_connect_script(ipaths.proxy_connect, ipaths.proxy_socket)
    try:
        proc = proxy_serve.spawn_sidecar(
            ipaths.proxy_socket, spec.name, str(spec.policy), spec.resolve,
            ipaths.proxy_log, paths.home(), ipaths.meta, spec.model_endpoint, gate,
        )  # fmt: skip
    except OSError as e:
        raise VMError(str(e)) from None

    def listening() -> None:
        try:
            proxy_serve.listening(proc, ipaths.proxy_socket, ipaths.proxy_log)
        except OSError as e:
            raise VMError(str(e)) from None

    return procs.hold(proc), listening


def stop_sidecar(record: InstanceRecord) -> None:
    if record.sidecar is not None and record.sidecar.alive():
        record.sidecar.terminate(timeout=3.0)


def stop_proxy(record: InstanceRecord) -> None:
    if record.proxy is not None:
        record.proxy.terminate(timeout=5.0)
