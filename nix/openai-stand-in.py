"""A stand-in OpenAI-compatible server for the Nix smoke test.

QEMU's `guestfwd=...-cmd:` starts it once per guest connection and speaks
the connection on stdin/stdout, exactly as vmctl's relay is started, so the
test needs no port on the build machine. It answers `GET /v1/models` and a
non-streamed `POST /v1/chat/completions` for the one model named in argv.
"""

import json
import sys


def read_request(rfile):
    parts = rfile.readline().decode("latin-1").split()
    length = 0
    while True:
        line = rfile.readline()
        if line in (b"", b"\n", b"\r\n"):
            break
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == "content-length":
            length = int(value.strip() or 0)
    body = rfile.read(length) if length else b""
    method, path = [*parts, "", ""][:2]
    return method, path.split("?")[0], body


def answer(model, method, path):
    if method == "GET" and path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": model, "object": "model"}]}
    if method == "POST" and path == "/v1/chat/completions":
        message = {"role": "assistant", "content": "stand-in reply"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        reply = {"id": "smoke", "object": "chat.completion", "model": model, "choices": [choice]}
        return 200, reply
    return 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}


def main():
    model = sys.argv[1]
    method, path, _ = read_request(sys.stdin.buffer)
    status, payload = answer(model, method, path)
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sys.stdout.buffer.write(head.encode() + body)
    sys.stdout.buffer.flush()
    print(f"openai-stand-in: {method} {path} -> {status}", file=sys.stderr)


if __name__ == "__main__":
    main()
