"""Mixture-of-Contexts routing, written once for every MoC backend: the chunk table (per-chunk
mean keys, documents, mandatory tokens), the per-head top-k over causal candidates, the
regularisers, the statistics, and the routed mask. The ``reference`` backend (the routed mask fed
to SDPA) is the oracle the other backends are tested against, so it lives here."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .attention_core import BIG, AttentionSettings, StreamMeta, register_attention
from .attention_cpu_kernel import cpu_kernel
from .attention_dense import dense_mask


@dataclass
class ChunkTable:
    """Chunks of the key row, per batch row, as slots ``0..C-1`` (padded with empty slots).

    kslot [B, Nk] slot of each key (-1 padding); cid/doc/start/length/mand_count [B, C]
    (empty slots: cid BIG, doc -2, length 0); key_mand [B, Nk] mandatory (text or sink)
    keys; sink_chunk [B, C] chunk holds a sink token; sums [B, Hkv, C, D] float32 key sums.
    """

    kslot: torch.Tensor | None
    cid: torch.Tensor
    doc: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    mand_count: torch.Tensor
    sink_chunk: torch.Tensor
    key_mand: torch.Tensor | None
    sums: torch.Tensor
    lmax: int

    @property
    def C(self) -> int:
        return self.cid.shape[1]

    def descriptors(self) -> torch.Tensor:
        return self.sums / self.length.clamp(min=1)[:, None, :, None].to(self.sums.dtype)

    def candidates(self) -> torch.Tensor:
        """Chunks that can be routed to: non-empty and not made only of mandatory keys."""
        return (self.length > 0) & (self.mand_count < self.length)


def key_mandatory(meta: StreamMeta, n_sink: int) -> torch.Tensor:
    return (meta.doc_ids >= 0) & (meta.is_text.bool() | (meta.pos_in_doc < n_sink))


@torch.no_grad()
def chunk_table(k: torch.Tensor, k_meta: StreamMeta, n_sink: int) -> ChunkTable:
    cid = k_meta.chunk_ids.long()
    B, N = cid.shape
    dev = cid.device
    if bool(((k_meta.doc_ids >= 0) & (cid < 0)).any()):
        raise ValueError("StreamMeta.chunk_ids is -1 for a token whose doc_ids is >= 0; every non-padding token needs a chunk")
    valid = cid >= 0
    prev = torch.cat([torch.full((B, 1), -1, dtype=cid.dtype, device=dev), cid[:, :-1]], 1)
    new = valid & (cid != prev)
    kslot = torch.where(valid, new.long().cumsum(1) - 1, torch.full_like(cid, -1))
    C = int(new.sum(1).max()) if N else 0
    sidx = torch.where(valid, kslot, torch.full_like(cid, C))
    ar = torch.arange(N, device=dev).expand(B, N)
    length = torch.zeros(B, C + 1, dtype=torch.long, device=dev).scatter_add_(1, sidx, valid.long())[:, :C]
    start = torch.full((B, C + 1), BIG, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, ar, "amin")[:, :C]
    last = torch.full((B, C + 1), -1, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, ar, "amax")[:, :C]
    exists = length > 0
    if bool((exists & (last - start + 1 != length)).any()):
        raise ValueError("StreamMeta.chunk_ids must form contiguous runs (a chunk id reappears after another chunk)")
    ctab = torch.full((B, C + 1), BIG, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, cid, "amin")[:, :C]
    if C > 1 and bool(((ctab[:, 1:] <= ctab[:, :-1]) & exists[:, 1:]).any()):
        raise ValueError("StreamMeta.chunk_ids must increase along the row")
    doc = torch.full((B, C + 1), -2, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, k_meta.doc_ids.long(), "amax")[:, :C]
    key_mand = key_mandatory(k_meta, n_sink)
    mand_count = torch.zeros(B, C + 1, dtype=torch.long, device=dev).scatter_add_(1, sidx, key_mand.long())[:, :C]
    sink = (k_meta.pos_in_doc < n_sink) & valid
    sink_chunk = torch.zeros(B, C + 1, dtype=torch.long, device=dev).scatter_add_(1, sidx, sink.long())[:, :C] > 0
    Hkv, D = k.shape[1], k.shape[3]
    sums = torch.zeros(B, Hkv, C + 1, D, dtype=torch.float32, device=dev)
    sums.scatter_add_(2, sidx[:, None, :, None].expand(B, Hkv, N, D), k.detach().float())
    lmax = int(length.max()) if C else 0
    return ChunkTable(kslot, ctab, doc, start.clamp(max=N), length, mand_count, sink_chunk, key_mand, sums[:, :, :C], lmax)


def query_slots(table: ChunkTable, q_meta: StreamMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each query's own chunk (-1 for padding) and its document ([B, Nq] each)."""
    qc = q_meta.chunk_ids.long()
    qdoc = q_meta.doc_ids.long()
    C = table.C
    if C == 0:
        return torch.full_like(qc, -1), qdoc
    pos = torch.searchsorted(table.cid.contiguous(), qc.contiguous()).clamp(max=C - 1)
    found = (table.cid.gather(1, pos) == qc) & (qc >= 0) & (qdoc >= 0)
    return torch.where(found, pos, torch.full_like(pos, -1)), qdoc


