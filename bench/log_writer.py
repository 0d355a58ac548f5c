"""A stand-in agent for the log benchmark: prints numbered, timestamped lines.

Run by the process driver as a script (``python /path/to/log_writer.py
--port PORT``), so it uses the standard library only. It answers every GET on
127.0.0.1:PORT with 200, so the control plane sees it READY and probes it
only now and then. Its environment says what to print:

- ``BENCH_LOG_BURST=N``: first ``N`` lines ``burst SEQ NS`` as fast as stdout
  takes them, then the line ``burst-done``;
- ``BENCH_LOG_RATE=R``: then ``tick SEQ NS`` lines, ``R`` per second, each
  flushed on its own (0: none);
- ``BENCH_LOG_LIFETIME=S``: exit after ``S`` seconds (default 900), so that
  a benchmark that died leaves nothing running for long.

``NS`` is the wall clock (``time.time_ns()``) when the line was written, so a
reader on the same machine can tell each line's latency.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "stable"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Probe requests must not end up between the numbered lines.
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    burst = int(os.environ.get("BENCH_LOG_BURST", "0"))
    rate = float(os.environ.get("BENCH_LOG_RATE", "0"))
    deadline = time.monotonic() + float(os.environ.get("BENCH_LOG_LIFETIME", "900"))
    out = sys.stdout

    for seq in range(burst):
        out.write(f"burst {seq} {time.time_ns()}\n")
    if burst:
        out.write("burst-done\n")
    out.flush()

    seq = 0
    due = time.monotonic()
    while time.monotonic() < deadline:
        if rate <= 0:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        out.write(f"tick {seq} {time.time_ns()}\n")
        out.flush()
        seq += 1
        due += 1.0 / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            # Behind schedule (the machine is busy): carry on, never burst to catch up.
            due = time.monotonic()


if __name__ == "__main__":
    main()
