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


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, processor):
    """A random-init tiny model saved like `uwm export` does (model + processor in one folder)."""
    import torch

    from tests.conftest import tiny_model_config
    from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("play") / "hf"
    UnifiedWMForCausalLM(tiny_model_config(processor)).save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(out)
    return out


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
