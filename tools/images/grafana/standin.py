"""A stand-in for Grafana where no registry is reachable: its health endpoint, nothing else."""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/api/health":
            body = json.dumps({"database": "ok", "version": "stand-in"}).encode()
            kind, status = "application/json", 200
        else:
            body = b"A stand-in for Grafana (built where no image registry is reachable): no dashboards here.\n"
            kind, status = "text/plain", 503
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("0.0.0.0", 3000), Handler).serve_forever()