# routing scores held at once (fp32 elements) by the torch path (what CUDA runs): 512 MB
ROUTE_SLICE_SCORES = 1 << 27


@torch.no_grad()
def route(q: torch.Tensor, table: ChunkTable, qslot: torch.Tensor, qdoc: torch.Tensor,
          settings: AttentionSettings, training: bool, q_text: torch.Tensor) -> torch.Tensor:
    """Selected chunk slots ``[B, Hq, Nq, W]`` (-1 = none) for every query and head. With
    ``dense_text_queries``, text queries (``q_text`` [B, Nq]) select none: they read every
    earlier key of their document instead (:func:`dense_text_rows`)."""
    sel = _top_chunks(q, table, qslot, qdoc, settings, training)
    if settings.dense_text_queries and sel.shape[-1]:
        sel = sel.masked_fill(q_text.bool()[:, None, :, None], -1)
    return sel


def _top_chunks(q: torch.Tensor, table: ChunkTable, qslot: torch.Tensor, qdoc: torch.Tensor,
                settings: AttentionSettings, training: bool) -> torch.Tensor:
    B, Hq, Nq, _ = q.shape
    Hkv = table.sums.shape[1]
    G = Hq // Hkv
    C = table.C
    kk = min(settings.top_k - (1 if settings.own_chunk_in_k else 0), C)
    if kk <= 0:
        return torch.full((B, Hq, Nq, 0), -1, dtype=torch.long, device=q.device)
    desc = table.descriptors()
    plain = not (training and (settings.drop_off > 0 or settings.drop_in > 0))
    if plain and q.device.type == "cpu" and q.shape[-1] % 16 == 0 and not torch.isnan(desc).any():
        ext = cpu_kernel()
        if ext is not None:  # same selection as below (ties at the k-th score: lower slot)
            return ext.moc_route(q.detach().float().contiguous(), desc.contiguous(), table.candidates().contiguous(),
                                 table.doc.contiguous(), qslot.contiguous(), qdoc.contiguous(), kk)
    slots = torch.arange(C, device=q.device)
    elig = (table.candidates()[:, None, :] & (table.doc[:, None, :] == qdoc[:, :, None])
            & (slots[None, None, :] < qslot[:, :, None]) & (qslot >= 0)[:, :, None])
    if plain:
        # all heads in one matmul, [B, Hkv, G*L, D] x [B, Hkv, D, C], over slices of L queries so
        # that the fp32 scores [B, Hq, L, C] stay near ROUTE_SLICE_SCORES (the whole [Hq, Nq, C]
        # grows as Nq^2 / chunk: 8.6 GB at 256k tokens); each query's top-k is its own
        qf = q.detach().float().reshape(B, Hkv, G, Nq, -1)
        descT = desc.transpose(-1, -2)
        step = max(1, ROUTE_SLICE_SCORES // max(B * Hq * C, 1))
        out = []
        for a in range(0, Nq, step):
            L = min(step, Nq - a)
            s = torch.matmul(qf[:, :, :, a:a + L].reshape(B, Hkv, G * L, -1), descT).view(B, Hq, L, C)
            s.masked_fill_(~elig[:, None, a:a + L], float("-inf"))
            val, idx = s.topk(kk, dim=-1)
            out.append(torch.where(val > float("-inf"), idx, torch.full_like(idx, -1)))
        return out[0] if len(out) == 1 else torch.cat(out, 2)
    out = []
    for h in range(Hq):
        s = torch.matmul(q[:, h].detach().float(), desc[:, h // G].transpose(-1, -2))
        s = s.masked_fill(~elig, float("-inf"))
        val, idx = s.topk(kk, dim=-1)
        ok = val > float("-inf")
        if training and settings.drop_off > 0:
            ok &= torch.rand(ok.shape, device=q.device) >= settings.drop_off
        sel = torch.where(ok, idx, torch.full_like(idx, -1))
        if training and settings.drop_in > 0:
            r = torch.rand(B, Nq, C, device=q.device).masked_fill(~elig, -1.0)
            r.scatter_(-1, idx, -1.0)
            rv, ri = r.topk(kk, dim=-1)
            keep = (rv >= 0) & (torch.rand(rv.shape, device=q.device) < settings.drop_in)
            sel = torch.cat([sel, torch.where(keep, ri, torch.full_like(ri, -1))], -1)
        out.append(sel)
    return torch.stack(out, 1)


@torch.no_grad()
def accumulate_stats(stats: dict, sel: torch.Tensor, table: ChunkTable, qslot: torch.Tensor,
                      q_meta: StreamMeta, q_index: torch.Tensor, mand_before: torch.Tensor,
                      dense_rows: torch.Tensor | None = None) -> None:
    """Add routing statistics of one call to ``stats`` (accumulated over calls/layers).

    Keys: ``moc_calls``; ``moc_routed_pairs`` / ``moc_causal_pairs`` (allowed vs causal
    same-document query-key pairs, summed over heads) and ``moc_sparsity`` = 1 - ratio;
    ``moc_sel_{prev,sink,text,far,total}`` counts of routed selections by chunk kind
    (previous chunk, chunk holding a sink token, chunk holding text, any other past
    chunk); ``moc_selection_entropy`` mean entropy (nats) of the per-head histogram of
    selected chunks. ``q_index`` [B, Nq] index of each query in the key row;
    ``mand_before`` [B, Nq] mandatory keys of the query's document before its chunk;
    ``dense_rows`` [B, Nq] queries that read every earlier key of their document.
    """
    B, Hq, Nq, W = sel.shape
    C = table.C
    valid_q = qslot >= 0
    own = qslot.clamp(min=0)
    own_causal = (q_index - table.start.gather(1, own) + 1).clamp(min=0)
    ok = sel >= 0
    # everything but "prev" from one histogram of the selected slots per (row, head)
    hist = torch.zeros(B * Hq, C + 1, device=sel.device)
    hist.scatter_add_(1, torch.where(ok, sel, torch.full_like(sel, C)).reshape(B * Hq, -1), ok.reshape(B * Hq, -1).float())
    hist = hist[:, :C].view(B, Hq, C)
    per_chunk = hist.sum(1)  # [B, C] selections of each chunk over heads and queries
    routed_keys = (table.length - table.mand_count).float()
    row_keys = own_causal + mand_before
    if dense_rows is not None:
        row_keys = torch.where(dense_rows.bool(), q_meta.pos_in_doc.long() + 1, row_keys)
    base = (row_keys * valid_q).sum() * Hq
    routed_pairs = float((per_chunk * routed_keys).sum()) + float(base)
    causal_pairs = float(((q_meta.pos_in_doc.long() + 1) * valid_q).sum()) * Hq
    sink_c = table.sink_chunk
    text_c = (table.mand_count > 0) & ~sink_c
    total = int(per_chunk.sum())
    n_sink = int((per_chunk * sink_c).sum())
    n_text = int((per_chunk * text_c).sum())
    prev_slot = qslot - 1
    prev_q = ((sel == prev_slot[:, None, :, None]) & ok).any(-1)  # [B, Hq, Nq]; a chunk is selected at most once
    n_prev = int(prev_q.sum())
    ps = prev_slot.clamp(min=0)
    prev_kind = (sink_c | text_c).gather(1, ps) & (prev_slot >= 0)  # previous chunk holds a sink or text
    n_prev_mand = int((prev_q & prev_kind[:, None, :]).sum())
    n = hist.reshape(B * Hq, C).sum(1, keepdim=True)
    p = hist.reshape(B * Hq, C) / n.clamp(min=1)
    ent = -(p * p.clamp(min=1e-30).log()).sum(1)
    has = n[:, 0] > 0
    add = {
        "moc_calls": 1.0, "moc_routed_pairs": routed_pairs, "moc_causal_pairs": causal_pairs,
        "moc_sel_prev": float(n_prev), "moc_sel_sink": float(n_sink), "moc_sel_text": float(n_text),
        "moc_sel_far": float(total - n_prev - n_sink - n_text + n_prev_mand),
        "moc_sel_total": float(total),
        "moc_entropy_sum": float(ent[has].sum()), "moc_entropy_n": float(has.sum()),
    }
    for key, val in add.items():
        stats[key] = stats.get(key, 0.0) + val
    stats["moc_sparsity"] = 1.0 - stats["moc_routed_pairs"] / max(stats["moc_causal_pairs"], 1.0)
    stats["moc_selection_entropy"] = stats["moc_entropy_sum"] / max(stats["moc_entropy_n"], 1.0)


def mandatory_before(table: ChunkTable, qslot: torch.Tensor, q_meta: StreamMeta, q_index: torch.Tensor) -> torch.Tensor:
    """Mandatory keys of each query's document located before its own chunk ([B, Nq])."""
    km = table.key_mand.long()
    cum = torch.cat([torch.zeros_like(km[:, :1]), km.cumsum(1)], 1)
    own_start = table.start.gather(1, qslot.clamp(min=0)) if table.C else torch.zeros_like(qslot)
    doc_start = (q_index - q_meta.pos_in_doc.long()).clamp(min=0)
    n = cum.gather(1, own_start.clamp(max=km.shape[1])) - cum.gather(1, doc_start.clamp(max=km.shape[1]))
    return torch.where(qslot >= 0, n.clamp(min=0), torch.zeros_like(n))


@dataclass
class Routing:
    table: ChunkTable
    qslot: torch.Tensor
    qdoc: torch.Tensor
    sel: torch.Tensor
    q_index: torch.Tensor


@torch.no_grad()
def plan_routing(q, k, q_meta, k_meta, settings, training, stats) -> Routing:
    table = chunk_table(k, k_meta, settings.n_sink)
    qslot, qdoc = query_slots(table, q_meta)
    sel = route(q, table, qslot, qdoc, settings, training, q_meta.is_text)
    Nq, Nk = q.shape[2], k.shape[2]
    q_index = torch.arange(Nk - Nq, Nk, device=q.device).expand(q.shape[0], Nq)
    if stats is not None:
        accumulate_stats(stats, sel, table, qslot, q_meta, q_index, mandatory_before(table, qslot, q_meta, q_index),
                         dense_text_rows(q_meta, settings))
    return Routing(table, qslot, qdoc, sel, q_index)


def check_shapes(q, k, v, q_meta, k_meta) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B,Hq,Nq,D] and k, v [B,Hkv,Nk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(q_meta.chunk_ids.shape) != (q.shape[0], q.shape[2]) or k_meta.chunk_ids.shape[1] != k.shape[2]:
        raise ValueError("StreamMeta shapes must be [B, Nq] for queries and [B, Nk] for keys")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}); queries are the last tokens of the key row")


@torch.no_grad()
def mask_from_routing(r: Routing, q_meta: StreamMeta, k_meta: StreamMeta, Hq: int) -> torch.Tensor:
    t = r.table
    B, _, Nq, W = r.sel.shape
    C = t.C
    Nk = k_meta.chunk_ids.shape[1]
    onehot = torch.zeros(B, Hq, Nq, C + 1, dtype=torch.bool, device=r.sel.device)
    onehot.scatter_(-1, torch.where(r.sel >= 0, r.sel, torch.full_like(r.sel, C)), True)
    ks = torch.where(t.kslot >= 0, t.kslot, torch.full_like(t.kslot, C))
    routed = onehot.gather(-1, ks[:, None, None, :].expand(B, Hq, Nq, Nk))
    own = (t.kslot[:, None, :] == r.qslot[:, :, None]) & (r.qslot >= 0)[:, :, None]
    mand = (t.key_mand[:, None, :] | own)[:, None]
    qp, kp = q_meta.positions[:, :, None], k_meta.positions[:, None, :]
    return (dense_mask(q_meta, k_meta) & (routed | mand)) | (kp == qp)[:, None]


def routed_mask(q: torch.Tensor, k: torch.Tensor, q_meta: StreamMeta, k_meta: StreamMeta,
                settings: AttentionSettings, *, training: bool = False, stats: dict | None = None) -> torch.Tensor:
    """The MoC attention mask, boolean ``[B, Hq, Nq, Nk]`` (True = the query reads the key).

    Routing is computed from ``q`` and ``k`` under no_grad (see the module docstring);
    with ``training=True`` the drop-off/drop-in regularisers draw from torch's global RNG.
    """
    check_shapes(q, k, k, q_meta, k_meta)
    r = plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    mask = mask_from_routing(r, q_meta, k_meta, q.shape[1])
    rows = dense_text_rows(q_meta, settings)
    if rows is not None:
        mask = mask | (dense_mask(q_meta, k_meta) & rows[:, None, :, None])
    return mask


def dense_text_rows(q_meta: StreamMeta, settings: AttentionSettings) -> torch.Tensor | None:
    """``[B, Nq]`` queries that read every earlier key of their document (text queries under
    ``dense_text_queries``), or None when no query does."""
    if not settings.dense_text_queries:
        return None
    rows = q_meta.is_text.bool() & (q_meta.doc_ids >= 0)
    return rows if bool(rows.any()) else None


def attend_dense_rows(out: torch.Tensor, q, k, v, q_meta: StreamMeta, k_meta: StreamMeta, rows: torch.Tensor) -> torch.Tensor:
    """``out`` with the queries in ``rows`` [B, Nq] recomputed as dense document-causal
    attention. Only those rows are computed, so the work is (rows x keys), not Nq x Nk."""
    out = out.clone()
    for b in range(q.shape[0]):
        idx = rows[b].nonzero()[:, 0]
        if not len(idx):
            continue
        sub = StreamMeta(*(getattr(q_meta, f.name)[b:b + 1, idx] for f in fields(StreamMeta)))
        kb = StreamMeta(*(getattr(k_meta, f.name)[b:b + 1] for f in fields(StreamMeta)))
        o = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1], v[b:b + 1], attn_mask=dense_mask(sub, kb),
                                           enable_gqa=q.shape[1] != k.shape[1])
        out[b, :, idx] = o[0].to(out.dtype)
    return out


