"""A misbehaving agent for tests: sane on /status, broken HTTP on /broken.

Usage: python -m tests.agents.malformed PORT
"""

from __future__ import annotations

import socket
import sys
import threading

STATUS = b'{"agent_type": "custom", "status": "stable", "transport": "pty"}'
GOOD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
# Two Content-Length values that disagree: no proxy may guess where the body ends.
BROKEN = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!"


def serve(connection: socket.socket) -> None:
    with connection:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = connection.recv(65536)
            if not chunk:
                return
            request += chunk
        path = request.split(b" ", 2)[1]
        if path == b"/status":
            connection.sendall(GOOD % (len(STATUS), STATUS))
        else:
            connection.sendall(BROKEN)


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("malformed agent listening", flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve, args=(connection,), daemon=True).start()


if __name__ == "__main__":
    main()
