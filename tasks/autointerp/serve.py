"""A tiny OpenAI-compatible chat-completions server around any client (e.g. LocalClient), on the standard
library's http.server: `POST /v1/chat/completions` and `GET /v1/models`. It lets the HTTP client be tested
against a real server process offline (tests/autointerp_server.py starts it), and serves a local model to
other tools. One request at a time (the model is not thread-safe); not for production."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def chat_response(model: str, content: str, number: int) -> dict:
    return {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def make_handler(client, model_name: str):
    class Handler(BaseHTTPRequestHandler):
        served = 0

        def log_message(self, *args):  # quiet: the caller reports
            pass

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = request["messages"]
                max_tokens = int(request.get("max_tokens") or 64)
                temperature = float(request.get("temperature") or 0.0)
            except (ValueError, KeyError, TypeError) as error:
                self._send(400, {"error": {"message": f"bad request: {error}"}})
                return
            if request.get("model") not in (None, model_name):
                self._send(404, {"error": {"message": f"model {request.get('model')!r} not served; try {model_name}"}})
                return
            Handler.served += 1
            content = client.complete(messages, max_tokens=max_tokens, temperature=temperature)
            self._send(200, chat_response(model_name, content, Handler.served))

    return Handler


def make_server(client, model_name: str, host: str = "127.0.0.1", port: int = 0) -> HTTPServer:
    """A server bound to host:port (port 0: any free port; read it from server.server_address)."""
    return HTTPServer((host, port), make_handler(client, model_name))
