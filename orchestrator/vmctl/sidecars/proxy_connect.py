"""The guestfwd connector: hand one guest connection to the egress sidecar.

QEMU's `guestfwd=tcp:10.0.2.2:3128-cmd:SCRIPT` starts SCRIPT for every
guest connection to the proxy address, with the connection on its
stdin/stdout (a socket from libslirp). This passes that socket to the
guest's sidecar over its UNIX socket (one byte `F` plus SCM_RIGHTS) and
exits at once, so the sidecar alone bounds and times every connection.
When stdin is not a socket it copies the stream instead (`S`).

Standard library only, run as `python3 -I -S proxy_connect.py SOCKET`:
it starts once per guest connection, so it starts fast.
"""

import os
import selectors
import socket
import stat
import sys


def copy(sock: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    sel.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]


def main(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return 1
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        socket.send_fds(sock, [b"F"], [0])
        return 0
    sock.sendall(b"S")
    copy(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
