"""Captioning: does the model's caption of real frames name the right objects and events?

Two kinds of caption, both written by the model with the stream grammar enforced
(``model.generate``, greedy, up to ``</text>``), both from real frames of held-out episodes:

* ``scene``   the ``caption`` template: frame 0, act 0, ..., frame T-1, then ``<text>`` and the
              model writes the episode description (ground truth: the caption at t=0, e.g.
              ``"a red car and a blue ball; the camera looks at the road; the red car is in view"``).
* ``events``  the ``interleaved`` template: caption(0), frame 0, act 0, ..., frame t-1, act t-1,
              then ``<text>`` where the data has an event caption at t, and the model writes it
              (ground truth e.g. ``"the camera pans right; the red car enters from the left"``).

Scores (each a rate over the captions; a baseline caption is scored the same way):

* ``exact_match``   the caption equals the ground truth exactly;
* ``object_hit``    share of the ground truth's objects (colour + kind, e.g. "red car") that the
                    caption names (recall); ``object_precision`` the share of named objects that
                    are right; ``colour_hit`` / ``kind_hit`` the same recall for colours / kinds
                    alone. Only where the ground truth names such objects (the procedural world);
* ``event_hit``     (event captions) share of the ground truth's clauses (``"; "``-separated:
                    "the camera pans right", "the red car enters from the left") that the
                    caption contains word for word;
* ``clause_hit``    (scene captions) the same for the scene's clauses: the object list, the
                    place the camera looks at ("the camera looks at the road"), the in-view list.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch


def _object_vocab():
    from unified_wm.data.world import KINDS, PALETTE

    return list(PALETTE), list(KINDS)


def objects_in(text: str) -> set[str]:
    """Objects a caption names as "colour kind" ("red car"); empty for captions of other sources."""
    colours, kinds = _object_vocab()
    pat = re.compile(r"\b(" + "|".join(colours) + r") (" + "|".join(kinds) + r")\b")
    return {f"{c} {k}" for c, k in pat.findall(text.lower())}


def clauses(text: str) -> list[str]:
    return [c.strip() for c in text.lower().split(";") if c.strip()]


def score_caption(pred: str, truth: str) -> dict:
    """Per-caption scores (None where a score does not apply to this ground truth)."""
    t_obj, p_obj = objects_in(truth), objects_in(pred)
    t_cl, p_cl = clauses(truth), set(clauses(pred))
    out = {"exact_match": float(pred.strip() == truth.strip()),
           "clause_hit": float(np.mean([c in p_cl for c in t_cl])) if t_cl else None,
           "object_hit": None, "object_precision": None, "colour_hit": None, "kind_hit": None}
    if t_obj:
        out["object_hit"] = len(t_obj & p_obj) / len(t_obj)
        out["object_precision"] = (len(t_obj & p_obj) / len(p_obj)) if p_obj else 0.0
        tc, pc = {o.split()[0] for o in t_obj}, {o.split()[0] for o in p_obj}
        tk, pk = {o.split()[1] for o in t_obj}, {o.split()[1] for o in p_obj}
        out["colour_hit"] = len(tc & pc) / len(tc)
        out["kind_hit"] = len(tk & pk) / len(tk)
    return out


def summarize(rows: list[dict], clause_key: str = "clause_hit") -> dict:
    """Mean of each score over the captions it applies to; ``clause_key`` names the clause score."""
    out = {"n": len(rows)}
    for k in ("exact_match", "object_hit", "object_precision", "colour_hit", "kind_hit", "clause_hit"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[clause_key if k == "clause_hit" else k] = float(np.mean(vals)) if vals else None
    return out


@torch.no_grad()
def generate_text(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy, grammar-constrained continuation of ``prompt`` (which ends in ``<text>``) up to ``</text>``."""
    from unified_wm.tokenization.processor import TEXT_CLOSE

    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         eos_token_id=[TEXT_CLOSE], pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(TEXT_CLOSE)] if TEXT_CLOSE in new else new


def caption_prompts(processor, ep: dict, frame_ids: np.ndarray, clip_frames: int, max_events: int):
    """(kind, prompt ids, ground-truth text) for one episode: one scene caption, up to ``max_events`` events."""
    from unified_wm.sequence import StreamBuilder, TaskWeights
    from unified_wm.tokenization.processor import TEXT_OPEN

    T = min(len(frame_ids), clip_frames)
    caps = [c for c in ep["captions"] if int(c["t"]) < T]
    caps0 = [c for c in caps if int(c["t"]) == 0]
    if not caps0:
        return []
    b = StreamBuilder(processor)
    actions = [processor.encode_actions([a]) for a in list(ep["actions"])[: T - 1]]
    out = []
    doc = b.build("caption", frame_ids[:T], actions, caps0, TaskWeights(), episode_id=ep.get("episode_id"))
    cut = len(doc.input_ids) - 1 - doc.input_ids[::-1].index(TEXT_OPEN)
    out.append(("scene", doc.input_ids[: cut + 1], caps0[0]["text"]))
    doc = b.build("interleaved", frame_ids[:T], actions, caps, TaskWeights(), episode_id=ep.get("episode_id"))
    opens = [i for i, t in enumerate(doc.input_ids) if t == TEXT_OPEN]
    by_t = sorted(caps, key=lambda c: int(c["t"]))
    for pos, c in list(zip(opens, by_t))[1:][:max_events]:  # the first <text> is caption(0)
        out.append(("events", doc.input_ids[: pos + 1], c["text"]))
    return out


def most_frequent_captions(episodes) -> dict:
    """The most frequent t=0 caption and the most frequent event caption of ``episodes``."""
    scene, events = Counter(), Counter()
    for ep in episodes:
        for c in ep["captions"]:
            (scene if int(c["t"]) == 0 else events)[c["text"]] += 1
    return {"scene": scene.most_common(1)[0][0] if scene else "",
            "events": events.most_common(1)[0][0] if events else "",
            "scene_count": scene.most_common(1)[0][1] if scene else 0,
            "events_count": events.most_common(1)[0][1] if events else 0}
