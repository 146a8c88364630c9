"""The model's KV cache and the stream state it carries.

A cached forward pass feeds only new ids, yet the stream layout (chunks, documents, 3d positions)
and Mixture-of-Contexts decoding depend on everything fed so far. That state lives here, declared
once (:class:`StreamState`), on the cache it belongs to; the cache also owns going back
(:meth:`UWMCache.snapshot` / :meth:`UWMCache.restore`, for parallel decoding) and forgetting
(:meth:`UWMCache.evict`, for unbounded streaming).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
import transformers
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import new_decode_state

# The model passes its cache to and from transformers as ``cache`` (outputs, generate()), the name
# transformers 5.24 gave what was ``past_key_values``: an older transformers fails here, by name.
if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:
    raise ImportError(f"unified_wm needs transformers>=5.24 (model outputs and generate() pass the key/value cache as "
                      f"'cache'); this environment has transformers {transformers.__version__}: "
                      f"pip install -U 'transformers>=5.24,<6'")


@dataclass
class StreamState:
    """What a cache remembers beside keys and values.

    ids          every id fed so far ``[B, N]`` (the layout is derived from ids alone).
    layout       ``(k_meta, modality, scan_state)`` of those ids, continued step by step
                 (None: lay the ids out again on the next step).
    attn_states  one attention decode state per layer (Mixture-of-Contexts chunk sums), or
                 None before the first step.
    """

    ids: torch.Tensor | None = None
    layout: tuple | None = None
    attn_states: list | None = None


def stream_state(cache: Cache) -> StreamState:
    """The :class:`StreamState` of ``cache``, created on first use (so any transformers ``Cache``,
    e.g. the ``DynamicCache`` that ``generate()`` makes, works with the model)."""
    st = getattr(cache, "uwm_state", None)
    if st is None:
        st = StreamState()
        cache.uwm_state = st
    return st


def new_decode_states(cfg) -> list:
    """One attention decode state per layer (None for backends that need none)."""
    return [new_decode_state(cfg.attention_settings()) for _ in range(cfg.num_hidden_layers)]


def layer_decode_state(cache: Cache, layer_idx: int):
    """The attention decode state of layer ``layer_idx`` kept beside the KV cache (or None)."""
    states = stream_state(cache).attn_states
    return None if states is None else states[layer_idx]


class GrowingKVLayer(DynamicLayer):
    """A KV-cache layer with amortised O(1) appends.

    ``DynamicLayer`` concatenates, copying the whole history on every new token; here keys and
    values live in a buffer that doubles when full and are handed out as views, so the cost of
    one decoding step does not grow with the length of the video.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._kbuf = self._vbuf = None
        n = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
        m = n + key_states.shape[-2]
        buf = getattr(self, "_kbuf", None)
        if buf is None or m > buf.shape[-2] or buf.shape[:2] != key_states.shape[:2]:
            cap = max(256, 2 * m)
            kb = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
            if n:
                kb[..., :n, :] = self.keys
                vb[..., :n, :] = self.values
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[..., n:m, :] = key_states
        self._vbuf[..., n:m, :] = value_states
        self.keys, self.values = self._kbuf[..., :m, :], self._vbuf[..., :m, :]
        return self.keys, self.values


