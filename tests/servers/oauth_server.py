"""A local OAuth 2.0 authorization server for the tests (loopback HTTP, own thread).

It implements what the channel and the mail servers talk to:

* ``GET /authorize`` - the user "approves" at once (as :attr:`OAuthServer.user`) and
  is redirected to ``redirect_uri`` with a code (PKCE S256 required);
* ``POST /token`` - ``authorization_code`` (+ PKCE), ``refresh_token`` (rotation:
  "strict" invalidates the old refresh token, "grace" keeps it valid, "off" never
  rotates) and the device-code grant (RFC 8628);
* ``POST /device`` - device authorization; :meth:`OAuthServer.approve` approves it;
* ``POST /revoke`` - RFC 7009;
* ``POST /introspect`` - RFC 7662, what Dovecot's ``oauth2`` passdb and the SMTP
  fixture ask to validate an access token.

Switches: :attr:`access_ttl` (seconds an access token lives), :meth:`fail_next`
(answer the next N token requests with an HTTP status, e.g. 503), :meth:`misbehave_next`
(answer the next token request slowly, endlessly, hugely or with a given body),
:meth:`revoke_all`. Counters: :attr:`token_requests` by grant type.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

CLIENT_ID = "prx-test-client"


@dataclass
class _Grant:
    user: str
    scope: str
    client_id: str
    refresh_tokens: set[str] = field(default_factory=set)
    revoked: bool = False


@dataclass
class _Access:
    grant: _Grant
    expires_at: float
    revoked: bool = False


class OAuthServer:
    """See the module docstring. Thread-safe; use as a context manager or start()/stop()."""

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.user = "user@example.test"
        self.access_ttl = 3600.0
        self.rotation = "strict"
        self.device_interval = 1
        self.token_requests: Counter[str] = Counter()
        self.introspections = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._codes: dict[str, tuple[_Grant, str, str]] = {}  # code -> grant, challenge, redirect
        self._devices: dict[str, dict[str, Any]] = {}  # device_code -> state
        self._refresh: dict[str, _Grant] = {}
        self._access: dict[str, _Access] = {}
        self._fail: list[int] = []
        self._misbehave: list[tuple[str, bytes]] = []
        self.misbehaving_done = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ---

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> OAuthServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="oauth-fixture", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OAuthServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.access_ttl = 3600.0
            self.rotation = "strict"
            self.token_requests.clear()
            self.introspections = 0
            self._fail.clear()
            self._misbehave.clear()
            self.misbehaving_done.clear()

    # --- the test's switches ---

    def issue(self, user: str, scope: str = "mail") -> str:
        """A new grant for ``user``; returns its refresh token (as if signed in)."""
        with self._lock:
            grant = _Grant(user=user, scope=scope, client_id=CLIENT_ID)
            return self._new_refresh(grant)

    def access_token_for(self, refresh_token: str) -> str:
        """Refresh in-process (what a host that manages tokens itself would do)."""
        with self._lock:
            status, answer = self._token(
                {
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": CLIENT_ID,
                }
            )
        assert status == 200, answer
        return str(answer["access_token"])

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` token requests with HTTP ``status``."""
        with self._lock:
            self._fail.extend([status] * count)

    def misbehave_next(self, mode: str, body: bytes = b"") -> None:
        """Answer the next token request the hostile way ``mode`` names:

        * ``"body"``: status 200 with ``body`` as it is (a malformed token answer);
        * ``"slow_drip"``: headers at once, then a long valid body one byte per 0.2 s;
        * ``"slow_header"``: the status line and headers one byte per 0.2 s, endlessly;
        * ``"chunked_forever"``: a chunked body that never ends (1 KB per 10 ms);
        * ``"huge"``: a valid token answer with ``body`` as a padding field (its
          Content-Length says so), sent as fast as the client reads.

        :attr:`misbehaving_done` is set once the server stopped (the client hung up).
        """
        with self._lock:
            self._misbehave.append((mode, body))

    def revoke_all(self, user: str | None = None) -> None:
        """Revoke every grant (of ``user``): refresh and access tokens stop working."""
        with self._lock:
            for grant in {id(g): g for g in self._refresh.values()}.values():
                if user is None or grant.user == user:
                    grant.revoked = True

    def expire_access_tokens(self) -> None:
        with self._lock:
            for access in self._access.values():
                access.expires_at = 0.0

    def approve(self, user_code: str, user: str | None = None) -> None:
        """The user enters ``user_code`` on the verification page and approves."""
        with self._lock:
            for state in self._devices.values():
                if state["user_code"] == user_code:
                    state["approved"] = user or self.user
                    return
        raise KeyError(user_code)

    def wait_device_request(self, timeout: float = 10.0) -> str:
        """The user code of the most recent device authorization (waits for one)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._devices:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no device authorization request")
                self._cond.wait(left)
            return str(list(self._devices.values())[-1]["user_code"])

    def total_token_requests(self) -> int:
        with self._lock:
            return sum(self.token_requests.values())

    def active(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection of an access token."""
        with self._lock:
            self.introspections += 1
            access = self._access.get(token)
            if (
                access is None
                or access.revoked
                or access.grant.revoked
                or access.expires_at <= time.time()
            ):
                return {"active": False}
            return {
                "active": True,
                "username": access.grant.user,
                "scope": access.grant.scope,
                "client_id": access.grant.client_id,
                "exp": int(access.expires_at),
                "token_type": "Bearer",
            }

    def token_is_valid(self, user: str, token: str) -> bool:
        info = self.active(token)
        return bool(info.get("active")) and info.get("username") == user

    # --- internals (called with the lock held) ---

    def _new_refresh(self, grant: _Grant) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        grant.refresh_tokens.add(token)
        self._refresh[token] = grant
        return token

    def _tokens(self, grant: _Grant, refresh: str | None) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(24)
        self._access[access] = _Access(grant, time.time() + self.access_ttl)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "scope": grant.scope,
        }
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        kind = form.get("grant_type", "")
        self.token_requests[kind] += 1
        self._cond.notify_all()
        if self._fail:
            return self._fail.pop(0), {"error": "temporarily_unavailable"}
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        if kind == "authorization_code":
            entry = self._codes.pop(form.get("code", ""), None)
            if entry is None:
                return 400, {"error": "invalid_grant"}
            grant, challenge, redirect = entry
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge:
                return 400, {"error": "invalid_grant", "error_description": "PKCE"}
            if form.get("redirect_uri") != redirect:
                return 400, {"error": "invalid_grant", "error_description": "redirect_uri"}
            return 200, self._tokens(grant, self._new_refresh(grant))
        if kind == "refresh_token":
            old = form.get("refresh_token", "")
            grant = self._refresh.get(old)
            if grant is None or grant.revoked or old not in grant.refresh_tokens:
                return 400, {"error": "invalid_grant"}
            if self.rotation == "off":
                return 200, self._tokens(grant, None)
            new = self._new_refresh(grant)
            if self.rotation == "strict":
                grant.refresh_tokens.discard(old)
            return 200, self._tokens(grant, new)
        if kind == "urn:ietf:params:oauth:grant-type:device_code":
            state = self._devices.get(form.get("device_code", ""))
            if state is None:
                return 400, {"error": "expired_token"}
            if state["approved"] is None:
                return 400, {"error": "authorization_pending"}
            del self._devices[form["device_code"]]
            grant = _Grant(user=state["approved"], scope=state["scope"], client_id=CLIENT_ID)
            return 200, self._tokens(grant, self._new_refresh(grant))
        return 400, {"error": "unsupported_grant_type"}

    def _device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        device_code = secrets.token_urlsafe(16)
        user_code = f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"
        self._devices[device_code] = {
            "user_code": user_code,
            "scope": form.get("scope", ""),
            "approved": None,
        }
        self._cond.notify_all()
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{self.url}/device/verify",
            "expires_in": 600,
            "interval": self.device_interval,
        }

    def _authorize(self, query: dict[str, str]) -> tuple[int, str]:
        if query.get("client_id") != CLIENT_ID or query.get("response_type") != "code":
            return 400, ""
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, ""
        redirect = query.get("redirect_uri", "")
        if not redirect.startswith("http://127.0.0.1:"):
            return 400, ""
        code = secrets.token_urlsafe(16)
        grant = _Grant(user=self.user, scope=query.get("scope", ""), client_id=CLIENT_ID)
        self._codes[code] = (grant, query["code_challenge"], redirect)
        params = {"code": code, "state": query.get("state", "")}
        return 302, redirect + "?" + urlencode(params)

    def _revoke(self, form: dict[str, str]) -> None:
        token = form.get("token", "")
        grant = self._refresh.get(token)
        if grant is not None:
            grant.revoked = True
        access = self._access.get(token)
        if access is not None:
            access.revoked = True


