#!/usr/bin/env python3
"""Stand-in for an appliance node behind HAProxy (molecule scenario `cluster`).

HTTPS on 5001 with the node's cluster certificate: GET /health answers like the appliance
({"status": "ok", ...}); any other GET answers which node served it and the forwarding
headers HAProxy added. TCP 10300 (Wyoming's port) sends the node's name and closes.
Usage: backend.py NODE_NAME CERT KEY
"""

from __future__ import annotations

import json
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NODE, CERT, KEY = sys.argv[1:4]
# Every address: the load balancer reaches the node on its own.
ALL_ADDRESSES = "0.0.0.0"  # noqa: S104


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body: dict[str, object]
        if self.path == "/health":
            body = {"status": "ok", "checks": {"started": True}, "version": "standin", "node": NODE}
        else:
            body = {
                "node": NODE,
                "path": self.path,
                "x_forwarded_for": self.headers.get("X-Forwarded-For"),
                "x_forwarded_proto": self.headers.get("X-Forwarded-Proto"),
            }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # health checks every second would flood the journal


class Wyoming(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(f"{NODE}\n".encode())


def main() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERT, KEY)
    https = ThreadingHTTPServer((ALL_ADDRESSES, 5001), Handler)
    https.socket = context.wrap_socket(https.socket, server_side=True)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    wyoming = socketserver.ThreadingTCPServer((ALL_ADDRESSES, 10300), Wyoming)
    threading.Thread(target=wyoming.serve_forever, daemon=True).start()
    https.serve_forever()


if __name__ == "__main__":
    main()