class UWMCache(DynamicCache):
    """The model's KV cache: ``DynamicCache`` with growing buffers (see ``GrowingKVLayer``) and
    the stream state (:class:`StreamState`, attribute ``uwm_state``)."""

    def __init__(self, config: PretrainedConfig | None = None, **kwargs):
        Cache.__init__(self, layer_class_to_replicate=GrowingKVLayer)
        self.uwm_state = StreamState()

    # -- rollback (parallel decoding) --------------------------------------------------
    def snapshot(self) -> dict:
        """A restore point: the current length, the ids and copies of the decode states."""
        st = self.uwm_state
        return {"n": self.get_seq_length(), "ids": st.ids, "layout": st.layout,
                "states": [None if s is None else s.snapshot() for s in st.attn_states or []]}

    def restore(self, snap: dict) -> None:
        """Go back to ``snap``: tokens fed after it are forgotten (the snapshot stays reusable)."""
        n = snap["n"]
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None and layer.keys.shape[-2] > n:
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        st = self.uwm_state
        st.ids = snap["ids"]
        st.layout = snap.get("layout")  # its tensors are never changed in place
        for s, saved in zip(st.attn_states or [], snap["states"]):
            if s is not None and saved is not None:
                s.restore(saved)

    # -- routing and eviction (unbounded streaming) --------------------------------------
    def routing_counts(self, row: int | None = None) -> dict[int, float]:
        """How often Mixture-of-Contexts routing selected each chunk id so far, summed over layers
        and query heads: of batch row ``row``, or (None) summed over the rows, which then must
        share one layout (the rows of one prompt). Empty for a model without sparse decode states
        (dense attention)."""
        tot: dict[int, float] = {}
        for s in self.uwm_state.attn_states or []:
            if s is None:
                continue
            cids, counts = s.selection_counts()
            if cids.numel():
                ids, n_sel = (cids[0], counts.sum(0)) if row is None else (cids[row], counts[row])
                for cid, n in zip(ids.tolist(), n_sel.tolist()):
                    tot[cid] = tot.get(cid, 0.0) + n
        return tot

    def keep_tokens(self, keep: torch.Tensor, cfg) -> None:
        """Keep only the cached tokens at sorted indices ``keep`` [n] (the same for every row).

        Keys were rotated (RoPE) at their old coordinates in the document; the kept tokens get
        contiguous new ones, so each key is rotated once more by (new - old) on every axis:
        rotations compose, and no pixel or token is re-encoded. The attention decode states rebuild
        from the kept keys on the next step.
        """
        from .modeling_uwm import apply_rope, rope_for, stream_layout_continue  # the model imports this module

        st = self.uwm_state
        ids = st.ids
        old_k = stream_layout_continue(ids, cfg, None)[3][1]
        new_ids = ids[:, keep]
        new_k = stream_layout_continue(new_ids, cfg, None)[3][1]
        delta = new_k - old_k[:, keep]
        for layer in self.layers:
            k, v = layer.keys[..., keep, :], layer.values[..., keep, :]
            cos, sin = rope_for(delta, cfg, torch.float32)
            k = apply_rope(k.float(), cos, sin).to(v.dtype)
            layer._kbuf = layer._vbuf = None
            layer.keys, layer.values = k.contiguous(), v.contiguous()
        st.ids = new_ids
        st.layout = None  # laid out again from the kept ids on the next step
        for s in st.attn_states or []:
            if s is not None:
                s.reset()

    def evict(self, target: int, keep_recent: int, cfg) -> None:
        """Shrink the cache towards ``target`` tokens, whole frames at a time.

        Kept: everything before the first frame (the prompt), the last ``keep_recent`` frames (each
        with the action and caption tokens that follow it), then older frames in the order of how
        often routing selected them, while they fit; frames routing never selected go first.
        """
        from .modeling_uwm import stream_layout

        ids = self.uwm_state.ids[0]
        N = ids.shape[0]
        starts = torch.nonzero(ids == cfg.frame_id).flatten().tolist()
        if not starts:
            return
        prefix = starts[0]
        units = [(s, starts[i + 1] if i + 1 < len(starts) else N) for i, s in enumerate(starts)]
        keep_units = set(range(max(0, len(units) - keep_recent), len(units)))
        budget = target - prefix - sum(units[i][1] - units[i][0] for i in keep_units)
        meta, _ = stream_layout(self.uwm_state.ids[:1], cfg)
        lookup = self.routing_counts()
        score = torch.tensor([lookup.get(int(c), 0.0) for c in meta.chunk_ids[0].tolist()], device=ids.device)
        old = [i for i in range(len(units)) if i not in keep_units]
        old.sort(key=lambda i: -float(score[units[i][0]:units[i][1]].sum()))
        for i in old:
            size = units[i][1] - units[i][0]
            if size <= budget and float(score[units[i][0]:units[i][1]].sum()) > 0:
                keep_units.add(i)
                budget -= size
        keep = list(range(prefix))
        for i in sorted(keep_units):
            keep += list(range(*units[i]))
        self.keep_tokens(torch.tensor(keep, device=ids.device), cfg)
