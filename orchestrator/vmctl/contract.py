"""The guest contract, read from the one JSON file both sides use.

`data/guest-contract.json` is read here by the host and by
`nixos-modules/guest.nix` (`builtins.fromJSON`) for the NixOS guest, and
the micro image's init is rendered from it: one source, no copies.
docs/guest-contract.md explains each field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from vmctl import paths


@cache
def raw() -> dict[str, Any]:
    """The contract as parsed JSON."""
    text = paths.data_text("guest-contract.json")
    data: dict[str, Any] = json.loads(text)
    return data


@dataclass(frozen=True)
class FwCfgFile:
    name: str
    dest: str
    owner: str
    mode: str


def fw_cfg_files() -> list[FwCfgFile]:
    return [FwCfgFile(**f) for f in raw()["fw_cfg"]["files"]]


def fw_cfg(key: str) -> FwCfgFile:
    """The fw_cfg entry whose name ends with `key` (e.g. 'opencode.json')."""
    for f in fw_cfg_files():
        if f.name == raw()["fw_cfg"]["prefix"] + key:
            return f
    raise KeyError(key)


def exec_ports() -> list[str]:
    """The exec ports' names: `<exec_port>.N`, one session each."""
    console = raw()["console"]
    return [f"{console['exec_port']}.{n}" for n in range(int(console["exec_sessions"]))]


def ready_marker() -> str:
    return str(raw()["console"]["ready_marker"])


def workspace_tag() -> str:
    return str(raw()["workspace"]["tag"])


@dataclass(frozen=True)
class Transport:
    """How the guest mounts the workspace over one transport (9p, virtio-fs)."""

    name: str
    fstype: str
    options: str
    #: Kernel modules the guest loads for it (dependencies resolved by each image).
    modules: tuple[str, ...]


def transports() -> dict[str, Transport]:
    """The workspace transports the contract defines, by name."""
    ws = raw()["workspace"]
    return {
        name: Transport(name, t["fstype"], t["options"], tuple(t["modules"]))
        for name, t in ws["transports"].items()
    }


def default_transport() -> str:
    return str(raw()["workspace"]["default_transport"])
