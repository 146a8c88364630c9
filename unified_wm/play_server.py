"""The HTTP side of ``uwm play``: a bounded ``http.server`` (session and connection caps, request
timeouts, a JSON error for every bad request), the page, and the address checks. The game it serves
(sessions, actions, frames): ``play.py``; the protocol is described there."""
from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from unified_wm.play import (HEARTBEAT_SECONDS, LISTEN_BACKLOG, MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_PROMPT_CHARS, PHASES,
                             REQUEST_TIMEOUT, BadRequest, Game)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def _fields(body: dict, required: dict, optional: dict) -> dict:
    """Check a message's fields: name -> (types, expected description)."""
    known = {**required, **optional}
    for k in body:
        if k not in known:
            raise BadRequest(k, f"unknown field '{k}'", f"only the fields {', '.join(known)}")
    for k, (types, expected) in known.items():
        if k not in body:
            if k in required:
                raise BadRequest(k, f"missing field '{k}'", expected)
            continue
        v = body[k]
        if not isinstance(v, types):
            raise BadRequest(k, f"field '{k}' has the wrong type ({type(v).__name__})", expected)
    return body


class Handler(BaseHTTPRequestHandler):
    server_version = "uwm-play/1"
    game: Game = None  # set on the subclass made by make_server
    page: bytes = b""
    check_host: bool = True
    allowed_hosts: frozenset = frozenset()
    quiet: bool = True
    busy: bool = False  # True on the class that answers connections over the cap
    timeout = REQUEST_TIMEOUT  # socket timeout (StreamRequestHandler.setup): a slow client cannot hold a thread

    # -- plumbing -------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # noqa: D102
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _host_ok(self) -> bool:
        if not self.check_host:
            return True
        host = (self.headers.get("Host") or "").lower()
        if host not in self.allowed_hosts:
            self._json(403, {"error": f"Host '{host[:100]}' is not this server's loopback address",
                             "field": "Host", "expected": " or ".join(sorted(self.allowed_hosts))})
            return False
        return True

    def _body(self) -> dict:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest("Content-Type", f"Content-Type is '{ctype or '(none)'}'", "application/json")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("Content-Length", "missing or malformed Content-Length header",
                             "the body's length in bytes") from None
        if n < 0 or n > MAX_BODY_BYTES:
            raise BadRequest("body", f"body of {n} bytes", f"at most {MAX_BODY_BYTES} bytes", status=413)
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raw = b""
        if len(raw) < n:
            self.close_connection = True
            raise BadRequest("body", f"the body ended after {len(raw)} of {n} bytes (Content-Length), or took over "
                             f"{self.timeout:g} s to arrive", f"{n} bytes within {self.timeout:g} s", status=408)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest("body", f"malformed JSON: {e}", "a JSON object") from None
        except RecursionError:
            raise BadRequest("body", "JSON nested too deeply", "a flat JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest("body", f"the body is a JSON {type(body).__name__}, not an object", "a JSON object")
        return body

    def _guard(self, fn) -> None:
        try:
            fn()
        except BadRequest as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001  (a bug, not the client's: still an answer, and the server goes on)
            self.log_error("internal error on %s: %s", self.path, "".join(
                traceback.format_exception(type(e), e, e.__traceback__)))
            self.close_connection = True
            try:
                self._json(500, {"error": f"internal error: {type(e).__name__}", "field": "server",
                                 "expected": "a bug report with the server's log"})
            except OSError:
                pass

    # every answer the standard library makes itself (a malformed request line, an unsupported
    # method, too many headers, a too-long URL) is JSON like the others
    def send_error(self, code, message=None, explain=None):  # noqa: D102
        short, long = self.responses.get(code, ("Error", ""))
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") in ("", "HTTP/0.9"):
            self.request_version = "HTTP/1.0"  # a garbage request line still gets a status line and headers
        body = json.dumps({"error": message or short, "field": "request",
                           "expected": explain or long or "a well-formed HTTP/1.x request"}).encode()
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def handle_one_request(self):
        """The standard library's, except that a request whose line or headers come too slowly
        gets a 408 answer before the connection closes (the library closes without a word)."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return  # an error was sent
            if not hasattr(self, "do_" + self.command):
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {self.command[:20]!r}",
                                "GET or POST")
                return
        except TimeoutError:
            self.close_connection = True
            self._raw_error(408, "Request Timeout", {
                "error": f"the request did not arrive within {self.timeout:g} s", "field": "request",
                "expected": f"a complete request line and headers within {self.timeout:g} s"})
            return
        try:
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except TimeoutError:  # a write timed out (the page stopped reading): drop it
            self.close_connection = True

    def parse_request(self):  # noqa: D102
        if not super().parse_request():
            return False
        if self.busy:  # over the connection cap: refuse at once, politely
            self.close_connection = True
            self._json(503, {"error": f"the server is serving {self.server.max_connections} connections already",
                             "field": "connection", "expected": "fewer open pages; retry shortly"})
            return False
        return True

    def _raw_error(self, status: int, reason: str, obj: dict) -> None:
        body = json.dumps(obj).encode()
        head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            self.wfile.write(head + body)
            self.wfile.flush()
        except OSError:
            pass

    # -- routes ---------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802
        self._guard(self._get)

    def _get(self):
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(200, self.page, "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._json(200, self.game.info())
        elif url.path == "/api/stream":
            self._stream(parse_qs(url.query).get("session", [""])[0])
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._json(404, {"error": f"no such page '{url.path[:200]}'", "field": "path",
                             "expected": "/, /api/info or /api/stream?session=ID"})

    def do_POST(self):  # noqa: N802
        self._guard(self._post)

    def _post(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        routes = {"/api/session": self._post_session, "/api/action": self._post_action, "/api/run": self._post_run}
        if path not in routes:
            self._json(404, {"error": f"no such endpoint '{path[:200]}'", "field": "path",
                             "expected": "POST /api/session, /api/action or /api/run"})
            return
        routes[path](self._body())

    def do_PUT(self):  # noqa: N802
        self._json(405, {"error": f"method {self.command} not allowed", "field": "method", "expected": "GET or POST"})

    do_DELETE = do_PATCH = do_PUT

    def _post_session(self, body: dict) -> None:
        game = self.game
        _fields(body, {}, {"prompt": ((str,), f"a string of at most {MAX_PROMPT_CHARS} characters"),
                           "session": ((str,), "the id of the session to restart")})
        prompt = body.get("prompt", game.default_prompt)
        if "session" in body:
            sess = game.get(body["session"])
            game.restart(sess, prompt)
        else:
            sess = game.create(prompt)
        self._json(200, {"session": sess.id, "prompt": sess.prompt, "epoch": sess.epoch})

    def _post_action(self, body: dict) -> None:
        game = self.game
        _fields(body, {"session": ((str,), "the id returned by POST /api/session")},
                {"action": ((str,), f"one of: {', '.join(game.names)}"),
                 "phase": ((str,), "one of: " + ", ".join(PHASES))})
        phase = body.get("phase", "tap")
        if phase not in PHASES:
            raise BadRequest("phase", f"unknown phase '{phase[:50]}'", "one of: " + ", ".join(PHASES))
        if phase != "release" and "action" not in body:
            raise BadRequest("action", "missing field 'action'", f"one of: {', '.join(game.names)}")
        name = None
        if "action" in body:
            from unified_wm.tokenization.actions import ALIASES

            raw = body["action"]
            name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
            if name not in game.names:
                raise BadRequest("action", f"unknown action name '{raw[:50]}'", f"one of: {', '.join(game.names)}")
        sess = game.get(body["session"])
        self._json(200, sess.action(name, phase))

    def _post_run(self, body: dict) -> None:
        _fields(body, {"session": ((str,), "the id returned by POST /api/session"),
                       "running": ((bool,), "true (run continuously) or false (one frame per action)")}, {})
        self._json(200, self.game.get(body["session"]).set_running(body["running"]))

    def _stream(self, sid: str) -> None:
        sess = self.game.attach(sid)
        seen = -1
        last_write = time.monotonic()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(b"retry: 1000\n\n")
            self.wfile.flush()
            while not self.game.stopping.is_set():
                with sess.cond:
                    if sess.seq == seen and not sess.closed:
                        sess.cond.wait(timeout=1.0)
                    if sess.closed:
                        break
                    out = b""
                    if sess.seq != seen:
                        seen = sess.seq
                        out = (sess.status or b"") + (sess.latest or b"")
                        sess.status = None
                if out:
                    self.wfile.write(out)
                    self.wfile.flush()
                    last_write = time.monotonic()
                elif time.monotonic() - last_write > HEARTBEAT_SECONDS:
                    self.wfile.write(b": ping\n\n")  # finds pages that went away
                    self.wfile.flush()
                    last_write = time.monotonic()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            with sess.cond:
                sess.subscribers -= 1
                sess.last_seen = time.monotonic()
                sess.cond.notify_all()


class PlayServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them at work: a connection over the
    cap is still read (within the request timeout) and answered 503, so no client is left
    without an answer; the kernel queues up to ``request_queue_size`` connections before accept."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    max_connections = MAX_CONNECTIONS
    busy_handler = None  # set by make_server

    def server_activate(self):  # noqa: D102
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def finish_request(self, request, client_address):  # noqa: D102
        if self._slots.acquire(blocking=False):
            try:
                super().finish_request(request, client_address)
            finally:
                self._slots.release()
        else:
            self.busy_handler(request, client_address, self)


def load_page() -> bytes:
    res = resources.files("unified_wm").joinpath("play_static/index.html")
    try:
        return res.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"the play page '{res}' is missing from the installed package "
                                f"(reinstall with `pip install -e .`)") from None


def check_address(host: str, port: int, allow_remote: bool = False) -> None:
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"--host '{host}' is not a loopback address; the play server has no authentication, so it "
                         f"binds loopback only (127.0.0.1, ::1, localhost). Pass --allow-remote to serve '{host}' "
                         f"anyway, on a network you trust")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0 (any free port) or 1..65535, got {port}")


def make_server(game: Game, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
                quiet: bool = True, request_timeout: float = REQUEST_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS) -> PlayServer:
    """Bind the page's server (not yet serving); loopback only unless ``allow_remote``."""
    check_address(host, port, allow_remote)
    if not request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {request_timeout}")
    if max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {max_connections}")
    bind = host.strip("[]")
    attrs = {"max_connections": int(max_connections)}
    if ":" in bind:
        attrs["address_family"] = socket.AF_INET6
    cls = type("PlayServerBound", (PlayServer,), attrs)
    try:
        server = cls((bind, port), type("PlayHandler", (Handler,), {"timeout": float(request_timeout)}))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    real_port = server.server_address[1]
    names = {"localhost", f"[{bind}]", "[::1]"} if ":" in bind else {"localhost", bind, "127.0.0.1"}
    h = server.RequestHandlerClass
    h.game, h.page, h.quiet = game, load_page(), quiet
    h.check_host = not allow_remote
    h.allowed_hosts = frozenset(f"{n.lower()}:{real_port}" for n in names)
    server.busy_handler = type("PlayBusyHandler", (h,), {"busy": True, "timeout": min(float(request_timeout), 2.0)})
    return server


def url_of(server: PlayServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
