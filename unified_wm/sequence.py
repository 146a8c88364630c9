"""Task templates: how an episode becomes one document of the interleaved stream.

A document is ``<bos>`` + segments + ``<eos>``. Segments:

  text    ``<text> pieces </text>``      modality text
  act     ``<act> a </act>``             modality action
  frame   ``<frame> v0 ... v(hw-1)``     modality video (one chunk per ``max_chunk_len`` codes)

Each template orders the segments and gives every token a loss weight (0 = no loss). A
segment's markers (``<text>``/``</text>``, ``<act>``/``</act>``, ``<frame>``) carry the
``special`` weight when the segment is a target and 0 when it is context. ``<bos>`` never
carries loss; ``<eos>`` carries ``special`` (``text`` for ``caption``, whose target ends the
document). With T frames, captions [{t, text}] (t=0 describes the episode; t>0 an event
that holds from frame t on):

  interleaved  caption(0), frame 0, act 0, [event caption(1)], frame 1, act 1, ... frame T-1.
               Every token is a target: world dynamics (video), policy (actions) and
               text-to-video and event captioning (text) in one document.        T >= 1
  dynamics     the same order, but only caption(0) (event captions would leak the next
               frame); loss on frames 1..T-1. Frame 0, the caption and the actions are
               context: world dynamics, p(frame t+1 | history, action t).      T >= 2
  t2v          caption(0), frame 0, [event caption(1)], frame 1, ... frame T-1; no action
               segments. Loss on every frame; the captions are the prompt: text-to-video.
                                                                                  T >= 1
  caption      frame 0, act 0, frame 1, ..., frame T-1, then caption(0); loss on that
               final text only: captioning.                                       T >= 1
  inverse      frame 0, frame 1, act 0, frame 2, act 1, ..., frame T-1, act T-2: every
               action comes after both frames it lies between; loss on actions only:
               inverse dynamics.                                                 T >= 2
  policy       caption(0), frame 0, act 0, [event caption(1)], frame 1, act 1, ...,
               frame T-2, act T-2 (the last frame has no action after it and is left
               out); loss on actions only: p(action t | history up to frame t).  T >= 2

A caption at t=0 is optional except for ``caption`` (it is the target) and ``t2v`` (it is
the prompt); an episode without one, or with fewer frames than its template needs
(``MIN_FRAMES``), is a ValueError naming the episode and the template.

Chunk boundaries are NOT stored: the model derives them from the ids (one rule, in
``unified_wm.model.modeling_uwm.stream_layout``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, BOS, EOS, FRAME, TEXT_CLOSE, TEXT_OPEN

TEMPLATES = ("interleaved", "caption", "inverse", "dynamics", "t2v", "policy")
# The three original templates: a default for writers whose output should not change when
# templates are added (`uwm data tokenize` defaults to all of TEMPLATES until it switches to this).
DEFAULT_TEMPLATES = ("interleaved", "caption", "inverse")
# The fewest frames an episode (or clip) needs for each template.
MIN_FRAMES = {"interleaved": 1, "caption": 1, "inverse": 2, "dynamics": 2, "t2v": 1, "policy": 2}
# Templates that cannot be built without a caption at t=0.
NEEDS_CAPTION = ("caption", "t2v")
MODALITY_KEYS = ("special", "text", "action", "video")


@dataclass
class TaskWeights:
    """Loss weight per modality of the target token for one template (0 switches it off)."""

    special: float = 1.0
    text: float = 1.0
    action: float = 1.0
    video: float = 1.0


NO_LOSS = TaskWeights(0.0, 0.0, 0.0, 0.0)


@dataclass
class Document:
    input_ids: list[int] = field(default_factory=list)
    loss_weight: list[float] = field(default_factory=list)

    def add(self, ids, weight: float) -> None:
        ids = [int(i) for i in ids]
        self.input_ids += ids
        self.loss_weight += [float(weight)] * len(ids)


def _only(w: TaskWeights, *modalities: str) -> TaskWeights:
    """``w`` restricted to ``modalities`` (the others switched off); special rides along."""
    return TaskWeights(special=w.special, **{m: (getattr(w, m) if m in modalities else 0.0) for m in ("text", "action", "video")})


class StreamBuilder:
    """Builds documents for the processor's id space."""

    def __init__(self, processor):
        self.p = processor

    def _text(self, doc: Document, text: str, w: TaskWeights) -> None:
        doc.add([TEXT_OPEN], w.special if w.text else 0.0)
        doc.add(self.p.encode_text(text), w.text)
        doc.add([TEXT_CLOSE], w.special if w.text else 0.0)

    def _act(self, doc: Document, action_ids: list[int], w: TaskWeights) -> None:
        doc.add([ACT_OPEN], w.special if w.action else 0.0)
        doc.add(action_ids, w.action)
        doc.add([ACT_CLOSE], w.special if w.action else 0.0)

    def _frame(self, doc: Document, frame_ids, w: TaskWeights) -> None:
        doc.add([FRAME], w.special if w.video else 0.0)
        doc.add(frame_ids, w.video)

    def build(self, template: str, frame_ids: np.ndarray, action_ids: list[list[int]], captions: list[dict],
              weights: TaskWeights, *, episode_id: str | None = None) -> Document:
        """One document. ``frame_ids`` [T, hw] stream ids; ``action_ids`` T-1 lists; captions [{t, text}].

        ``episode_id`` only names the input in errors (an episode too short for its template,
        a missing caption, a frame/action count mismatch).
        """
        if template not in TEMPLATES:
            raise ValueError(f"unknown task template '{template}'; valid templates: {', '.join(TEMPLATES)}")
        who = f"episode '{episode_id}'" if episode_id is not None else "episode"
        T = len(frame_ids)
        if T < MIN_FRAMES[template]:
            raise ValueError(
                f"{who} has {T} frame(s); task template '{template}' needs at least {MIN_FRAMES[template]} "
                f"(minimum frames per template: {MIN_FRAMES})"
            )
        if len(action_ids) != T - 1:
            raise ValueError(f"{who}: {T} frames need {T - 1} actions, got {len(action_ids)}")
        caps = {int(c["t"]): c["text"] for c in captions}
        if template in NEEDS_CAPTION and not caps.get(0):
            raise ValueError(f"{who} has no caption at t=0; task template '{template}' needs one (captions: {sorted(caps)})")
        doc = Document()
        doc.add([BOS], 0.0)
        if template == "interleaved":
            for t in range(T):
                if t in caps:
                    self._text(doc, caps[t], weights)
                self._frame(doc, frame_ids[t], weights)
                if t < T - 1:
                    self._act(doc, action_ids[t], weights)
        elif template == "dynamics":
            if 0 in caps:
                self._text(doc, caps[0], NO_LOSS)
            video = _only(weights, "video")
            for t in range(T):
                self._frame(doc, frame_ids[t], video if t > 0 else NO_LOSS)
                if t < T - 1:
                    self._act(doc, action_ids[t], NO_LOSS)
        elif template == "t2v":
            video = _only(weights, "video")
            for t in range(T):
                if t in caps:
                    self._text(doc, caps[t], NO_LOSS)
                self._frame(doc, frame_ids[t], video)
        elif template == "caption":
            for t in range(T):
                self._frame(doc, frame_ids[t], NO_LOSS)
                if t < T - 1:
                    self._act(doc, action_ids[t], NO_LOSS)
            self._text(doc, caps[0], _only(weights, "text"))
        elif template == "inverse":
            act = _only(weights, "action")
            self._frame(doc, frame_ids[0], NO_LOSS)
            for t in range(T - 1):
                self._frame(doc, frame_ids[t + 1], NO_LOSS)
                self._act(doc, action_ids[t], act)
        elif template == "policy":
            act = _only(weights, "action")
            for t in range(T - 1):
                if t in caps:
                    self._text(doc, caps[t], NO_LOSS)
                self._frame(doc, frame_ids[t], NO_LOSS)
                self._act(doc, action_ids[t], act)
        doc.add([EOS], weights.text if template == "caption" else weights.special)
        return doc

    def prompt(self, text: str | None, context_frame_ids: np.ndarray | None = None,
               context_action_ids: list[list[int]] | None = None) -> list[int]:
        """Prefix of an interleaved document for rollout: caption, then any context frames/actions."""
        doc = Document()
        doc.add([BOS], 0)
        if text:
            self._text(doc, text, TaskWeights())
        if context_frame_ids is not None:
            for t, f in enumerate(context_frame_ids):
                self._frame(doc, f, TaskWeights())
                if context_action_ids is not None and t < len(context_action_ids):
                    self._act(doc, context_action_ids[t], TaskWeights())
        return doc.input_ids

    def act_segment(self, action_ids: list[int]) -> list[int]:
        return [ACT_OPEN, *action_ids, ACT_CLOSE]
