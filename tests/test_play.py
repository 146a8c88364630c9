"""`uwm play` for real: the server as a subprocess on a free port, the page in headless
Chromium (Debian's /usr/bin/chromium driven by Playwright), keys pressed, frames arriving, a
screenshot; bad messages get a 400 naming the field and the server keeps serving.

The model is a random-init tiny exported folder (the session's real processor + a tiny
config): the page and the server are under test here, not what the model learned."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
WINDOW = 420  # small, so a short test already evicts old frames (unbounded play)
PROMPT = "a red car drives right"


def _needs_browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: `apt-get install -y chromium`; `make test` does it as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


class Server:
    def __init__(self, *args: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, "-m", "unified_wm.cli", "play", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url_seen = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"(http://\S+/)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self.url_seen.set()

    def wait_url(self, timeout=60) -> str:
        if not self.url_seen.wait(timeout):
            self.stop()
            raise AssertionError("uwm play printed no URL:\n" + "".join(self.lines)[-3000:])
        return self.url

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_hf):
    _needs_browser()
    s = Server("--model", str(tiny_hf), "--port", "0", "--prompt", PROMPT, "--window", str(WINDOW), "--seed", "1",
               "--mode", "diagonal", "--diagonals-per-pass", "2")
    s.wait_url()
    yield s
    s.stop()
    assert s.proc.returncode == 0, "".join(s.lines)[-3000:]
    assert "uwm play: stopped" in "".join(s.lines)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1100, "height": 700})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server.url)
        pg.errors = errors
        yield pg
        browser.close()


def post(url: str, body, ctype: str = "application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def counter(pg) -> int:
    return int(pg.inner_text("#counter"))


def wait_frames(pg, n: int, timeout_ms: int = 20000):
    pg.wait_for_function(f"Number(document.getElementById('counter').textContent) >= {n}", timeout=timeout_ms)


def test_keys_drive_the_model_and_frames_stream_to_the_page(page, server, tmp_path):
    wait_frames(page, 1)
    names = json.loads(get(server.url + "api/info")[1])["actions"]
    assert names[:5] == ["stay", "left", "right", "up", "down"] and "upright" in names  # pan5 + atari18
    assert page.locator("#actions button").all_inner_texts() == names  # a button per action
    start = counter(page)
    for key in ["ArrowLeft", "ArrowRight", "ArrowLeft", "ArrowRight"]:
        page.keyboard.press(key)
        time.sleep(0.15)
    page.keyboard.down("ArrowUp")
    page.keyboard.down("ArrowRight")  # held together: the set has "upright"
    time.sleep(0.6)
    page.keyboard.up("ArrowRight")
    page.keyboard.up("ArrowUp")
    wait_frames(page, start + 8)
    page.wait_for_function("uwmPlay.last && (uwmPlay.last.applied.left || 0) >= 2 && (uwmPlay.last.applied.right || 0) >= 2")
    last = page.evaluate("uwmPlay.last")
    assert last["applied"].get("upright", 0) >= 1, last["applied"]
    assert last["prompt"] == PROMPT
    assert last["evictions"] > 0 and last["tokens"] <= WINDOW  # play goes on past the window
    assert float(page.inner_text("#fps")) > 0
    # the canvas holds a real frame: many distinct colours, drawn 8x larger than the 64x64 frame
    colours = page.evaluate("""() => { const c = document.getElementById('frame');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const s = new Set();
        for (let i = 0; i < d.length; i += 4) s.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]); return s.size; }""")
    assert colours > 20
    box = page.locator("#frame").bounding_box()
    assert box["width"] >= 8 * 64 - 1
    shot = tmp_path / "play.png"
    page.screenshot(path=str(shot))
    if os.environ.get("UWM_PLAY_SCREENSHOT"):
        shutil.copy(shot, os.environ["UWM_PLAY_SCREENSHOT"])
    from PIL import Image

    raw = shot.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 20_000
    img = Image.open(shot).convert("RGB")
    frame_px = img.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))
    assert len(frame_px.getcolors(1 << 24)) > 20  # not a blank or single-colour screenshot
    assert page.errors == []


def test_prompt_edit_restarts_the_session(page, server):
    wait_frames(page, 2)
    page.fill("#prompt", "a blue ball bounces")
    page.click("#restart")
    page.wait_for_function("uwmPlay.last && uwmPlay.last.prompt === 'a blue ball bounces' && uwmPlay.last.n >= 2")
    assert page.evaluate("uwmPlay.last.epoch") == 1
    # paused: one frame per action
    page.uncheck("#running")
    time.sleep(0.8)
    n = counter(page)
    time.sleep(0.8)
    assert counter(page) == n
    page.click("#actions button[data-action='down']")
    wait_frames(page, n + 1)
    assert page.evaluate("uwmPlay.last.action") == "down"
    page.check("#running")
    wait_frames(page, n + 3)


def test_bad_messages_get_400_and_the_server_keeps_serving(page, server):
    url = server.url
    sid = page.evaluate("uwmPlay.session")
    # from the page itself, as a buggy client would
    res = page.evaluate("""async (sid) => { const r = await fetch('/api/action', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({session: sid, action: 'teleport'})});
        return [r.status, await r.json()]; }""", sid)
    assert res[0] == 400 and res[1]["field"] == "action" and "teleport" in res[1]["error"]
    assert "left" in res[1]["expected"]
    bad = [
        (b'{"session": "' + sid.encode() + b'", "action": ', "body", "malformed JSON"),
        (b"[1, 2]", "body", "not an object"),
        ({"action": "left"}, "session", "missing field 'session'"),
        ({"session": sid}, "action", "missing field 'action'"),
        ({"session": sid, "action": "left", "speed": 3}, "speed", "unknown field 'speed'"),
        ({"session": sid, "action": 7}, "action", "wrong type"),
        ({"session": sid, "action": "left", "phase": "bounce"}, "phase", "unknown phase"),
        ({"session": "no-such-session", "action": "left"}, "session", "unknown session"),
    ]
    for body, field, words in bad:
        status, err = post(url + "api/action", body)
        assert status == 400 and err["field"] == field and words in err["error"], (body, status, err)
        assert err["expected"]
    status, err = post(url + "api/action", {"session": sid, "action": "left"}, ctype="text/plain")
    assert status == 400 and err["field"] == "Content-Type"
    status, err = post(url + "api/run", {"session": sid, "running": "yes"})
    assert status == 400 and err["field"] == "running"
    # over-long prompts: by characters, and by tokens (does not fit the session window)
    status, err = post(url + "api/session", {"session": sid, "prompt": "x" * 1001})
    assert status == 400 and err["field"] == "prompt" and "1001 characters" in err["error"]
    status, err = post(url + "api/session", {"session": sid, "prompt": "a red car enters from the left " * 30})
    assert status == 400 and err["field"] == "prompt" and "does not fit" in err["error"]
    code, body = get(url + "api/stream?session=nope")
    assert code == 400 and json.loads(body)["field"] == "session"
    # ...and it still answers: info, a good action, new frames on the page
    code, body = get(url + "api/info")
    assert code == 200 and "left" in json.loads(body)["actions"]
    assert post(url + "api/action", {"session": sid, "action": "left"})[0] == 200
    n = counter(page)
    wait_frames(page, n + 2)
    assert server.proc.poll() is None


def test_non_loopback_host_is_refused(tiny_hf, capsys):
    from unified_wm.cli import main

    assert main(["play", "--model", str(tiny_hf), "--host", "0.0.0.0"]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "'0.0.0.0' is not a loopback address" in err and "--allow-remote" in err


# ----------------------------------------------------------------------------- a bounded server
# The server in this process (real model, real sockets on loopback), so its state can be read.
@pytest.fixture(scope="module")
def live(tiny_hf):
    from unified_wm.play import Game
    from unified_wm.play_server import make_server
    from unified_wm.rollout import WorldModel

    game = Game(WorldModel.from_pretrained(tiny_hf), prompt=PROMPT, window=WINDOW, max_sessions=4, seed=1)
    servers = []

    def start(serve: bool = True, **kw):
        srv = make_server(game, "127.0.0.1", 0, **kw)
        servers.append(srv)
        if serve:
            serve_in_thread(srv)
        return srv

    yield game, start
    for srv in servers:
        if getattr(srv, "serving", False):
            srv.shutdown()
        srv.server_close()
    game.stop(timeout=10)


def serve_in_thread(srv):
    srv.serving = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def _raw(port: int, data: bytes, timeout: float = 15.0, pause: float | None = None) -> bytes:
    """Send ``data`` (then, with ``pause``, nothing more) and read the whole answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                chunks.append(b"<reset>")
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def _status_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), answer[:300]
    assert b"application/json" in head, head
    return int(head.split()[1]), json.loads(body)


