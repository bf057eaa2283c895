#!/usr/bin/env python3
"""A minimal Application Insights ingestion endpoint for benchmarks: accepts POST /v2.1/track
(gzip or not, NDJSON or a JSON array), answers 200 with the item count, counts items.
Usage: ingest.py PORT_FILE  (binds 127.0.0.1:0, writes the port to PORT_FILE)."""
import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEMS = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global ITEMS
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        text = body.decode("utf-8").strip()
        if text.startswith("["):
            n = len(json.loads(text))
        else:
            n = len([line for line in text.splitlines() if line.strip()])
        ITEMS += n
        answer = json.dumps({"itemsReceived": n, "itemsAccepted": n, "errors": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_GET(self):
        answer = str(ITEMS).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(sys.argv[1], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