@register_attention("reference")
def reference_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    mask = routed_mask(q, k, q_meta, k_meta, settings, training=training, stats=stats)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def self_values(v: torch.Tensor, Hq: int, Nq: int) -> torch.Tensor:
    """Each query's own value row ``[B, Hq, Nq, D]`` (what a padding query attends to)."""
    return v[:, :, v.shape[2] - Nq:].repeat_interleave(Hq // v.shape[1], dim=1)


def with_padding(out: torch.Tensor, v: torch.Tensor, r: Routing) -> torch.Tensor:
    pad = r.qslot < 0
    if not bool(pad.any()):
        return out
    return torch.where(pad[:, None, :, None], self_values(v, out.shape[1], out.shape[2]).to(out.dtype), out)


def summarize_routing(stats: dict) -> dict:
    """Flatten per-layer routing statistics: overall sparsity, share of selections by chunk
    kind (previous frame, sink, text, far past) and the selection entropy of each layer."""
    layers = [v for k, v in sorted(stats.items()) if k.startswith("layer") and v.get("moc_causal_pairs")]
    if not layers:
        return {}
    routed = sum(v["moc_routed_pairs"] for v in layers)
    causal = sum(v["moc_causal_pairs"] for v in layers)
    out = {"moc_sparsity": 1.0 - routed / max(causal, 1.0)}
    total = sum(v.get("moc_sel_total", 0.0) for v in layers)
    for kind in ("prev", "sink", "text", "far"):
        out[f"moc_share_{kind}"] = sum(v.get(f"moc_sel_{kind}", 0.0) for v in layers) / max(total, 1.0)
    for i, v in enumerate(layers):
        out[f"moc_entropy_layer{i}"] = v.get("moc_selection_entropy", 0.0)
    return out