def _post_raw(port: int, path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_session_cap_holds_under_a_burst(live):
    """20 pages ask for a session at the same moment (--max-sessions 4): never more than 4
    sessions exist, at most 4 streams are served at once, every other answer is a JSON error."""
    game, start = live
    srv = start(max_connections=64)
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    n = 20
    barrier = threading.Barrier(n)
    answers, streams, peak = [], [], [0]
    done = threading.Event()
    lock = threading.Lock()

    def page():
        barrier.wait(timeout=30)
        status, body = post(url + "api/session", {"prompt": PROMPT})
        with lock:
            answers.append((status, body))
            peak[0] = max(peak[0], len(game.sessions) + game.pending)
        if status != 200:
            return
        try:
            r = urllib.request.urlopen(url + f"api/stream?session={body['session']}", timeout=30)
        except urllib.error.HTTPError as e:
            assert e.code == 400 and json.loads(e.read())["field"] == "session"
            return
        assert r.readline() == b"retry: 1000\n"
        with lock:
            streams.append(r)
        done.wait(60)
        r.close()

    threads = [threading.Thread(target=page, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(answers) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the last streams attach
    try:
        assert len(answers) == n
        assert all(s in (200, 503) for s, _ in answers), answers
        assert all("error" in b and "field" in b for s, b in answers if s != 200)
        assert 1 <= len(streams) <= game.max_sessions, len(streams)
        assert peak[0] <= game.max_sessions and len(game.sessions) <= game.max_sessions
        # every slot has a page attached now: a new page is told so (503), not let in
        if len(streams) == game.max_sessions:
            status, body = post(url + "api/session", {"prompt": PROMPT})
            assert status == 503 and body["field"] == "session" and "in use" in body["error"]
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert game.pending == 0


def test_slow_clients_time_out_and_get_408(live):
    game, start = live
    srv = start(request_timeout=1.0)
    port = srv.server_address[1]
    t0 = time.monotonic()
    # a body that never finishes: 408 naming the body, then the connection closes
    half = _post_raw(port, "/api/action", b'{"session": "x", "act')[:-1]
    half = half.replace(b"Content-Length: 21", b"Content-Length: 200")
    status, err = _status_json(_raw(port, half))
    assert status == 408 and err["field"] == "body" and "200 bytes" in err["expected"]
    # headers that never finish, and a request line that never ends
    for data in (f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode(), b"GET /api/in"):
        status, err = _status_json(_raw(port, data))
        assert status == 408 and err["field"] == "request"
    assert time.monotonic() - t0 < 60  # bounded by the 1 s timeout, not by the client
    assert get(f"http://127.0.0.1:{port}/api/info")[0] == 200  # still serving


def test_every_bad_request_gets_a_status_and_json(live):
    game, start = live
    srv = start()
    port = srv.server_address[1]
    deep = b"[" * 5000 + b"]" * 5000  # under the body limit, past json's recursion limit
    status, err = _status_json(_raw(port, _post_raw(port, "/api/action", deep)))
    assert status == 400 and err["field"] == "body" and "nested" in err["error"]
    deep_obj = b'{"session": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2001
    status, err = _status_json(_raw(port, _post_raw(port, "/api/session", deep_obj)))
    assert status == 400 and err["field"] == "body"
    # what the standard library answers itself: a garbage request line, an unknown method, a huge URL
    for data, code in ((b"NONSENSE\r\n\r\n", 400), (b"BREW /pot HTTP/1.1\r\n\r\n", 501),
                       (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414)):
        status, err = _status_json(_raw(port, data))
        assert status == code and err["error"] and err["expected"], (data[:20], status, err)
    assert get(f"http://127.0.0.1:{port}/api/info")[0] == 200


def test_many_clients_at_once_are_queued_not_refused(live):
    """20 clients connect while the server is not yet accepting: the listen backlog holds them
    all (socketserver's default of 5 refuses the rest), and each then gets its answer."""
    import socket

    game, start = live
    srv = start(serve=False)
    port = srv.server_address[1]
    socks, failed = [], []

    def connect():
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=3))
        except OSError as e:
            failed.append(repr(e))

    threads = [threading.Thread(target=connect) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not failed and len(socks) == 20, failed
        for s in socks:
            s.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        serve_in_thread(srv)
        for s in socks:
            s.settimeout(30)
            data = b""
            while c := s.recv(65536):
                data += c
            assert data.startswith(b"HTTP/1.0 200"), data[:200]
    finally:
        for s in socks:
            s.close()


def test_connections_over_the_cap_get_503(live):
    import socket

    game, start = live
    srv = start(max_connections=2, request_timeout=5.0)
    port = srv.server_address[1]
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        for s in slow:
            s.sendall(b"GET /api/info HTTP/1.1\r\n")  # holds its connection until the timeout
        time.sleep(0.3)
        status, err = _status_json(_raw(port, f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()))
        assert status == 503 and err["field"] == "connection"
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + 30
    while get(f"http://127.0.0.1:{port}/api/info")[0] != 200:  # slots come back
        assert time.monotonic() < deadline
        time.sleep(0.2)
