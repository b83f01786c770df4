"""A scripted OpenAI-compatible chat model on loopback: the "no LLM" stand-in for host gateways.

It answers every ``POST .../chat/completions`` (streamed or not) with
``echo: <the last user message>`` and records each request, so a test
can run a host's real agent loop and see which history the host sent along.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class EchoChatModel:
    """Start with :meth:`start`; ``base_url`` is the OpenAI ``/v1`` root."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with owner._lock:
                    owner.requests.append(body)
                users = [m for m in body.get("messages", []) if m.get("role") == "user"]
                said = _text(users[-1].get("content")) if users else ""
                answer = f"echo: {said.strip()}"
                if body.get("stream"):
                    self._stream(answer)
                else:
                    self._json(answer)

            def _json(self, answer: str) -> None:
                data = json.dumps(
                    {
                        "id": "chatcmpl-echo",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "echo",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, answer: str) -> None:
                def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
                    payload = {
                        "id": "chatcmpl-echo",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": "echo",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    }
                    return f"data: {json.dumps(payload)}\n\n".encode()

                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(chunk({"role": "assistant", "content": answer}, None))
                self.wfile.write(chunk({}, "stop"))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def start(self) -> EchoChatModel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def user_texts(self, request: int) -> list[str]:
        """The user messages the host sent with request number ``request``."""
        with self._lock:
            body = self.requests[request]
        messages = body.get("messages", [])
        return [_text(m.get("content")) for m in messages if m.get("role") == "user"]
