#!/usr/bin/env python3
"""A stand-in for Dify's api, web and plugin daemon behind the load balancer (tests only).

Runs on a lab host as a systemd unit (`difyops-standin@ROLE`), standard library only, and honours
the contract the balancer relies on: the same ports and routes as Dify, HTTP/1.1 keepalive, and
every answer names the host and role that produced it.

    api :5001     /console/api /api /v1 /files /mcp /triggers, /health
                  .../sse          Server-Sent Events: EVENTS events, INTERVAL s apart
                  .../slow         answers after ?seconds=N; touches RUN/slow-<token> on arrival
                  .../drop         with RUN/drop present: reads the request, then closes the
                                   connection without an answer (a host dying mid-request)
                  POST anything    body read and counted; one line per request in STATE/requests
    web :3000     /, /explore..., /_next/static/... (JavaScript, sent with Cache-Control no-cache)
    plugin :5002  /e/... (echoes the request headers, Dify-Hook-Url among them), /health/check
    websocket :5006  /socket.io/... (the upgrade headers it received), /health (api_websocket)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORTS = {"api": 5001, "web": 3000, "plugin": 5002, "websocket": 5006}
API_PREFIXES = ("/console/api", "/api", "/v1", "/files", "/mcp", "/triggers")
STATE = "/var/lib/difyops-standin"
RUN = "/run/difyops-standin"
EVENTS, INTERVAL = 4, 0.6
HOST = socket.gethostname()
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    """One connection; `served` counts its requests (above 1: the client kept it alive)."""

    protocol_version = "HTTP/1.1"
    role = "api"

    def setup(self) -> None:
        super().setup()
        self.served = 0

    def log_message(self, *args: object) -> None:
        """Quiet: the journal would fill with every request."""

    def who(self, **more: object) -> dict:
        return {"role": self.role, "host": HOST, "method": self.command, "path": self.path,
                "served_on_connection": self.served, "headers": dict(self.headers), **more}

    def answer(self, status: int, body: dict | str, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def read_body(self) -> int:
        remaining = int(self.headers.get("Content-Length") or 0)
        total = remaining
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        return total - remaining

    def record(self) -> None:
        with LOCK, open(f"{STATE}/requests", "a") as log:
            log.write(f"{self.command} {urlsplit(self.path).path}\n")

    def handle_any(self) -> None:
        self.served += 1
        path = urlsplit(self.path).path
        received = self.read_body()
        if self.command == "POST":
            self.record()
        getattr(self, f"serve_{self.role}")(path, received)

    do_GET = do_POST = do_PUT = do_HEAD = handle_any

    # --- api ------------------------------------------------------------------------------------

    def serve_api(self, path: str, received: int) -> None:
        if path == "/health":
            self.answer(200, {"status": "ok", "host": HOST})
        elif not path.startswith(API_PREFIXES):
            self.answer(404, self.who(error="not an api route"))
        elif path.endswith("/sse"):
            self.stream()
        elif path.endswith("/slow"):
            query = parse_qs(urlsplit(self.path).query)
            with open(f"{RUN}/slow-{query.get('token', ['x'])[0]}", "w") as marker:
                marker.write(HOST)
            time.sleep(float(query.get("seconds", ["3"])[0]))
            self.answer(200, self.who())
        elif path.endswith("/drop") and os.path.exists(f"{RUN}/drop"):
            self.close_connection = True  # no answer at all: the host "died" mid-request
        else:
            self.answer(200, self.who(received=received))

    def serve_websocket(self, path: str, received: int) -> None:
        if path == "/health":
            self.answer(200, {"status": "ok", "host": HOST})
        elif path.startswith("/socket.io/"):
            self.answer(200, self.who(upgrade=self.headers.get("Upgrade", ""),
                                      connection=self.headers.get("Connection", "")))
        else:
            self.answer(404, self.who(error="not a Socket.IO route"))

    def stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number in range(EVENTS):
            event = f"data: {json.dumps({'n': number, 'host': HOST})}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(INTERVAL)
        self.wfile.write(b"0\r\n\r\n")

    # --- web ------------------------------------------------------------------------------------

    def serve_web(self, path: str, received: int) -> None:
        if path.startswith("/_next/static/"):
            script = f"// web on {HOST}\n" + "console.log('difyops stand-in');\n" * 100
            self.answer(200, script, "application/javascript",
                        {"Cache-Control": "no-cache"})
        elif path == "/" or path.startswith("/explore"):
            self.answer(200, f"<html><body>web on {HOST}</body></html>\n",
                        "text/html; charset=utf-8")
        else:
            self.answer(404, self.who(error="no such page"))

    # --- plugin daemon --------------------------------------------------------------------------

    def serve_plugin(self, path: str, received: int) -> None:
        if path == "/health/check":
            self.answer(200, {"status": "ok", "host": HOST})
        elif path.startswith("/e/"):
            self.answer(200, self.who())
        else:
            self.answer(404, self.who(error="not a plugin route"))


def main() -> None:
    role = sys.argv[1]
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(RUN, exist_ok=True)
    handler = type(f"{role}Handler", (Handler,), {"role": role})
    server = ThreadingHTTPServer(("0.0.0.0", PORTS[role]), handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
