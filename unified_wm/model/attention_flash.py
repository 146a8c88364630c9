"""The ``flash`` backend: attention through flash-attn's varlen kernel (not yet run on a GPU).

Only the public ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, softmax_scale=..., causal=..., return_attn_probs=True)`` is used: q ``[total_q,
H, D]``, k/v ``[total_k, Hkv, D]`` (grouped-query heads native), causal aligned to the
bottom-right (flash-attn >= 2.1), returning ``(out, softmax_lse [H, total_q], _)``; its
autograd gives gradients through ``out`` only (the LSE carries none). ``varlen=`` injects
another function with that contract (the tests pass a pure-torch one).

Dense: packed documents become varlen sequences (``cu_seqlens`` from ``doc_ids``; every
padding token is its own length-1 sequence, so it attends to itself as in ``dense_mask``).

MoC (the MoBA scheme, exact): routing as in every backend, then three disjoint key sets
per query, each a varlen call, merged by log-sum-exp:

* A  own chunk, causal: one sequence per chunk (its queries vs. its keys);
* B  routed chunks: one sequence per (row, head, chunk) with the queries of that head
  that selected it, vs. the chunk's non-mandatory keys (heads laid out as sequences);
* C  mandatory keys of the document before the own chunk: one sequence per chunk.

The merge weights use the parts' LSEs without gradient; the LSE's share of the gradient
(``ds_ij = beta_i p_ij``, ``beta_i = w_i dO_i . (o_i - O_i)``) is added by
:class:`_LseGrad` in the backward, with one more varlen call per part whose values are
its keys (``sum_j p_ij k_j`` for dq; the value-gradient of that call gives dk). So the
gradients equal the oracle's without flash-attn's private backward API.
"""
from __future__ import annotations

import math

import torch

from .attention_core import register_attention, require_flash
from .attention_routing import plan_routing, with_padding


