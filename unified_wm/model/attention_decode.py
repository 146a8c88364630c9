"""Cached decoding with Mixture of Contexts: a per-layer state that keeps per-chunk key sums, so a
decode step routes and gathers without re-reading past keys."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention_core import BIG, AttentionSettings, StreamMeta
from .attention_routing import (ChunkTable, Routing, accumulate_stats, dense_text_rows, key_mandatory, mandatory_before,
                                query_slots, route, with_padding)

# Decode path (per-token gather) is used for at most this many new queries per call.
DECODE_MAX_QUERIES = 16
# Single-token decode steps read the decode state's exact table sizes back to the host
# only every this many tokens (upper bounds in between: no device->host sync per token).
DECODE_REFRESH_EVERY = 16
# Cached calls with more queries (a frame decoded in parallel) but at most this many
# query x key pairs per row and head use the decode state's routing with a routed boolean
# mask over the cache (one fused kernel; the same semantics as ``reference``) instead of
# re-planning the chunk tiles of the training path.
DECODE_MASKED_MAX_PAIRS = 1 << 21
# A few new queries over a short cache (up to this many keys) take the routed mask too: scoring
# every cached key in one fused kernel costs less than gathering the routed ones, until the
# cache is several times longer than what a query reads (own chunk, top-k chunks, mandatory keys).
DECODE_MASKED_MAX_KEYS = 3072


class MoCDecodeState:
    """Per-layer decode state: per-chunk key sums so a cached step never re-reads old keys.

    The model passes it as ``attend(..., state=s)`` on every call with the FULL cached
    k/v and metas; :meth:`update` ingests only the keys it has not seen yet (the last
    ``Nk - n_seen`` of ``k``). If the cache shrinks or the batch changes, it rebuilds.
    Per batch row it keeps chunk ids, documents, starts, lengths, counts of mandatory
    keys, float32 key sums ``[B, Hkv, C, D]`` and the indices of mandatory keys.
    """

    def __init__(self, n_sink: int = 1):
        self.n_sink = n_sink
        self.reset()

    def reset(self) -> None:
        self.n_seen = 0
        self.batch = None

    _TENSORS = ("cid", "doc", "start", "length", "mand_count", "sink_count", "sums", "mand_idx", "sel_count",
                "nc", "nm", "bad")

    def snapshot(self) -> dict:
        """Copies of everything :meth:`update`/:meth:`attend` change (see :meth:`restore`)."""
        if self.batch is None:
            return {"batch": None}
        snap = {name: getattr(self, name).clone() for name in self._TENSORS}
        snap.update(batch=self.batch, n_seen=self.n_seen, c_hi=self.c_hi, m_hi=self.m_hi, lmax=self.lmax, drift=self.drift)
        return snap

    def restore(self, snap: dict) -> None:
        if snap.get("batch") is None:
            self.reset()
            return
        for name in self._TENSORS:
            setattr(self, name, snap[name].clone())
        self.batch, self.n_seen, self.lmax = snap["batch"], snap["n_seen"], snap["lmax"]
        self.c_hi, self.m_hi, self.drift = snap["c_hi"], snap["m_hi"], snap["drift"]

    def selection_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk ids [B, C], how often routing selected each chunk since the state was built)."""
        if self.batch is None:
            return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
        C = int(self.nc.max())
        return self.cid[:, :C], self.sel_count[:, :C]

    # Tables hold one spare column at the end (index ``width - 1``): the scatters of an update
    # send padding tokens there, and it is reset to its fill value afterwards.
    _FILL = {"cid": BIG, "doc": -2, "start": BIG, "length": 0, "mand_count": 0, "sink_count": 0, "sums": 0.0,
             "sel_count": 0.0}

    def _alloc(self, B: int, Hkv: int, D: int, device) -> None:
        cap = 16
        self.batch, self.Hkv, self.D = B, Hkv, D
        for name, fill in self._FILL.items():
            shape = (B, Hkv, cap + 1, D) if name == "sums" else (B, cap + 1)
            setattr(self, name, torch.full(shape, fill, dtype=torch.float32 if isinstance(fill, float) else torch.long, device=device))
        self.mand_idx = torch.full((B, cap + 1), -1, dtype=torch.long, device=device)
        self.nc = torch.zeros(B, dtype=torch.long, device=device)  # chunks per row (on the device)
        self.nm = torch.zeros(B, dtype=torch.long, device=device)  # mandatory keys per row
        self.bad = torch.zeros(2, dtype=torch.bool, device=device)  # (chunk id -1 in a document, ids not increasing)
        # host-side upper bounds of max(nc), max(nm) and the longest chunk: exact after a
        # refresh (one device->host read), then grown by the number of new tokens
        self.c_hi = self.m_hi = self.lmax = self.drift = 0

    def _grow(self, name: str, need: int, fill) -> None:
        """At least ``need`` usable columns (plus the spare one)."""
        x = getattr(self, name)
        dim = 2 if name == "sums" else 1
        cap = x.shape[dim] - 1
        if need <= cap:
            return
        shape = list(x.shape)
        shape[dim] = max(need, 2 * cap) - cap
        setattr(self, name, torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim))

    def _refresh(self) -> None:
        """Exact bounds from the device (one read), and the layout errors found since the last one."""
        nc, nm, lmax, missing, order = torch.cat([torch.stack([self.nc.max(), self.nm.max(), self.length.max()]),
                                                  self.bad.long()]).tolist()
        if missing:
            raise ValueError("StreamMeta.chunk_ids is -1 for a token whose doc_ids is >= 0; every non-padding token needs a chunk")
        if order:
            raise ValueError("StreamMeta.chunk_ids must increase along the row")
        self.c_hi, self.m_hi, self.lmax, self.drift = nc, nm, lmax, 0

    @torch.no_grad()
    def update(self, k: torch.Tensor, k_meta: StreamMeta) -> None:
        """Ingest keys ``k[:, :, n_seen:]`` (and their metas) into the per-chunk tables.

        All bookkeeping stays on the device; the host reads the exact table sizes back only
        for multi-token calls (prefill) and every ``DECODE_REFRESH_EVERY`` single-token steps,
        using upper bounds in between (extra empty chunk slots and gather columns, masked).
        """
        B, Hkv, Nk, D = k.shape
        if self.batch != B or Nk < self.n_seen or getattr(self, "Hkv", None) != Hkv:
            self.reset()
            self._alloc(B, Hkv, D, k.device)
        n0 = self.n_seen
        T = Nk - n0
        if T == 0:
            return
        memo = k_meta.__dict__.get("_decode_update")
        if memo is not None and memo["key"] == (n0, Nk, B, Hkv, D):
            self._adopt(memo, k)
            return
        m = k_meta.slice(n0)
        cid = m.chunk_ids.long()
        valid = cid >= 0
        self.bad[0] |= ((m.doc_ids >= 0) & ~valid).any()
        mand = key_mandatory(m, self.n_sink) & valid
        sink = (m.pos_in_doc < self.n_sink) & valid
        for name, fill in self._FILL.items():
            self._grow(name, self.c_hi + T, fill)
        self._grow("mand_idx", self.m_hi + T, -1)
        spare = self.cid.shape[1] - 1
        # the previous valid chunk id of each token (ids increase, so a running max)
        last = torch.where(self.nc > 0, self.cid.gather(1, (self.nc - 1).clamp(min=0)[:, None])[:, 0], torch.full_like(self.nc, -1))
        run = torch.maximum(torch.cat([last[:, None], cid[:, :-1]], 1).cummax(1).values, last[:, None])
        self.bad[1] |= (valid & (cid < run)).any()
        new = valid & (cid > run)
        slot = self.nc[:, None] - 1 + new.long().cumsum(1)
        at = torch.where(valid, slot, torch.full_like(slot, spare))
        at_new = torch.where(new, slot, torch.full_like(slot, spare))
        idx = torch.arange(n0, Nk, device=k.device).expand(B, T)
        self.cid.scatter_(1, at_new, cid)
        self.doc.scatter_(1, at_new, m.doc_ids.long())
        self.start.scatter_reduce_(1, at, idx, "amin")
        self.length.scatter_add_(1, at, valid.long())
        self.mand_count.scatter_add_(1, at, mand.long())
        self.sink_count.scatter_add_(1, at, sink.long())
        self.sums.scatter_add_(2, at[:, None, :, None].expand(B, Hkv, T, D), k[:, :, n0:].detach().float())
        mspare = self.mand_idx.shape[1] - 1
        rank = self.nm[:, None] - 1 + mand.long().cumsum(1)
        self.mand_idx.scatter_(1, torch.where(mand, rank, torch.full_like(rank, mspare)), idx)
        for name, fill in self._FILL.items():  # reset the spare column
            (self.sums[:, :, spare] if name == "sums" else getattr(self, name)[:, spare]).fill_(fill)
        self.mand_idx[:, mspare] = -1
        self.nc += new.sum(1)
        self.nm += mand.sum(1)
        self.n_seen = Nk
        self.c_hi, self.m_hi, self.lmax, self.drift = self.c_hi + T, self.m_hi + T, self.lmax + T, self.drift + T
        if T > 1 or self.drift >= DECODE_REFRESH_EVERY:
            self._refresh()
        # every layer of this forward call ingests the same tokens: the chunk layout is the same
        # for all of them, so the next layers take it from here and add their own key sums only
        k_meta.__dict__["_decode_update"] = {"key": (n0, Nk, B, Hkv, D), "at": at,
                                             **{name: getattr(self, name) for name in self._LAYOUT}}

    # the tables that depend on the token layout alone (not on a layer's keys or routing)
    _LAYOUT = ("cid", "doc", "start", "length", "mand_count", "sink_count", "mand_idx", "nc", "nm", "bad",
               "c_hi", "m_hi", "lmax", "drift")

    def _adopt(self, memo: dict, k: torch.Tensor) -> None:
        """:meth:`update` when another layer's state already ingested these tokens: share its
        layout tables (this state was at the same point, so they are the ones it would build)
        and add this layer's keys to its own sums."""
        for name in self._LAYOUT:
            setattr(self, name, memo[name])
        width = self.cid.shape[1] - 1
        self._grow("sums", width, 0.0)
        self._grow("sel_count", width, 0.0)
        at = memo["at"]
        B, Hkv, Nk, D = k.shape
        T = at.shape[1]
        spare = width
        self.sums.scatter_add_(2, at[:, None, :, None].expand(B, Hkv, T, D), k[:, :, Nk - T:].detach().float())
        self.sums[:, :, spare].fill_(0.0)
        self.n_seen = Nk

    def table(self) -> ChunkTable:
        C = self.c_hi
        return ChunkTable(None, self.cid[:, :C], self.doc[:, :C], self.start[:, :C], self.length[:, :C],
                           self.mand_count[:, :C], self.sink_count[:, :C] > 0, None, self.sums[:, :, :C], self.lmax)

    def attend(self, q, k, v, q_meta, k_meta, settings, training=False, stats=None) -> torch.Tensor:
        """Attention of the last ``Nq`` tokens, reading only their routed and mandatory keys."""
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        t = self.table()
        L = max(t.lmax, 1)
        dev = q.device
        j = torch.arange(L, device=dev)
        # the layout part (own chunk, mandatory keys) is the same for every layer of a call
        key = (id(k_meta), t.C, Nk, L, self.m_hi, B, Hq)
        memo = q_meta.__dict__.get("_attend_memo")
        if memo is None or memo[0] != key or memo[1] is not self.start:
            memo = q_meta.__dict__["_attend_memo"] = (key, self.start) + self._attend_layout(t, q_meta, k_meta, j, Hq)
        _, _, qslot, qdoc, q_index, key_mand_full, own_idx, own_valid = memo
        sel = route(q, t, qslot, qdoc, settings, training, q_meta.is_text)
        W = sel.shape[-1]
        # routed chunks, their non-mandatory keys -> [B, Hq, Nq, W*L]
        sc = sel.clamp(min=0)
        rstart = t.start[:, None, None, :].expand(B, Hq, Nq, t.C).gather(-1, sc) if W else sc
        rlen = t.length[:, None, None, :].expand(B, Hq, Nq, t.C).gather(-1, sc) if W else sc
        ri = (rstart[..., None] + j).clamp(max=Nk - 1)
        rv = (j < rlen[..., None]) & (sel >= 0)[..., None]
        rv &= ~key_mand_full.gather(1, ri.view(B, -1)).view(ri.shape)
        ri, rv = ri.flatten(-2), rv.flatten(-2)
        o_i, m_i = own_idx
        o_v, m_v = own_valid
        idx = torch.cat([o_i, ri, m_i], -1)
        valid = torch.cat([o_v, rv, m_v], -1)
        Lt = idx.shape[-1]
        gi = idx.view(B, Hkv, G * Nq * Lt, 1).expand(B, Hkv, G * Nq * Lt, D)
        kg = k.gather(2, gi).view(B, Hkv, G, Nq, Lt, D)
        vg = v.gather(2, gi).view(B, Hkv, G, Nq, Lt, D)
        qg = q.view(B, Hkv, G, Nq, D)
        s = torch.einsum("bkgqd,bkgqld->bkgql", qg.float(), kg.float()) / math.sqrt(D)
        s = s.masked_fill(~valid.view(B, Hkv, G, Nq, Lt), float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out = torch.einsum("bkgql,bkgqld->bkgqd", p, vg.float()).reshape(B, Hq, Nq, D).to(q.dtype)
        if stats is not None:
            full = _chunk_table_lite(t, k_meta, self.n_sink)
            accumulate_stats(stats, sel, full, qslot, q_meta, q_index, mandatory_before(full, qslot, q_meta, q_index),
                             dense_text_rows(q_meta, settings))
        if W:  # how often each chunk is selected: unbounded streaming keeps the popular ones
            flat = sel.reshape(B, -1)
            self.sel_count[:, :t.C].scatter_add_(1, flat.clamp(min=0), (flat >= 0).float())
        r = Routing(t, qslot, qdoc, sel, q_index)
        return with_padding(out, v, r)

    def _attend_layout(self, t: ChunkTable, q_meta, k_meta, j: torch.Tensor, Hq: int) -> tuple:
        """What :meth:`attend` reads that depends on the layout alone: the queries' chunk slots,
        documents and indices, the mandatory keys, and the (index, valid) pairs of the own
        chunk's keys (causal by position) [B, Hq, Nq, L] and of the mandatory keys before it in
        the same document [B, Hq, Nq, M]."""
        B, Nq = q_meta.chunk_ids.shape
        Nk, L, M = k_meta.chunk_ids.shape[1], j.shape[0], self.m_hi
        qslot, qdoc = query_slots(t, q_meta)
        q_index = torch.arange(Nk - Nq, Nk, device=j.device).expand(B, Nq)
        own = qslot.clamp(min=0)
        own_start = t.start.gather(1, own) if t.C else torch.zeros_like(own)
        own_len = t.length.gather(1, own) if t.C else torch.zeros_like(own)
        oi = (own_start[:, :, None] + j).clamp(max=Nk - 1)
        ov = (j < own_len[:, :, None]) & (qslot >= 0)[:, :, None]
        ov &= k_meta.positions.gather(1, oi.view(B, -1)).view(B, Nq, L) <= q_meta.positions[:, :, None]
        mi = self.mand_idx[:, :M]
        mic = mi.clamp(min=0)
        mv = (mi[:, None, :] >= 0) & (mic[:, None, :] < own_start[:, :, None]) & (qslot >= 0)[:, :, None]
        mv &= k_meta.doc_ids.long().gather(1, mic)[:, None, :] == qdoc[:, :, None]
        idx = (oi[:, None].expand(B, Hq, Nq, L), mic[:, None, None, :].expand(B, Hq, Nq, M))
        valid = (ov[:, None].expand(B, Hq, Nq, L), mv[:, None].expand(B, Hq, Nq, M))
        return qslot, qdoc, q_index, key_mandatory(k_meta, self.n_sink), idx, valid

    def attend_masked(self, q, k, v, q_meta, k_meta, settings, stats=None) -> torch.Tensor:
        """Many new queries at once (parallel decoding of a frame): route with the decode state's
        chunk sums, then attend to the whole cache under the routed boolean mask."""
        B, Hq, Nq, D = q.shape
        Nk = k.shape[2]
        t = self.table()
        key = (id(k_meta), t.C, Nk)
        memo = q_meta.__dict__.get("_masked_memo")
        if memo is None or memo[0] != key or memo[1] is not self.start:
            # the layout part is the same for every layer of a call
            qslot, qdoc = query_slots(t, q_meta)
            kslot, kdoc = query_slots(t, k_meta)  # slot of every key's chunk
            kmand = key_mandatory(k_meta, self.n_sink)
            own_start = t.start.gather(1, qslot.clamp(min=0)) if t.C else torch.zeros_like(qslot)
            kpos, qpos = k_meta.positions, q_meta.positions
            same_doc = (kdoc[:, None, :] == qdoc[:, :, None]) & (kdoc >= 0)[:, None, :] & (qslot >= 0)[:, :, None]
            own = (kslot[:, None, :] == qslot[:, :, None]) & (kpos[:, None, :] <= qpos[:, :, None])
            mand = kmand[:, None, :] & (torch.arange(Nk, device=q.device)[None, None, :] < own_start[:, :, None])
            base = (own | mand) & same_doc  # [B, Nq, Nk]
            # a key's chunk slot, with chunks the query may not route to (other documents,
            # mandatory-only keys handled by ``base``) sent to a dummy slot C
            kslot_r = torch.where(same_doc, kslot[:, None, :], torch.full_like(base, t.C, dtype=torch.long))
            one_layout = B == 1 and bool((kslot_r[0] == kslot_r[0, :1]).all())  # the same for all queries
            memo = (key, self.start, qslot, qdoc, base, kslot_r, one_layout, bool((qslot < 0).any()))
            q_meta.__dict__["_masked_memo"] = memo
        _, _, qslot, qdoc, base, kslot_r, one_layout, has_pad = memo
        sel = route(q, t, qslot, qdoc, settings, False, q_meta.is_text)  # [B, Hq, Nq, W]
        if sel.shape[-1]:
            picked = torch.zeros(B, Hq, Nq, t.C + 1, dtype=torch.bool, device=q.device)
            picked.scatter_(-1, torch.where(sel >= 0, sel, torch.full_like(sel, t.C)), True)
            picked[..., t.C] = False
            if one_layout:
                mask = picked.index_select(-1, kslot_r[0, 0]) | base[:, None]
            else:
                mask = picked.gather(-1, kslot_r[:, None].expand(B, Hq, Nq, Nk)) | base[:, None]
        else:
            mask = base[:, None].expand(B, Hq, Nq, Nk)
        if sel.shape[-1]:
            flat = sel.reshape(B, -1)
            self.sel_count[:, :t.C].scatter_add_(1, flat.clamp(min=0), (flat >= 0).float())
        if stats is not None:
            full = _chunk_table_lite(t, k_meta, self.n_sink)
            q_index = torch.arange(Nk - Nq, Nk, device=q.device).expand(B, Nq)
            accumulate_stats(stats, sel, full, qslot, q_meta, q_index, mandatory_before(full, qslot, q_meta, q_index),
                             dense_text_rows(q_meta, settings))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != k.shape[1])
        return with_padding(out, v, Routing(t, qslot, qdoc, sel, None)) if has_pad else out


def _chunk_table_lite(t: ChunkTable, k_meta: StreamMeta, n_sink: int) -> ChunkTable:
    """``t`` plus the per-key mandatory flags that statistics need."""
    return ChunkTable(t.kslot, t.cid, t.doc, t.start, t.length, t.mand_count, t.sink_chunk,
                       key_mandatory(k_meta, n_sink), t.sums, t.lmax)


def new_decode_state(settings: AttentionSettings) -> MoCDecodeState | None:
    """A fresh per-layer decode state for ``settings`` (None for ``dense``/``reference``,
    which recompute everything from the full cache)."""
    if settings.backend in ("dense", "reference"):
        return None
    return MoCDecodeState(settings.n_sink)
