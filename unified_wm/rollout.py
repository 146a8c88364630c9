"""Roll a world model out from a text + action prompt into video.

Python::

    from unified_wm.rollout import WorldModel
    wm = WorldModel.from_pretrained("runs/demo/hf")
    frames = wm.rollout(text="a red car drives right", actions=["right", "right", "stay"], frames=16)

Command line (same code path)::

    uwm rollout --model runs/demo/hf --prompt "a red car drives right" --actions right,right,stay \\
        --frames 16 --out out.mp4      # also writes out.gif and out.png (contact sheet)

The stream is ``<bos> <text>prompt</text> <frame> codes <act> a </act> <frame> codes ...``.
Frames are sampled code by code with the KV cache; actions are forced from the list (the last
action is held when the list is shorter than the rollout). Sampling is constrained by the
stream grammar, so every frame is a whole grid of video codes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from unified_wm.video_io import StreamingOutputs, read_video


class WorldModel:
    def __init__(self, model, processor):
        from unified_wm.model.grammar import StreamGrammar
        from unified_wm.sequence import StreamBuilder

        processor.check_model(model.config)
        self.model = model.eval()
        self.processor = processor
        self.builder = StreamBuilder(processor)
        self.video_allowed = StreamGrammar(model.config).allow["video"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "WorldModel":
        from transformers import AutoModelForCausalLM

        from unified_wm.model.modeling_uwm import register

        register()  # the Auto classes know the model (importing the module does it; explicit here)

        from unified_wm.tokenization.processor import UnifiedProcessor

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"model folder '{p}' does not exist (expected a folder written by `uwm export`)")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model folder '{p}' has no config.json (expected a folder written by `uwm export`)")
        from unified_wm.model.checks import check_model_folder

        processor = UnifiedProcessor.from_pretrained(p)
        from transformers import AutoConfig

        from unified_wm.fingerprint import check_model

        check_model_folder(p, processor)  # config.json vs processor sizes, weights readable: errors name the file
        config = AutoConfig.from_pretrained(str(p))  # checked before the weights load
        processor.check_model(config)  # the stream layout (ids of the segment markers)
        check_model(config, processor, f"'{p}'", f"the processor in '{p}' ({p / 'processor_config.json'})")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), config=config)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"model folder '{p}': its weights do not load into the model its config.json "
                             f"describes ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]})") from None
        return cls(model, processor)

    @property
    def context_limit(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one rollout step adds: ``<frame>`` + codes + ``<act> a </act>``."""
        return 1 + self.processor.tokens_per_frame + 2 + self.processor.tokens_per_action

    def tokens_needed(self, prompt_len: int, frames: int) -> int:
        return prompt_len + frames * self.tokens_per_step

    def action_ids(self, actions) -> list[list[int]]:
        """Validated action ids for a list of names (or "a,b,c"); unknown names name the input."""
        p = self.processor
        names = list(actions) if not isinstance(actions, str) else [a for a in actions.split(",") if a]
        return [p.encode_actions([a]) for a in names]

    def default_action(self) -> list[int]:
        p = self.processor
        return p.encode_actions(["stay"]) if "stay" in p.action_names else [p.action_offset]

    def session(self, text: str = "", context: np.ndarray | None = None, context_actions=(), **kw) -> "RolloutSession":
        """A step-by-step rollout (``step(action)`` -> the next frames); see :class:`RolloutSession`."""
        return RolloutSession(self, text, context, context_actions, **kw)

    @torch.no_grad()
    def rollout(self, text: str = "", actions: list[str] | str = (), frames: int = 16, *,
                context: np.ndarray | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = 0, batch: int = 1, cfg_text: float = 1.0, cfg_action: float = 1.0,
                mode: str = "token", diagonals_per_pass: int = 1, window: int | None = None, on_frame=None,
                progress: bool = False, return_codes: bool = False):
        """Generate ``frames`` new frames after the prompt and optional context frames.

        Returns uint8 ``[frames, H, W, 3]``, or ``[batch, frames, H, W, 3]`` when ``batch > 1``
        (row ``i`` is sampled with seed ``seed + i``). Action ``t`` is the action taken after
        frame ``t`` (context frames count first); the last action is held when the list is
        shorter. ``window=None`` refuses a rollout that does not fit the model's context;
        ``window=N`` streams without bound, evicting old frames to stay within N tokens.
        ``on_frame(t, frames [B,H,W,3])`` is called as each frame is made. ``return_codes=True``
        also returns the sampled video codes (stream ids ``[frames, h*w]``, or ``[batch, ...]``).
        """
        if frames <= 0:
            raise ValueError(f"frames must be positive, got {frames}")
        ids = self.action_ids(actions) or [self.default_action()]
        n_ctx = 0 if context is None else len(context)
        act = lambda t: ids[min(t, len(ids) - 1)]  # noqa: E731  (action after frame t)
        sess = self.session(text, context, [act(t) for t in range(max(n_ctx - 1, 0))], temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, batch=batch, cfg_text=cfg_text,
                            cfg_action=cfg_action, mode=mode, window=window, diagonals_per_pass=diagonals_per_pass)
        if window is None:
            self.check_fits(sess, frames)
        res, codes = self._run(sess, frames, lambda f: {"action": act(n_ctx + f - 1)} if n_ctx + f > 0 else {},
                               on_frame, progress)
        if batch == 1:
            res, codes = res[0], codes[0]
        return (res, codes) if return_codes else res

    @torch.no_grad()
    def rollout_rows(self, rows: list[dict], frames: int = 16, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = 0, cfg_text: float = 1.0, cfg_action: float = 1.0,
                     mode: str = "token", diagonals_per_pass: int = 1, progress: bool = False):
        """Several rollouts of different prompts in one batch: ``rows`` holds dicts with ``text``,
        ``actions`` and ``context`` (context frames in every row, or in none). Row ``i``
        is :meth:`rollout` of ``rows[i]`` with ``seed``; the rows share each decoding step, so a
        step of 16 rows costs about twice a step of one on a CPU (``uwm bench rollout``). Shorter
        prompts are padded on the left, which the model reads as outside every document; the
        rows' results equal their one-row rollouts up to float rounding (rows share matrix
        products). Returns (frames uint8 ``[B, frames, H, W, 3]``, codes ``[B, frames, h*w]``)."""
        if frames <= 0:
            raise ValueError(f"frames must be positive, got {frames}")
        sess, step = self.session_rows(rows, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                       cfg_text=cfg_text, cfg_action=cfg_action, mode=mode,
                                       diagonals_per_pass=diagonals_per_pass)
        self.check_fits(sess, frames)
        return self._run(sess, frames, step, None, progress)

    def session_rows(self, rows: list[dict], **kw) -> tuple["RolloutSession", Callable[[int], dict]]:
        """The :class:`RolloutSession` of :meth:`rollout_rows` (sampling keywords ``kw``), and the
        arguments of its step that makes generated frame ``f``: each row's action after its
        previous frame (the last one held when its list is shorter)."""
        bad = [k for r in rows for k in r if k not in ("text", "actions", "context")]
        if bad:
            raise ValueError(f"rows: unknown key '{bad[0]}'; a row holds text, actions, context")
        ids = [self.action_ids(r.get("actions", ())) or [self.default_action()] for r in rows]
        n_ctx = [0 if r.get("context") is None else len(r["context"]) for r in rows]
        act = lambda i, t: ids[i][min(t, len(ids[i]) - 1)]  # noqa: E731  (row i's action after its frame t)
        specs = [{"text": r.get("text", ""), "context": r.get("context"),
                  "context_actions": [act(i, t) for t in range(max(n_ctx[i] - 1, 0))]} for i, r in enumerate(rows)]
        sess = RolloutSession(self, rows=specs, **kw)
        return sess, lambda f: {"row_actions": [act(i, n + f - 1) if n + f > 0 else None for i, n in enumerate(n_ctx)]}

    def check_fits(self, sess: "RolloutSession", frames: int, row: int | None = None) -> None:
        """Refuse ``frames`` more frames after the session's prompt (of batch row ``row`` alone,
        its left padding not counted) when they would not fit the model's context."""
        n = sess.length if row is None else sum(t != self.model.config.pad_token_id for t in sess.branches[0].prompt[row])
        need = n + frames * self.tokens_per_step
        if need > self.context_limit:
            raise ValueError(
                f"prompt ({n} tokens) plus {frames} frames needs {need} tokens, more than the model's "
                f"context of {self.context_limit} tokens; shorten the prompt, ask for fewer frames, or stream "
                f"with a window (--window) that evicts old frames"
            )

    def _run(self, sess: "RolloutSession", frames: int, step_kw, on_frame, progress: bool):
        """Step ``sess`` ``frames`` times (``step_kw(f)``: the arguments of the step that makes
        generated frame ``f``); (frames ``[B, T, H, W, 3]``, codes ``[B, T, h*w]``)."""
        from tqdm import tqdm

        out, codes = [], []
        bar = tqdm(total=frames, desc="rollout", unit="frame", disable=not progress)
        t0 = time.time()
        with _one_thread():
            for f in range(frames):
                fr = sess.step(**step_kw(f))
                out.append(fr)
                codes.append(sess.prev_codes.cpu().numpy())
                if on_frame is not None:
                    on_frame(f, fr)
                bar.update(1)
                bar.set_postfix(fps=f"{(f + 1) / (time.time() - t0):.2f}")
        bar.close()
        return np.stack(out, 1), np.stack(codes, 1)


