"""The guest's only way out under `--net model`, one process per connection.

QEMU's `guestfwd=...-cmd:RELAY` starts RELAY for each TCP connection the
guest opens to 10.0.2.2:8080 and speaks that stream on its stdin/stdout.
The relay connects to the model endpoint, copies both ways until both
sides are done, then appends one JSON line to the instance's audit log:
what went where, how much, for how long, and the HTTP request line when
the guest spoke HTTP. It is started as
`python -m vmctl.sidecars.relay --target HOST:PORT --audit FILE --instance NAME`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import socket
import sys
import time
from pathlib import Path

CHUNK = 65536
CONNECT_TIMEOUT_S = 5.0
REQUEST_LINE_RE = re.compile(rb"^([A-Z]{3,10}) (\S{1,2048}) (HTTP/\d(?:\.\d)?)\r?\n")


def request_line(head: bytes) -> str | None:
    """The HTTP request line if the first bytes look like HTTP, else None."""
    m = REQUEST_LINE_RE.match(head)
    return m.group(0).decode("ascii", "replace").strip() if m else None


def pump(guest_in: int, guest_out: int, upstream: socket.socket) -> tuple[int, int, bytes]:
    """Copy guest<->upstream until the model closes; (bytes_in, bytes_out, head).

    bytes_out counts guest -> model, bytes_in model -> guest; head keeps the
    first bytes the guest sent, for the audit's request line.
    """
    sel = selectors.DefaultSelector()
    sel.register(guest_in, selectors.EVENT_READ, "guest")
    sel.register(upstream, selectors.EVENT_READ, "upstream")
    sent = received = 0
    head = b""
    while True:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(guest_in, CHUNK)
                if not data:
                    sel.unregister(guest_in)
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_WR)
                    continue
                if len(head) < 4096:
                    head += data[: 4096 - len(head)]
                upstream.sendall(data)
                sent += len(data)
            else:
                data = upstream.recv(CHUNK)
                if not data:
                    # The model is done answering: the connection is over.
                    sel.close()
                    return received, sent, head
                _write_all(guest_out, data)
                received += len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def audit(path: Path, record: dict[str, object]) -> None:
    """Append one JSON line; O_APPEND keeps concurrent relays' lines whole."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def write_script(script: Path, target: tuple[str, int], audit_path: Path, instance: str) -> None:
    """The guestfwd `cmd:` script: exec this Python running the relay.

    QEMU splits -netdev values on commas, so the relay is a comma-free
    script path; the script itself carries the arguments.
    """
    import shlex

    argv = [sys.executable, "-m", "vmctl.sidecars.relay", "--target", f"{target[0]}:{target[1]}"]
    argv += ["--audit", str(audit_path), "--instance", instance]
    script.write_text(f"#!/bin/sh\nexec {shlex.join(argv)}\n")
    script.chmod(0o700)


def relay(target: tuple[str, int], audit_path: Path, instance: str) -> int:
    """Serve one guest connection on fds 0/1; always leaves an audit line."""
    started = time.time()
    t0 = time.monotonic()
    record: dict[str, object] = {
        "time": round(started, 3),
        "instance": instance,
        "target": f"{target[0]}:{target[1]}",
    }
    bytes_in = bytes_out = 0
    head = b""
    status = 0
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S) as upstream:
            upstream.settimeout(None)
            bytes_in, bytes_out, head = pump(0, 1, upstream)
    except OSError as e:
        record["error"] = f"{type(e).__name__}: {e}"
        status = 1
    record.update(
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        duration_s=round(time.monotonic() - t0, 3),
        request=request_line(head),
    )
    audit(audit_path, record)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmctl.sidecars.relay", description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT of the model endpoint")
    parser.add_argument("--audit", required=True, type=Path, help="audit.jsonl to append to")
    parser.add_argument("--instance", required=True)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    return relay((host.strip("[]"), int(port)), args.audit, args.instance)


if __name__ == "__main__":
    sys.exit(main())