def _varlen():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def _segments(doc: torch.Tensor) -> torch.Tensor:
    """Segment index of each token of the flattened rows ``doc`` [B, N]: a new segment at
    each row start and document change, and at every padding token."""
    B, N = doc.shape
    prev = torch.cat([torch.full((B, 1), -3, dtype=doc.dtype, device=doc.device), doc[:, :-1]], 1)
    new = (doc != prev) | (doc < 0)
    new[:, 0] = True
    return new.reshape(-1).long().cumsum(0) - 1


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(s, s + l)`` for each (start, length)."""
    total = int(lengths.sum())
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    off = torch.arange(total, device=lengths.device) - (lengths.cumsum(0) - lengths)[seq]
    return starts[seq] + off


def dense(q, k, v, q_meta, k_meta, varlen=None) -> torch.Tensor:
    """Causal attention within each packed document (``dense_mask``'s semantics)."""
    fn = varlen or _varlen()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    seg_k = _segments(k_meta.doc_ids.long())
    seg_q = seg_k.view(B, Nk)[:, Nk - Nq:].reshape(-1)
    n = int(seg_k[-1]) + 1
    len_k = torch.zeros(n, dtype=torch.long, device=q.device).index_add_(0, seg_k, torch.ones_like(seg_k))
    len_q = torch.zeros(n, dtype=torch.long, device=q.device).index_add_(0, seg_q, torch.ones_like(seg_q))
    keep = len_q > 0  # segments without queries (the cached past of finished documents) are dropped
    kt = k.transpose(1, 2).reshape(B * Nk, Hkv, D)
    vt = v.transpose(1, 2).reshape(B * Nk, Hkv, D)
    ksel = keep[seg_k]
    out = fn(q.transpose(1, 2).reshape(B * Nq, Hq, D), kt[ksel], vt[ksel], _cu(len_q[keep]), _cu(len_k[keep]),
             int(len_q.max()), int(len_k[keep].max()), softmax_scale=1.0 / math.sqrt(D), causal=True)
    if isinstance(out, tuple):
        out = out[0]
    return out.view(B, Nq, Hq, D).transpose(1, 2)


class _Part:
    """One varlen call: rows of the head-flattened q (``qidx`` [n, Hp]) and k/v (``kidx`` [m, Hp_kv])."""

    def __init__(self, qidx, kidx, len_q, len_k, causal):
        self.qidx, self.kidx, self.causal = qidx, kidx, causal
        self.cu_q, self.cu_k = _cu(len_q), _cu(len_k)
        self.max_q, self.max_k = int(len_q.max()), int(len_k.max())

    def call(self, fn, q, k, v, scale):
        out, lse, *_ = fn(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, softmax_scale=scale,
                          causal=self.causal, return_attn_probs=True)
        return out, lse


@torch.no_grad()
def _moc_parts(q, k, k_meta, r) -> list[_Part]:
    t = r.table
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    C = t.C
    dev = q.device
    hq, hk = torch.arange(Hq, device=dev), torch.arange(Hkv, device=dev)
    parts = []
    # queries grouped by own chunk (b, slot): row-major order already groups them
    vb, vi = (r.qslot >= 0).nonzero(as_tuple=True)
    if len(vb) == 0:
        return parts
    bs = vb * C + r.qslot[vb, vi]
    uniq, len_q = torch.unique_consecutive(bs, return_counts=True)
    qtok = vb * Nq + vi
    ub, us = uniq // C, uniq % C
    start = t.start[ub, us]
    # A: own chunk, causal (queries are the tail of the chunk's keys)
    len_k = t.length[ub, us]
    ktok = ub.repeat_interleave(len_k) * Nk + _ranges(start, len_k)
    parts.append(_Part(qtok[:, None] * Hq + hq, ktok[:, None] * Hkv + hk, len_q, len_k, True))
    # C: mandatory keys of the document before the chunk
    km = t.key_mand.reshape(-1).long()
    rank = km.cumsum(0) - km  # number of mandatory keys before each flattened key
    mand_flat = km.nonzero(as_tuple=True)[0]
    if len(mand_flat):
        doc_start = start - k_meta.pos_in_doc.long()[ub, start]
        first = rank[ub * Nk + doc_start]
        n_m = rank[ub * Nk + start] - first
        has = n_m > 0
        if bool(has.any()):
            qsel = has.repeat_interleave(len_q)
            mt = mand_flat[_ranges(first[has], n_m[has])]
            parts.append(_Part(qtok[qsel][:, None] * Hq + hq, mt[:, None] * Hkv + hk, len_q[has], n_m[has], False))
    # B: routed chunks, one sequence per (row, head, chunk), their non-mandatory keys
    if r.sel.shape[-1]:
        nb, nh, ni, nw = (r.sel >= 0).nonzero(as_tuple=True)
        if len(nb):
            slot = r.sel[nb, nh, ni, nw]
            key = ((nb * Hq + nh) * C + slot) * Nq + ni
            key, order = key.sort()
            nb, nh, ni, slot = nb[order], nh[order], ni[order], slot[order]
            grp, len_q = torch.unique_consecutive(key // Nq, return_counts=True)
            gb, gh, gs = grp // (Hq * C), (grp // C) % Hq, grp % C
            nm = (~t.key_mand.reshape(-1)) & (t.kslot.reshape(-1) >= 0)
            nm_count = torch.zeros(B * C, dtype=torch.long, device=dev).index_add_(
                0, (torch.arange(B, device=dev)[:, None] * C + t.kslot.clamp(min=0)).reshape(-1), nm.long())
            nm_off = nm_count.cumsum(0) - nm_count
            nm_flat = nm.nonzero(as_tuple=True)[0]  # (b, key) order = (b, slot) order
            len_k = nm_count[gb * C + gs]
            seq_k = torch.repeat_interleave(torch.arange(len(grp), device=dev), len_k)
            ktok = nm_flat[_ranges(nm_off[gb * C + gs], len_k)]
            kidx = ktok * Hkv + gh[seq_k] // G
            qidx = (nb * Nq + ni) * Hq + nh
            parts.append(_Part(qidx[:, None], kidx[:, None], len_q, len_k, False))
    return parts


class _LseGrad(torch.autograd.Function):
    """Identity on the merged output; its backward adds the gradient that flows through the
    parts' log-sum-exps (which the varlen kernel's autograd does not provide)."""

    @staticmethod
    def forward(ctx, out, qh, kh, fn, parts, outs, lses, total_lse, scale):
        ctx.save_for_backward(qh, kh, out, total_lse)
        ctx.fn, ctx.parts, ctx.outs, ctx.lses, ctx.scale = fn, parts, outs, lses, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        qh, kh, out, total_lse = ctx.saved_tensors
        dq = torch.zeros_like(qh, dtype=torch.float32)
        dk = torch.zeros_like(kh, dtype=torch.float32)
        for p, o, lse in zip(ctx.parts, ctx.outs, ctx.lses):
            tgt = p.qidx.reshape(-1)
            w = (lse - total_lse[tgt]).exp()
            beta = w * (dout[tgt].float() * (o.float() - out[tgt].float())).sum(-1)  # [rows]
            qp = qh[p.qidx].detach()
            kp = kh[p.kidx].detach()
            x = kp.clone().requires_grad_()
            with torch.enable_grad():
                u, _ = p.call(ctx.fn, qp, kp, x, ctx.scale)  # sum_j p_ij k_j
                g = (beta.view(p.qidx.shape)[..., None] * qp.float()).to(u.dtype)
                (dx,) = torch.autograd.grad(u, x, g)
            dq.index_add_(0, tgt, ctx.scale * beta[:, None] * u.detach().reshape(-1, u.shape[-1]).float())
            dk.index_add_(0, p.kidx.reshape(-1), ctx.scale * dx.reshape(-1, dx.shape[-1]).float())
        return dout, dq.to(qh.dtype), dk.to(kh.dtype), None, None, None, None, None, None


def moc(q, k, v, q_meta, k_meta, r, varlen=None) -> torch.Tensor:
    """MoC attention ``[B, Hq, Nq, D]`` for the routing ``r`` (padding rows zero)."""
    fn = varlen or _varlen()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D)
    qh = q.transpose(1, 2).reshape(B * Nq * Hq, D)
    kh = k.transpose(1, 2).reshape(B * Nk * Hkv, D)
    vh = v.transpose(1, 2).reshape(B * Nk * Hkv, D)
    parts = _moc_parts(q, k, k_meta, r)
    R = B * Nq * Hq
    outs, lses = [], []
    for p in parts:
        o, lse = p.call(fn, qh[p.qidx], kh[p.kidx], vh[p.kidx], scale)
        outs.append(o.reshape(-1, D))
        lses.append(lse.detach().float().transpose(0, 1).reshape(-1))  # [H, n] -> rows in qidx order
    if not parts:
        return q.new_zeros(q.shape)
    tgt = torch.cat([p.qidx.reshape(-1) for p in parts])
    lse_all = torch.cat(lses)
    m = torch.full((R,), float("-inf"), device=q.device).scatter_reduce(0, tgt, lse_all, "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = (lse_all - m[tgt]).exp()
    lsum = torch.zeros(R, device=q.device).index_add_(0, tgt, w)
    total = m + lsum.clamp(min=1e-30).log()
    wn = w / lsum.clamp(min=1e-30)[tgt]
    merged = torch.zeros(R, D, device=q.device, dtype=torch.float32).index_add(
        0, tgt, torch.cat(outs).float() * wn[:, None])
    merged = _LseGrad.apply(merged, qh, kh, fn, parts, [o.detach() for o in outs], lses, total, scale)
    return merged.to(q.dtype).view(B, Nq, Hq, D).transpose(1, 2)


@register_attention("flash")
def flash_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    require_flash(q.device)
    r = plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    return with_padding(moc(q, k, v, q_meta, k_meta, r), v, r)