class _one_thread:
    """Token-by-token decoding of a small model is latency bound: one thread avoids the
    synchronisation cost (and contention) of several on tiny matrices."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


class _Branch:
    """One stream of a rollout with its own KV cache: the conditional stream, or one of the
    unconditional streams of classifier-free guidance (without the text / without actions)."""

    def __init__(self, name: str, prompt: list[list[int]], with_actions: bool, cfg):
        from unified_wm.model.cache import UWMCache

        self.name, self.with_actions = name, with_actions
        self.cache = UWMCache(cfg)
        self.prompt = prompt

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class RolloutSession:
    """Rollout one frame at a time: ``step(action)`` appends the action (after the previous
    frame) and generates the next frame for every row of the batch.

    Sampling: ``temperature`` (0 = greedy), ``top_k``, ``top_p``; row ``i`` uses its own
    generator seeded ``seed + i``. Logits are masked to video codes inside a frame (the
    stream grammar), so every frame is a whole grid of codes.

    Classifier-free guidance: ``cfg_text`` / ``cfg_action`` > 1 run extra streams without the
    text prompt / without the action segments (the model learns both forms in training:
    ``train.text_dropout`` / ``train.action_dropout``, and the ``t2v`` template) and combine
    ``l = l_c + (s_t - 1)(l_c - l_no_text) + (s_a - 1)(l_c - l_no_action)`` on the logits.

    ``mode='diagonal'``: parallel decoding of a frame along anti-diagonals of its code grid
    (as MineWorld does): all codes (i, j) with i + j = d are sampled in one forward pass, in
    which the codes not yet sampled hold placeholders (the same code in the previous frame).
    An 8x8 grid takes 15 passes instead of 64; the cost in quality is measured by
    ``uwm bench rollout``.

    ``rows``: a different prompt per row (dicts with ``text``, ``context``, ``context_actions``;
    context frames in every row or in none), padded on the left to one length; each
    row samples with ``seed``, and ``step(row_actions=[...])`` takes an action per row. This is
    how :meth:`WorldModel.rollout_rows` rolls out many episodes at the cost of a few.

    ``window=N`` (tokens): unbounded streaming. Before a frame that would not fit in N tokens,
    the cache evicts old frames (with their actions) without re-encoding anything: it keeps the
    prompt up to the first frame (``<bos>``, text: the attention sink and the text links), the
    ``recent`` newest frames, and the older frames Mixture-of-Contexts routing selected most
    often (``MoCDecodeState.selection_counts``); it frees a quarter of the window at once.
    """

    def __init__(self, wm: "WorldModel", text: str = "", context: np.ndarray | None = None, context_actions=(), *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = 0, batch: int = 1,
                 cfg_text: float = 1.0, cfg_action: float = 1.0, mode: str = "token", window: int | None = None,
                 recent: int = 4, diagonals_per_pass: int = 1, rows: list[dict] | None = None):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if rows is not None:  # one prompt per row (see the class docstring)
            if text or context is not None or len(context_actions) or batch != 1:
                raise ValueError("rows: give each row's text, context and context_actions inside rows, not beside them")
            if not rows:
                raise ValueError("rows: expected at least one row")
            if window is not None:
                raise ValueError("rows: streaming with a window needs one prompt for all rows (evictions are shared)")
            bad = [k for r in rows for k in r if k not in ("text", "context", "context_actions")]
            if bad:
                raise ValueError(f"rows: unknown key '{bad[0]}'; a row holds text, context, context_actions")
            batch = len(rows)
            row_specs = [(r.get("text", ""), r.get("context"), r.get("context_actions", ())) for r in rows]
        else:
            row_specs = [(text, context, context_actions)] * batch
        if mode not in ("token", "diagonal"):
            raise ValueError(f"mode must be 'token' or 'diagonal', got '{mode}'")
        if cfg_text < 0 or cfg_action < 0:
            raise ValueError(f"guidance scales must be >= 0 (1 = off), got cfg_text={cfg_text}, cfg_action={cfg_action}")
        if cfg_text != 1.0 and not all(t for t, _, _ in row_specs):
            raise ValueError("cfg_text needs a text prompt to guide with (got an empty prompt)")
        if temperature < 0 or not (0 < top_p <= 1) or top_k < 0:
            raise ValueError(f"sampling settings out of range: temperature {temperature} (>= 0), top_k {top_k} (>= 0), "
                             f"top_p {top_p} (0 < top_p <= 1)")
        self.wm, self.model, self.p = wm, wm.model, wm.processor
        cfg = self.model.config
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.cfg_text, self.cfg_action, self.mode, self.recent = cfg_text, cfg_action, mode, recent
        if diagonals_per_pass < 1:
            raise ValueError(f"diagonals_per_pass must be >= 1, got {diagonals_per_pass}")
        self.diagonals_per_pass = diagonals_per_pass
        self.B = batch
        self.dev = dev = self.model.device  # every tensor of the session lives where the model does
        # row i samples with seed + i; rows of different prompts each with seed, as if rolled out alone
        seeds = [None if seed is None else seed + (0 if rows is not None else i) for i in range(batch)]
        self.gens = [torch.Generator(device=dev).manual_seed(sd) if sd is not None else None for sd in seeds]
        self.allowed = wm.video_allowed.to(dev)
        if rows is None:  # one prompt, encoded once
            row_specs = row_specs[:1]
        encoded = [(txt, self.p.encode_frames(ctx) if ctx is not None else None,
                    [list(a) for a in acts] if len(acts) else None) for txt, ctx, acts in row_specs]
        n_ctx = {0 if c is None else len(c) for _, c, _ in encoded}
        if 0 in n_ctx and len(n_ctx) > 1:
            raise ValueError(f"rows: every row needs context frames, or none does; got {sorted(n_ctx)} frames")
        self.n_frames = max(n_ctx)  # frames so far (of the row with the most, when their contexts differ)
        self.prev_codes = None if self.n_frames == 0 else torch.stack(
            [torch.as_tensor(c[-1], device=dev) for _, c, _ in encoded]).expand(batch, -1).clone()
        b = wm.builder
        specs = [("cond", False, True)]
        if cfg_text != 1.0:
            specs.append(("no_text", True, True))
        if cfg_action != 1.0:
            specs.append(("no_action", False, False))
        self.branches = []
        for name, drop_text, with_act in specs:
            prompts = [b.prompt("" if drop_text else txt, c, a if with_act else None) for txt, c, a in encoded]
            n = max(map(len, prompts))  # shorter prompts are padded on the left: padding is outside every document
            prompts = [[cfg.pad_token_id] * (n - len(q)) + q for q in prompts] * (batch // len(prompts))
            self.branches.append(_Branch(name, prompts, with_act, cfg))
        self.length = len(self.branches[0].prompt[0])
        min_window = self.length + (recent + 1) * wm.tokens_per_step
        if window is not None and window < min_window:
            raise ValueError(f"window of {window} tokens is too small: the prompt ({self.length} tokens) and "
                             f"{recent} recent frames plus the next need {min_window}")
        if window is not None and window > wm.context_limit:
            raise ValueError(f"window of {window} tokens exceeds the model's context of {wm.context_limit} tokens")
        if self.length > wm.context_limit:
            raise ValueError(f"the prompt and context ({self.length} tokens) need more than the model's context of "
                             f"{wm.context_limit} tokens; shorten the prompt or give fewer context frames")
        self.window = window
        self.evictions = 0
        self.pending: torch.Tensor | None = None  # codes sampled but not yet fed to the caches
        with _one_thread():
            for br in self.branches:
                self._feed(br, torch.tensor(br.prompt, device=dev))

    # -- model calls -------------------------------------------------------------------
    def _feed(self, br: _Branch, ids: torch.Tensor, at: list[int] | None = None) -> torch.Tensor:
        """Feed ``ids`` [B, n]; logits [B, V] of the last token, or [B, len(at), V] at positions ``at``."""
        keep = 1 if at is None else torch.tensor(at, device=self.dev)
        out = self.model(ids, cache=br.cache, use_cache=True, logits_to_keep=keep)
        return out.logits[:, -1] if at is None else out.logits

    def _combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Guided logits from the branches' logits (same order as ``self.branches``)."""
        l_c = logits[0]
        out = l_c.clone()
        for br, l_u in zip(self.branches[1:], logits[1:]):
            s = self.cfg_text if br.name == "no_text" else self.cfg_action
            out += (s - 1.0) * (l_c - l_u)
        return out

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row from logits [B, V] restricted to video codes."""
        logits = logits.float().masked_fill(~self.allowed[: logits.shape[-1]], float("-inf"))
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if self.top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            drop = (sp.cumsum(-1) - sp) >= self.top_p
            probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return torch.cat([torch.multinomial(probs[i], 1, generator=self.gens[i]) for i in range(self.B)])

    # -- one step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, action=None, *, row_actions: list | None = None) -> np.ndarray:
        """Append ``action`` (a name or ids; ignored before the first frame; None holds
        "stay") and generate the next frame: uint8 ``[B, H, W, 3]``. ``row_actions``: one such
        action per row instead (rows may take different actions)."""
        from unified_wm.tokenization.processor import FRAME

        if row_actions is not None and (action is not None or len(row_actions) != self.B):
            raise ValueError(f"row_actions: expected one action per row ({self.B}), got {len(row_actions)}"
                             + (" beside action" if action is not None else ""))
        segs = [[]] * self.B
        if self.n_frames > 0:
            def seg_of(a):
                a = self.wm.default_action() if a is None else (self.p.encode_actions([a]) if isinstance(a, str) else list(a))
                return self.wm.builder.act_segment(a)

            segs = [seg_of(a) for a in row_actions] if row_actions is not None else [seg_of(action)] * self.B
        if self.window is not None and self.branches[0].length + self._pending_len() + self.wm.tokens_per_step > self.window:
            self.flush()
            self._evict()
        with _one_thread():
            # the previous frame's unfed codes, the action and <frame> go in one forward pass
            first = []
            for br in self.branches:
                ids = torch.tensor([(seg if br.with_actions else []) + [FRAME] for seg in segs], device=self.dev)
                if self.pending is not None:
                    ids = torch.cat([self.pending, ids], 1)
                first.append(self._feed(br, ids))
            self.pending = None
            codes = self._frame_diagonal(first) if self.mode == "diagonal" else self._frame_tokens(first)
        self.prev_codes = codes
        self.n_frames += 1
        self.length = self.branches[0].length + self._pending_len()
        return self.p.decode_frames(codes.cpu().numpy())

    def _pending_len(self) -> int:
        return 0 if self.pending is None else self.pending.shape[1]

    def flush(self) -> None:
        """Feed the codes of the last frame that are not in the caches yet (they ride along
        with the next step's first forward pass otherwise)."""
        if self.pending is not None:
            with _one_thread():
                for br in self.branches:
                    self._feed(br, self.pending)
            self.pending = None

    def _frame_tokens(self, logits: list[torch.Tensor]) -> torch.Tensor:
        T = self.p.tokens_per_frame
        if self.window is None and self.branches[0].length + T > self.wm.context_limit:
            raise ValueError(f"the rollout reached the model's context of {self.wm.context_limit} tokens; "
                             f"stream with a window to evict old frames")
        codes = []
        for t in range(T):
            tok = self._sample(self._combine(logits))
            codes.append(tok)
            if t < T - 1:
                logits = [self._feed(br, tok[:, None]) for br in self.branches]
        self.pending = codes[-1][:, None]
        return torch.stack(codes, 1)

    def _frame_diagonal(self, first: list[torch.Tensor]) -> torch.Tensor:
        h, w = self.p.grid
        T = h * w
        guess = self.prev_codes.clone() if self.prev_codes is not None else None
        snaps = [br.cache.snapshot() for br in self.branches]
        G = torch.full((self.B, T), self.p.video_offset, dtype=torch.long, device=self.dev)  # placeholder: code 0
        step = self.diagonals_per_pass
        for d0 in range(0, h + w - 1, step):
            d = d0 + step - 1  # this pass samples diagonals d0..d
            P = [i * w + (e - i) for e in range(d0, min(d, h + w - 2) + 1) for i in range(h) if 0 <= e - i < w]
            P.sort()
            m = max(P)
            if m == 0:
                logits = [{0: l} for l in first]  # noqa: E741
            else:
                fill = G.clone()
                if guess is not None:  # codes not sampled yet hold the previous frame's code
                    done = torch.zeros(T, dtype=torch.bool, device=self.dev)
                    done[[i * w + j for i in range(h) for j in range(w) if i + j < d0]] = True
                    fill[:, ~done] = guess[:, ~done]
                logits = []
                later = [t for t in P if t > 0]
                for br, snap, l0 in zip(self.branches, snaps, first):
                    br.cache.restore(snap)
                    out = self._feed(br, fill[:, :m], at=[t - 1 for t in later])  # input t-1 predicts code t
                    logits.append({0: l0, **{t: out[:, i] for i, t in enumerate(later)}})
            for t in P:
                G[:, t] = self._sample(self._combine([lg[t] for lg in logits]))
        for br, snap in zip(self.branches, snaps):
            br.cache.restore(snap)
        self.pending = G  # fed with the next step's first pass (or flush())
        return G

    # -- unbounded streaming -----------------------------------------------------------
    def _evict(self) -> None:
        target = self.window - max(self.window // 4, self.wm.tokens_per_step)
        for br in self.branches:
            br.cache.evict(target, self.recent, self.model.config)
        self.evictions += 1


def load_episode_prompt(spec: str, n_context: int):
    """``DATASET:INDEX`` -> (caption, first ``n_context`` frames, logged action names)."""
    from unified_wm.data.episodes import get_episode, load_episodes

    path, sep, idx = spec.rpartition(":")
    if not sep or not path or not idx.isdigit():
        raise ValueError(f"--episode '{spec}' must be DATASET:INDEX (an episode folder and a 0-based episode number)")
    ds = load_episodes(path)
    i = int(idx)
    if i >= len(ds):
        raise ValueError(f"--episode '{spec}': the dataset has {len(ds)} episodes (0..{len(ds) - 1})")
    ep = get_episode(ds, i)
    frames = np.asarray(ep["frames"])
    if n_context < 1 or n_context > len(frames):
        raise ValueError(f"--context-frames must be in 1..{len(frames)} for episode {i}, got {n_context}")
    caps = [c["text"] for c in ep.get("captions") or [] if int(c.get("t", 0)) == 0]
    actions = [str(a) for a in ep.get("actions", [])]
    return (caps[0] if caps else ""), frames[:n_context], actions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm rollout", description="Roll out video from a text + action prompt.")
    ap.add_argument("--model", required=True, help="exported model folder (uwm export)")
    ap.add_argument("--prompt", default=None, help="text prompt (default: the episode's caption with --episode)")
    ap.add_argument("--actions", default="", help="comma-separated action names, or a file with one per line "
                                                   "(default: the episode's logged actions with --episode)")
    ap.add_argument("--frames", type=int, default=16)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--context", default=None, help="a video or image whose frames start the rollout")
    src.add_argument("--episode", default=None, help="DATASET:INDEX: start from an episode's caption, first frames and actions")
    ap.add_argument("--context-frames", type=int, default=1, help="frames of --episode used as context")
    ap.add_argument("--out", required=True, help="output .mp4 (a .gif and a .png contact sheet are written beside it)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="rollouts sampled together (seeds seed..seed+batch-1)")
    ap.add_argument("--cfg-text", type=float, default=1.0, help="classifier-free guidance scale on the text (1 = off)")
    ap.add_argument("--cfg-action", type=float, default=1.0, help="classifier-free guidance scale on the actions (1 = off)")
    ap.add_argument("--mode", choices=("token", "diagonal"), default="token",
                    help="token: one code per step; diagonal: a whole anti-diagonal of the code grid per step (faster)")
    ap.add_argument("--diagonals-per-pass", type=int, default=1, help="with --mode diagonal: diagonals sampled per pass")
    ap.add_argument("--window", type=int, default=None,
                    help="stream without bound: keep the cache within this many tokens by evicting old frames")
    ap.add_argument("--fps", type=int, default=8)
    a = ap.parse_args(argv)
    try:
        from unified_wm.utils import check_out_file

        for i in range(a.batch):  # every file it will write, before the (slow) work
            check_out_file(a.out if a.batch == 1 else Path(a.out).with_name(f"{Path(a.out).stem}-{i}{Path(a.out).suffix}"),
                           "--out")
        wm = WorldModel.from_pretrained(a.model)
        from unified_wm.tokenization.actions import parse_actions

        prompt, context, logged = a.prompt, None, []
        if a.episode:
            cap, context, logged = load_episode_prompt(a.episode, a.context_frames)
            prompt = cap if prompt is None else prompt
        elif a.context:
            context = read_video(a.context, what="context video")
            size = wm.processor.video.image_size
            if context.shape[1:] != (size, size, 3):
                raise ValueError(f"--context '{a.context}' has {context.shape[2]}x{context.shape[1]} frames; this model's "
                                 f"video tokenizer takes {size}x{size} RGB frames (resize the video first)")
        actions = a.actions
        if actions and Path(actions).is_file():
            actions = ",".join(ln.strip() for ln in Path(actions).read_text().splitlines() if ln.strip())
        names = parse_actions(actions, wm.processor.action_names) if actions else \
            parse_actions(logged, wm.processor.action_names) if logged else []
        out = StreamingOutputs(a.out, a.batch, a.fps)
        t0 = time.time()
        try:
            frames = wm.rollout(prompt or "", names, a.frames, context=context, temperature=a.temperature,
                                top_k=a.top_k, top_p=a.top_p, seed=a.seed, batch=a.batch, cfg_text=a.cfg_text,
                                cfg_action=a.cfg_action, mode=a.mode, window=a.window, on_frame=out, progress=True,
                                diagonals_per_pass=a.diagonals_per_pass)
            dt = time.time() - t0
            paths = out.close()
        except BaseException:
            out.abort()
            raise
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = frames.shape[-4] * a.batch
    print(f"wrote {n} frames in {dt:.1f}s ({n / dt:.2f} frames/s): " + "; ".join(", ".join(p.values()) for p in paths))
    return 0