class _Handler(BaseHTTPRequestHandler):
    server_owner: OAuthServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        form = {k: v[0] for k, v in parse_qs(body).items()}
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):  # client_secret_basic
            client_id, _, _ = base64.b64decode(auth[6:]).decode().partition(":")
            form.setdefault("client_id", client_id)
        return form

    def _json(self, status: int, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _hostile(self, mode: str, body: bytes) -> None:
        """See :meth:`OAuthServer.misbehave_next`; stops after 120 s at the latest."""
        data = {"access_token": "at-hostile", "token_type": "Bearer", "expires_in": 3600}
        stop = time.monotonic() + 120
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if mode == "body":
            self.wfile.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif mode == "slow_drip":
            payload = json.dumps({**data, "padding": "x" * 4000}).encode()
            self.wfile.write(head + b"Content-Length: %d\r\n\r\n" % len(payload))
            self.wfile.flush()
            for i in range(len(payload)):
                if time.monotonic() > stop:
                    return
                self.wfile.write(payload[i : i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        elif mode == "slow_header":
            for i in range(100_000):
                if time.monotonic() > stop:
                    return
                self.wfile.write(b"X-Drip-%d: %d\r\n" % (i, i) if i else head)
                self.wfile.flush()
                time.sleep(0.2)
        elif mode == "chunked_forever":
            self.wfile.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b" " * 1024
            while time.monotonic() < stop:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.01)
        elif mode == "huge":
            payload = json.dumps(data).encode()[:-1] + b', "padding": "' + body + b'"}'
            self.wfile.write(head + b"Content-Length: %d\r\n\r\n" % len(payload))
            self.wfile.write(payload)
        self.wfile.flush()

    def do_GET(self) -> None:
        owner = self.server_owner
        parts = urlsplit(self.path)
        if parts.path == "/authorize":
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            with owner._lock:
                status, location = owner._authorize(query)
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        owner = self.server_owner
        path = urlsplit(self.path).path
        form = self._form()
        if path == "/token":
            with owner._lock:
                hostile = owner._misbehave.pop(0) if owner._misbehave else None
                if hostile is None:
                    status, data = owner._token(form)
                else:  # the grant is left as it was (no rotation)
                    owner.token_requests[form.get("grant_type", "")] += 1
            if hostile is not None:
                try:
                    self._hostile(*hostile)
                except OSError:
                    pass  # the client hung up: what a bounded client does
                finally:
                    owner.misbehaving_done.set()
                return
            self._json(status, data)
        elif path == "/device":
            with owner._lock:
                status, data = owner._device(form)
            self._json(status, data)
        elif path == "/revoke":
            with owner._lock:
                owner._revoke(form)
            self._json(200, {})
        elif path == "/introspect":
            self._json(200, owner.active(form.get("token", "")))
        else:
            self._json(404, {"error": "not_found"})
