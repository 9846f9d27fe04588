"""The plumbing of the stub OpenAI-compatible servers the judge tests run against: a request handler that lists one
model (``model_id``), reads a chat request's JSON body and answers a chat completion, and a local server for it.
Imported as ``from openai_stub import ...`` (pytest puts this directory on sys.path for the test files in it)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubHandler(BaseHTTPRequestHandler):
    model_id = "stub"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": self.model_id, "object": "model"}]})

    def body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def answer(self, text: str):
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]):
    """A local server for ``handler`` on a free port: yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
