"""Servers and guests by name: one verb set (`stop`, `rm`, `status`) over both kinds.

A name may belong to a model server (servers/NAME/), a guest
(instances/NAME/) or, if the user chose so, to both. The verbs act on what
exists, and a verb that works on one kind only (`down`, `exec`, `console`)
says which verb fits the other (`wrong_kind`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Literal

from vmctl import events, paths
from vmctl.errors import NotFoundError, VmctlError
from vmctl.review import snapshot
from vmctl.serve import server
from vmctl.vm import instance

Kind = Literal["server", "guest", "review"]


def kinds(name: str) -> list[Kind]:
    """What `name` is: a server, a guest, both, or nothing (folders with a record).

    A review copy whose guest is gone (an ephemeral `up --review`, changes
    kept) is a `review` of its own, so `status`, `ls -a` and `rm` all see it.
    """
    found: list[Kind] = []
    if paths.server(name).meta.is_file():
        found.append("server")
    if paths.instance(name).meta.is_file():
        found.append("guest")
    elif snapshot.exists(name):
        found.append("review")
    return found


def kept_reviews() -> list[dict[str, str]]:
    """Review copies whose guest is gone: name and the folder their changes are for."""
    out = []
    for root in sorted(paths.reviews_dir().iterdir()):
        with contextlib.suppress(VmctlError, ValueError):  # a stray or unreadable folder
            if not paths.instance(root.name).meta.is_file() and snapshot.exists(root.name):
                out.append({"name": root.name, "source": str(snapshot.load(root.name).source)})
    return out


def _missing(name: str) -> NotFoundError:
    return NotFoundError(f"nothing named {name!r}", "see `vmctl ls --all`")


def require(name: str) -> list[Kind]:
    """`kinds(name)`, or the one "nothing named" error."""
    found = kinds(name)
    if not found:
        raise _missing(name)
    return found


def wrong_kind(name: str, wanted: Kind, verb: str) -> VmctlError | None:
    """A hint when `name` is not a `wanted` but the other kind: use the verb that fits."""
    found = kinds(name)
    if wanted in found or not found:
        return None
    if found == ["review"]:  # its guest is gone: only the copy's verbs fit
        fits = f"vmctl diff {name}; then vmctl apply {name} or vmctl rm {name}"
        return VmctlError(f"{name} is a kept review copy: nothing runs", fits)
    fits = f"vmctl stop {name}" if verb == "down" else "see `vmctl ls`"
    return VmctlError(f"{name} is a {found[0]}: `vmctl {verb}` is for {wanted}s", fits)


def _running(name: str, kind: Kind) -> bool:
    if kind == "server":
        return any(s.name == name and s.running for s in server.list_servers(True))
    return any(i.name == name and i.running for i in instance.list_instances())


def stop(name: str) -> list[Kind]:
    """Stop whatever runs under `name` (a server's supervisor, a guest's ladder)."""
    found = kinds(name)
    if not found:
        raise _missing(name)
    stopped: list[Kind] = []
    for kind in found:
        if kind == "server" and _running(name, kind):
            server.stop_server(name)
            stopped.append(kind)
        elif kind == "guest" and _running(name, kind):
            instance.down(name)
            stopped.append(kind)
    if found == ["review"]:
        raise VmctlError(
            f"{name} is a kept review copy, nothing runs",
            f"vmctl diff {name}; then vmctl apply {name} or vmctl rm {name}",
        )
    if not stopped:
        raise VmctlError(f"{name} is not running", f"remove it with `vmctl rm {name}`")
    return stopped


def remove(name: str) -> list[Path]:
    """Delete the folders of a stopped server, guest or review copy (logs included)."""
    # A --review guest's copy (reviews/NAME/) is kept after `down` until apply or rm.
    candidates = (paths.server(name).root, paths.instance(name).root, paths.review(name).root)
    roots = [root for root in candidates if root.is_dir()]
    for kind in kinds(name):
        if _running(name, kind):
            raise VmctlError(f"{name} is running", f"stop it first: vmctl stop {name}")
    for root in roots:
        shutil.rmtree(root)
    # An ephemeral guest's events outlive its folder: rm is what ends them.
    removed = roots + events.remove_subject(paths.events_dir(), name)
    if not removed:
        raise _missing(name)
    return removed


def status(name: str) -> list[dict[str, object]]:
    """One status record per kind found under `name`, each with its `kind`."""
    found = kinds(name)
    if not found:
        raise _missing(name)
    out: list[dict[str, object]] = []
    for kind in found:
        if kind == "server":
            info = server.get_server(name)
            data = info.to_json()
            data["state"] = "running" if info.running else "stopped"
        elif kind == "review":
            source = snapshot.load(name).source
            data = {"name": name, "state": "kept (its guest is gone)"}
            data["review"] = f"{source} (vmctl diff {name}; vmctl apply {name})"
        else:
            data = instance.status(name)
            if snapshot.exists(name):
                review = snapshot.load(name).source
                data["review"] = f"{review} (vmctl diff {name}; vmctl apply {name})"
        out.append({"kind": kind, **data})
    return out
