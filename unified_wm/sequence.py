"""Task templates: how an episode becomes one document of the interleaved stream.

A document is ``<bos>`` + segments + ``<eos>``. Segments:

  text    ``<text> pieces </text>``      modality text
  act     ``<act> a </act>``             modality action
  frame   ``<frame> v0 ... v(hw-1)``     modality video (one chunk per ``max_chunk_len`` codes)

Each template orders the segments and gives every token a loss weight (0 = no loss):

  interleaved  caption, then frame, action, frame, ... with event captions before their
               frame. World dynamics (video), policy (actions) and text-to-video in one.
  caption      frames and actions first, then the caption: captioning.
  inverse      frame t, frame t+1, then the action between them: inverse dynamics.

Chunk boundaries are NOT stored: the model derives them from the ids (one rule, in
``unified_wm.model.modeling_uwm.stream_layout``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, BOS, EOS, FRAME, TEXT_CLOSE, TEXT_OPEN

TEMPLATES = ("interleaved", "caption", "inverse")
MODALITY_KEYS = ("special", "text", "action", "video")


@dataclass
class TaskWeights:
    """Loss weight per modality of the target token for one template (0 switches it off)."""

    special: float = 1.0
    text: float = 1.0
    action: float = 1.0
    video: float = 1.0


@dataclass
class Document:
    input_ids: list[int] = field(default_factory=list)
    loss_weight: list[float] = field(default_factory=list)

    def add(self, ids, weight: float) -> None:
        ids = [int(i) for i in ids]
        self.input_ids += ids
        self.loss_weight += [float(weight)] * len(ids)


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
              weights: TaskWeights) -> Document:
        """One document. ``frame_ids`` [T, hw] stream ids; ``action_ids`` T-1 lists; captions [{t, text}]."""
        if template not in TEMPLATES:
            raise ValueError(f"unknown task template '{template}'; valid templates: {', '.join(TEMPLATES)}")
        T = len(frame_ids)
        if len(action_ids) != T - 1:
            raise ValueError(f"{T} frames need {T - 1} actions, got {len(action_ids)}")
        caps = {int(c["t"]): c["text"] for c in captions}
        doc = Document()
        doc.add([BOS], 0.0)
        if template == "interleaved":
            for t in range(T):
                if t in caps:
                    self._text(doc, caps[t], weights)
                self._frame(doc, frame_ids[t], weights)
                if t < T - 1:
                    self._act(doc, action_ids[t], weights)
        elif template == "caption":
            for t in range(T):
                self._frame(doc, frame_ids[t], TaskWeights(0, 0, 0, 0))
                if t < T - 1:
                    self._act(doc, action_ids[t], TaskWeights(0, 0, 0, 0))
            self._text(doc, caps.get(0, ""), weights)
        elif template == "inverse":
            self._frame(doc, frame_ids[0], TaskWeights(0, 0, 0, 0))
            for t in range(T - 1):
                self._frame(doc, frame_ids[t + 1], TaskWeights(0, 0, 0, 0))
                self._act(doc, action_ids[t], weights)
        doc.add([EOS], weights.special if template != "caption" else weights.text)
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
