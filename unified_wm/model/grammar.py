"""The stream's grammar as a logits processor: which ids may come next at each point of a stream.

Used by ``UnifiedWMForCausalLM.generate`` (on by default) and by the rollout code that samples
frames itself. A flat module with no package imports: an exported model folder carries it
(``remote_code.py``).
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import LogitsProcessor


class StreamGrammar(LogitsProcessor):
    """Mask logits so that generated streams are always well formed.

    - inside a frame (fewer than ``tokens_per_frame`` codes since ``<frame>``): video codes only;
    - after ``<act>`` until ``tokens_per_action`` actions: action ids only, then ``</act>``;
    - inside a text segment: text pieces or ``</text>``;
    - between segments: ``<frame>``, ``<act>``, ``<text>`` or ``<eos>``.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        V = cfg.vocab_size
        self.allow = {}
        def mk(*ranges_or_ids):
            m = torch.zeros(V, dtype=torch.bool)
            for r in ranges_or_ids:
                if isinstance(r, (tuple, list)):
                    m[r[0]:r[1]] = True
                else:
                    m[r] = True
            return m
        self.allow["video"] = mk(tuple(cfg.video_range))
        self.allow["action"] = mk(tuple(cfg.action_range))
        self.allow["act_close"] = mk(cfg.act_close_id)
        self.allow["text"] = mk(tuple(cfg.text_range), cfg.text_close_id)
        self.allow["between"] = mk(cfg.frame_id, cfg.act_open_id, cfg.text_open_id, cfg.eos_token_id)

    def state_of(self, ids: list[int]) -> str:
        c = self.cfg
        for back, t in enumerate(reversed(ids)):
            if t == c.frame_id:
                return "video" if back < c.tokens_per_frame else "between"
            if t == c.act_open_id:
                return "action" if back < c.tokens_per_action else "act_close"
            if t == c.text_open_id:
                return "text"
            if t in (c.text_close_id, c.act_close_id, c.bos_token_id, c.eos_token_id):
                return "between"
        return "between"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        tail = input_ids[:, -1024:].tolist()  # segments are far shorter than this
        for b in range(input_ids.shape[0]):
            allow = self.allow[self.state_of(tail[b])].to(scores.device)
            out[b, ~allow[: scores.shape[-1]]] = float("-inf")
        return out
