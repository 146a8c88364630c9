"""Play a world model in the browser: ``uwm play --model DIR``.

    uwm play --model runs/demo/hf                 # prints http://127.0.0.1:PORT/ ; open it
    uwm play --model runs/demo/hf --port 8765 --prompt "a red car drives right" --mode diagonal

A local page shows the newest generated frame (scaled up, pixelated), the frame counter and
frames/s, an editable prompt (restart with it) and a button per action of the model's action
set; the arrow keys drive ``left/right/up/down`` and space ``fire`` (or ``stay``) where the
model has those names (held arrows combine into ``upright``, ``downleftfire`` ... when the set
has them).

Server: the standard library only (``http.server`` with a thread per connection). Each page
session owns one :class:`unified_wm.rollout.RolloutSession`, stepped by its own worker thread;
all model calls go through one lock, so several pages share the CPU one frame at a time. The
session streams with a token window (``--window``), so play goes on without bound.

Protocol (JSON in, JSON out; frames come back as Server-Sent Events):

  GET  /                       the page
  GET  /api/info               action names, limits and settings
  POST /api/session            {"prompt": str, "session": id?}  new session, or restart one
  POST /api/action             {"session": id, "action": name, "phase": "tap"|"hold"|"release"}
  POST /api/run                {"session": id, "running": bool}  run continuously, or one frame per action
  GET  /api/stream?session=id  text/event-stream: "frame" events (raw RGB, base64) and "status"

Why Server-Sent Events: frames only flow server -> page, and the page's messages are rare
small requests, which as ordinary POSTs get ordinary status codes (a bad message is an HTTP
400 with a JSON error naming the field). SSE is one long plain-HTTP response written with
``wfile.write``; the browser's ``EventSource`` reconnects by itself. A WebSocket would need a
hand-written handshake and frame (un)masking on top of ``http.server``; long-polling a request
per frame and a cursor per client.

Bad messages (unknown action or field, malformed JSON, missing fields, wrong types, an
over-long prompt) get ``400 {"error": ..., "field": ..., "expected": ...}``; the server keeps
serving. POSTs must say ``Content-Type: application/json`` (so another web site cannot post
to it without a CORS preflight, which this server never grants), and the ``Host`` header must
name the loopback address (against DNS rebinding) unless ``--allow-remote`` is given.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

MAX_PROMPT_CHARS = 1000
MAX_BODY_BYTES = 16 * 1024
MAX_QUEUED_ACTIONS = 16
DEFAULT_WINDOW = 1100
RECENT_FRAMES = 4  # frames a windowed session always keeps (RolloutSession's ``recent``)
IDLE_SECONDS = 60.0  # a session with no page attached for this long ends
HEARTBEAT_SECONDS = 10.0
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send a request (line, headers, body) or read a frame
MAX_CONNECTIONS = 32  # connections served at once (streams included); more get 503 at once
LISTEN_BACKLOG = 128  # connections the kernel queues before accept (socketserver's default is 5)
PHASES = ("tap", "hold", "release")


class BadRequest(Exception):
    """A message the server refuses: 400 with the field and what was expected."""

    def __init__(self, field: str, error: str, expected: str, status: int = 400):
        super().__init__(error)
        self.field, self.error, self.expected, self.status = field, error, expected, status

    def body(self) -> dict:
        return {"error": self.error, "field": self.field, "expected": self.expected}


# ----------------------------------------------------------------------------- sessions
class PlaySession:
    """One page session: a RolloutSession, the actions the page sent, the newest frame.

    ``cond`` guards the fields below; the model (``Game.model_lock``) is only touched by the
    worker thread and by :meth:`Game.restart`, always with the model lock held.
    """

    def __init__(self, game: "Game", sid: str, prompt: str, rollout):
        self.game, self.id = game, sid
        self.cond = threading.Condition()
        self.prompt = prompt
        self.rollout = rollout
        self.epoch = 0  # bumped on every restart
        self.n = 0  # frames made in this epoch
        self.queue: collections.deque[str] = collections.deque(maxlen=MAX_QUEUED_ACTIONS)
        self.held: str | None = None
        self.running = True
        self.applied: collections.Counter = collections.Counter()
        self.latest: bytes | None = None  # the newest "frame" event, ready to write
        self.seq = 0  # bumped with every new event
        self.status: bytes | None = None
        self.subscribers = 0
        self.last_seen = time.monotonic()
        self.closed = False
        self.thread = threading.Thread(target=self._work, name=f"uwm-play-{sid[:6]}", daemon=True)

    # -- called by request handlers -----------------------------------------------------
    def action(self, name: str | None, phase: str) -> dict:
        with self.cond:
            if phase == "tap":
                self.queue.append(name)
            elif phase == "hold":
                if self.held != name:
                    self.queue.append(name)  # a short press still makes one frame with it
                self.held = name
            else:  # release
                self.held = None
            self.last_seen = time.monotonic()
            self.cond.notify_all()
            return {"queued": len(self.queue), "held": self.held}

    def set_running(self, running: bool) -> dict:
        with self.cond:
            self.running = running
            self.last_seen = time.monotonic()
            self.cond.notify_all()
            return {"running": self.running}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- the worker ---------------------------------------------------------------------
    def _wants_frame(self) -> bool:
        if self.subscribers == 0:
            return False
        return self.n == 0 or self.running or bool(self.queue)

    def _work(self) -> None:
        game = self.game
        while True:
            with self.cond:
                while not self.closed and not game.stopping.is_set() and not self._wants_frame():
                    if self.subscribers == 0 and time.monotonic() - self.last_seen > game.idle_seconds:
                        self.closed = True
                        break
                    self.cond.wait(timeout=1.0)
                if self.closed or game.stopping.is_set():
                    break
            with game.model_lock:
                with self.cond:
                    if self.closed or not self._wants_frame():
                        continue
                    if self.n == 0:
                        action = None  # the first frame has no previous frame to act after
                    elif self.queue:
                        action = self.queue.popleft()
                    else:
                        action = self.held  # None: the model's default ("stay")
                    rollout, epoch = self.rollout, self.epoch
                t0 = time.perf_counter()
                try:
                    frame = rollout.step(action)[0]
                    tokens, evictions = int(rollout.length), int(getattr(rollout, "evictions", 0))
                except Exception as e:  # noqa: BLE001  (shown on the page; the server goes on)
                    self._publish_status(f"generation failed: {type(e).__name__}: {e}", error=True)
                    with self.cond:
                        self.running = False
                        self.queue.clear()
                        self.held = None
                    continue
                gen_ms = (time.perf_counter() - t0) * 1000
            rgb = base64.b64encode(np.ascontiguousarray(frame, dtype=np.uint8).tobytes()).decode("ascii")
            with self.cond:
                if epoch != self.epoch:  # restarted meanwhile: this frame belongs to the old prompt
                    continue
                first = self.n == 0 and game.context is None  # no previous frame: no action
                shown = None if first else (action or game.idle_action)
                self.n += 1
                if shown is not None:
                    self.applied[shown] += 1
                event = {
                    "n": self.n, "epoch": self.epoch, "action": shown, "gen_ms": round(gen_ms, 1), "tokens": tokens,
                    "evictions": evictions, "applied": dict(self.applied), "queued": len(self.queue),
                    "held": self.held, "running": self.running, "prompt": self.prompt,
                    "h": int(frame.shape[0]), "w": int(frame.shape[1]), "rgb": rgb,
                }
                self.latest = sse("frame", event)
                self.seq += 1
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        game.forget(self)

    def _publish_status(self, message: str, error: bool = False) -> None:
        with self.cond:
            self.status = sse("status", {"message": message, "error": error, "epoch": self.epoch})
            self.seq += 1
            self.cond.notify_all()


class FairLock:
    """A lock granted in the order it was asked for, so pages that run continuously take turns
    with the model (a plain Lock lets the thread that just released it take it again)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Game:
    """The model, its settings and the page sessions."""

    def __init__(self, wm, *, prompt: str = "", context: np.ndarray | None = None, window: int | None = None,
                 mode: str = "token", temperature: float = 1.0, seed: int = 0, max_sessions: int = 4,
                 idle_seconds: float = IDLE_SECONDS, diagonals_per_pass: int = 1):
        self.wm = wm
        self.names = list(wm.processor.action_names)
        self.idle_action = "stay" if "stay" in self.names else self.names[0]
        self.context = context
        n_ctx = 0 if context is None else len(context)
        self.context_actions = [wm.default_action()] * max(n_ctx - 1, 0)
        self.window = min(DEFAULT_WINDOW, wm.context_limit) if window is None else int(window)
        if self.window > wm.context_limit:
            raise ValueError(f"--window {self.window} exceeds the model's context of {wm.context_limit} tokens")
        self.mode, self.temperature, self.seed = mode, float(temperature), int(seed)
        self.diagonals_per_pass = int(diagonals_per_pass)
        self.default_prompt = prompt
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self.model_lock = FairLock()  # every model call holds it: one frame at a time
        self.lock = threading.Lock()  # guards self.sessions
        self.sessions: dict[str, PlaySession] = {}
        self.pending = 0  # sessions being made (their slots are taken)
        self.workers: list[threading.Thread] = []
        self.stopping = threading.Event()

    def new_rollout(self, prompt: str):
        """A RolloutSession for ``prompt`` (call with the model lock held); ValueError when it does not fit."""
        return self.wm.session(text=prompt, context=self.context, context_actions=self.context_actions,
                               temperature=self.temperature, seed=self.seed, mode=self.mode, window=self.window,
                               recent=RECENT_FRAMES, diagonals_per_pass=self.diagonals_per_pass)

    def check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str):
            raise BadRequest("prompt", f"prompt must be a string, got {type(prompt).__name__}", "a string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest("prompt", f"prompt is {len(prompt)} characters long, more than {MAX_PROMPT_CHARS}",
                             f"at most {MAX_PROMPT_CHARS} characters")
        return prompt

    def _rollout_or_400(self, prompt: str):
        try:
            return self.new_rollout(prompt)
        except ValueError as e:  # the prompt (with the context) does not fit the window
            raise BadRequest("prompt", f"prompt does not fit: {e}",
                             f"a shorter prompt (the session window is {self.window} tokens)") from None

    def create(self, prompt: str) -> PlaySession:
        """A new session. The cap holds under a burst: a slot is taken (``pending``) in the same
        locked step that checks it, before the slow part (the prompt's prefill), and given back
        if that fails; when every slot is taken, the session idle longest (no page attached) ends,
        and when none is idle the request gets 503."""
        prompt = self.check_prompt(prompt)
        with self.lock:
            if len(self.sessions) + self.pending >= self.max_sessions:
                idle = [s for s in self.sessions.values() if s.subscribers == 0]
                if not idle:
                    raise BadRequest("session", f"all {self.max_sessions} play sessions are in use",
                                     "fewer open pages (or a larger --max-sessions)", status=503)
                oldest = min(idle, key=lambda s: s.last_seen)
                oldest.close()
                self.sessions.pop(oldest.id, None)
            self.pending += 1
        try:
            with self.model_lock:
                rollout = self._rollout_or_400(prompt)
            sess = PlaySession(self, secrets.token_urlsafe(12), prompt, rollout)
        except BaseException:
            with self.lock:
                self.pending -= 1
            raise
        with self.lock:
            self.pending -= 1
            self.sessions[sess.id] = sess
            self.workers = [t for t in self.workers if t.is_alive()] + [sess.thread]
        sess.thread.start()
        return sess

    def attach(self, sid) -> PlaySession:
        """A page's stream joins session ``sid``: checked and counted under the sessions' lock, so
        :meth:`create` never ends a session a page has just attached to."""
        sess = self.get(sid)
        with self.lock:
            with sess.cond:
                if sess.closed or self.sessions.get(sess.id) is not sess:
                    raise BadRequest("session", f"session '{sid[:64]}' has ended",
                                     "the id of a live session (POST /api/session for a new one)")
                sess.subscribers += 1
                sess.last_seen = time.monotonic()
                sess.cond.notify_all()
        return sess

    def restart(self, sess: PlaySession, prompt: str) -> None:
        prompt = self.check_prompt(prompt)
        with self.model_lock:
            rollout = self._rollout_or_400(prompt)
            with sess.cond:
                sess.rollout, sess.prompt = rollout, prompt
                sess.epoch += 1
                sess.n = 0
                sess.queue.clear()
                sess.held = None
                sess.applied.clear()
                sess.latest = None
                sess.running = True
                sess.last_seen = time.monotonic()
                sess.cond.notify_all()

    def get(self, sid) -> PlaySession:
        if not isinstance(sid, str) or not sid:
            raise BadRequest("session", f"session must be a non-empty string, got {sid!r}",
                             "the id returned by POST /api/session")
        with self.lock:
            sess = self.sessions.get(sid)
        if sess is None or sess.closed:
            raise BadRequest("session", f"unknown session '{sid[:64]}'",
                             f"the id returned by POST /api/session (a session ends {self.idle_seconds:.0f} s "
                             f"after its page disconnects)")
        return sess

    def forget(self, sess: PlaySession) -> None:
        with self.lock:
            if self.sessions.get(sess.id) is sess:
                del self.sessions[sess.id]

    def info(self) -> dict:
        p = self.wm.processor
        return {
            "actions": self.names, "idle_action": self.idle_action, "prompt": self.default_prompt,
            "max_prompt_chars": MAX_PROMPT_CHARS, "mode": self.mode, "temperature": self.temperature,
            "seed": self.seed, "window": self.window, "context_frames": 0 if self.context is None else len(self.context),
            "frame_size": [int(p.video.image_size), int(p.video.image_size)], "tokens_per_frame": int(p.tokens_per_frame),
            "phases": list(PHASES),
        }

    def stop(self, timeout: float = 30.0) -> None:
        """End every session and wait for the workers: a daemon thread still inside torch when the
        interpreter exits aborts the process."""
        self.stopping.set()
        with self.lock:
            sessions, workers = list(self.sessions.values()), list(self.workers)
        for s in sessions:
            s.close()
        deadline = time.monotonic() + timeout
        for t in workers:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm play", description="Play a world model in the browser (a local page).")
    ap.add_argument("--model", required=True, help="exported model folder (uwm export)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless --allow-remote)")
    ap.add_argument("--port", type=int, default=0, help="port (0: any free port; the URL is printed)")
    ap.add_argument("--prompt", default="", help="the text prompt a new page starts with (editable on the page)")
    ap.add_argument("--context", default=None, help="a video or image whose frames start every session")
    ap.add_argument("--window", type=int, default=None,
                    help=f"tokens a session keeps before it evicts old frames (default: {DEFAULT_WINDOW}, "
                         "or the model's context if smaller)")
    ap.add_argument("--mode", choices=("token", "diagonal"), default="token",
                    help="decoding: code by code, or parallel along anti-diagonals (faster)")
    ap.add_argument("--diagonals-per-pass", type=int, default=1,
                    help="with --mode diagonal: anti-diagonals sampled per forward pass (4: ~3x faster than 1)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-sessions", type=int, default=4, help="page sessions served at once")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                    help="connections served at once (page streams included); more are answered 503")
    ap.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                    help="seconds a client may take to send a request; a slower one gets 408 and is dropped")
    ap.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (no authentication!)")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    a = ap.parse_args(argv)
    from unified_wm.play_server import check_address, is_loopback, make_server, url_of  # the server imports this module
    if len(a.prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"--prompt is {len(a.prompt)} characters long, more than {MAX_PROMPT_CHARS}")
    if a.max_sessions < 1:
        raise ValueError(f"--max-sessions must be >= 1, got {a.max_sessions}")
    if a.max_connections < a.max_sessions + 1:
        raise ValueError(f"--max-connections must be > --max-sessions ({a.max_sessions}): each page holds one "
                         f"connection for its frames and needs another for its messages; got {a.max_connections}")
    if not a.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    check_address(a.host, a.port, a.allow_remote)  # before loading anything
    if a.allow_remote and not is_loopback(a.host):
        print(f"\n*** WARNING: serving on '{a.host}', beyond this machine, with NO authentication: anyone who can "
              f"reach it can drive the model and use this CPU. ***\n", file=sys.stderr, flush=True)
    from unified_wm.rollout import WorldModel
    from unified_wm.video_io import read_video

    wm = WorldModel.from_pretrained(a.model)
    context = read_video(a.context) if a.context else None
    if context is not None:
        try:
            wm.processor.encode_frames(context)
        except ValueError as e:
            raise ValueError(f"--context '{a.context}': {e}") from None
    game = Game(wm, prompt=a.prompt, context=context, window=a.window, mode=a.mode,
                temperature=a.temperature, seed=a.seed, max_sessions=a.max_sessions,
                diagonals_per_pass=a.diagonals_per_pass)
    with game.model_lock:  # the defaults must make a session: bad flags fail here, not on the page
        try:
            game.new_rollout(a.prompt)
        except ValueError as e:
            raise ValueError(f"--prompt/--window: {e}") from None
    server = make_server(game, a.host, a.port, allow_remote=a.allow_remote, quiet=not a.verbose,
                         request_timeout=a.request_timeout, max_connections=a.max_connections)

    def _term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)  # stop as on Ctrl-C: end the sessions, join their workers
    url = url_of(server)
    print(f"uwm play: serving {Path(a.model)} at {url}  (actions: {', '.join(game.names)}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        game.stop()
        server.server_close()
    print("uwm play: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
