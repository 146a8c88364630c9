"""Mixture-of-Contexts attention in Triton (the ``triton`` backend), forward and backward.

Routing (chunk table, descriptors, per-head top-k) stays in torch
(:func:`unified_wm.model.attention_routing.plan_routing`); this module runs the attention over
the routed keys, flash-attention-2 style:

* Plan (torch, no grad): for every (batch row, query head, query block of ``BLOCK_M``
  queries) the list of key blocks (``BLOCK_N`` keys) it must visit: the union over the
  block's queries of their routed chunks, their own chunk up to the query, and blocks
  holding mandatory keys (text / sinks) of the block's documents. The lists are a
  superset: inside the kernel every (query, key) pair gets the EXACT per-query mask of
  the oracle (key in a chunk this query and head selected, or in its own chunk, or
  mandatory; causal; same document), so the result equals ``reference``. The transposed
  lists (query blocks visiting each key block) drive the dk/dv kernel.
* Forward: one program per (query block, row x head), online softmax over the listed key
  blocks, stores the output and the log-sum-exp of each query.
* Backward: ``delta = rowsum(dO * O)``; a dq kernel walks the forward lists, a dk/dv
  kernel walks the transposed lists; both recompute the probabilities from the stored
  LSE. dk/dv are written per query head (float32) and summed over each KV group in torch
  (deterministic, no atomics).

Padding queries (document -1) get a zero row here; the caller swaps in their own value
row, as the other backends do. Key positions must be the key indices of the row (what
:class:`StreamMeta` promises: ``positions`` is the absolute index in the row).

``triton`` is imported lazily: the package imports without it. On CPU the kernels run
only under Triton's interpreter (``TRITON_INTERPRET=1``, used by the tests).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import torch

from .attention_core import register_attention, require_triton
from .attention_routing import plan_routing, self_values, with_padding

# Tile sizes: queries per program, keys per visited block. The tests shrink them to 16.
BLOCK_M = 64
BLOCK_N = 64
_KERNELS = None


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """True when Triton runs its interpreter (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device_type: str | None = None) -> str | None:
    """Why the ``triton`` backend cannot run here (None when it can).

    ``device_type`` None means "this machine" (a CUDA GPU or the interpreter must exist).
    """
    if not available():
        return "the triton package is not installed (pip install '.[gpu]', or pip install 'triton>=3.2')"
    if device_type is None:
        if not torch.cuda.is_available() and not interpreted():
            return ("there is no CUDA GPU and Triton's interpreter is off "
                    "(set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)")
        return None
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreted():
        return None
    return (f"the tensors are on {device_type}; Triton kernels run on CUDA "
            "(or on CPU only under TRITON_INTERPRET=1)")


def _kernels():
    """The kernels (imports triton on first use, so TRITON_INTERPRET is honoured)."""
    global _KERNELS
    if _KERNELS is None:
        from .attention_triton_kernels import _bwd_dkdv, _bwd_dq, _fwd

        _KERNELS = (_fwd, _bwd_dq, _bwd_dkdv)
    return _KERNELS


# ----------------------------------------------------------------------------- plan (torch)
@dataclass
class TritonPlan:
    """Everything the kernels read besides q/k/v (int32, contiguous)."""

    qpos: torch.Tensor    # [B, Nq]
    qdoc: torch.Tensor
    qslot: torch.Tensor
    kpos: torch.Tensor    # [B, Nk]
    kdoc: torch.Tensor
    kslot: torch.Tensor
    kmand: torch.Tensor
    sel: torch.Tensor     # [B, Hq, Nq, W] selected chunk slots (-1 none)
    selbits: torch.Tensor  # [B, Hq, Nq, NW] the same as a bitmask: bit s % 32 of word s // 32 for slot s
    qlist: torch.Tensor   # [B*Hq*nqb, maxc] key blocks visited by each query block
    qcnt: torch.Tensor    # [B*Hq*nqb]
    klist: torch.Tensor   # [B*Hq*nkb, maxc] query blocks visiting each key block
    kcnt: torch.Tensor    # [B*Hq*nkb]
    bm: int
    bn: int

    @property
    def W(self) -> int:
        return self.sel.shape[-1]

    @property
    def NW(self) -> int:
        return self.selbits.shape[-1]


def _bitmask(sel: torch.Tensor, C: int) -> torch.Tensor:
    """``[..., W]`` slots (-1 none, repeats allowed) -> ``[..., ceil(C / 32)]`` int32 words."""
    nw = max((C + 31) // 32, 1)
    s = torch.sort(sel.long(), dim=-1).values
    s = torch.where(torch.cat([torch.ones_like(s[..., :1], dtype=torch.bool), s[..., 1:] != s[..., :-1]], -1), s, -1)
    ok = s >= 0
    sc = s.clamp(min=0)
    words = torch.zeros(*sel.shape[:-1], nw, dtype=torch.int64, device=sel.device)
    words.scatter_add_(-1, sc // 32, torch.where(ok, torch.ones_like(sc) << (sc % 32), torch.zeros_like(sc)))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _lists(visit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[..., n]`` -> (indices of the True entries first, ascending; counts)."""
    n = visit.shape[-1]
    flat = visit.reshape(-1, n)
    cnt = flat.sum(-1).to(torch.int32)
    maxc = max(int(cnt.max()) if cnt.numel() else 0, 1)
    idx = torch.sort((~flat).to(torch.int8), dim=-1, stable=True).indices[:, :maxc]
    return idx.to(torch.int32).contiguous(), cnt.contiguous()


def _range_cover(qb: torch.Tensor, first: torch.Tensor, last: torch.Tensor, ok: torch.Tensor,
                 lead: tuple, nqb: int, nkb: int) -> torch.Tensor:
    """Boolean ``[*lead, nqb, nkb]``: query block ``qb`` visits key blocks ``first..last``
    (all inputs ``[*lead, n]``; entries with ``ok`` False add nothing), by a difference array."""
    diff = torch.zeros(*lead, nqb * (nkb + 1), dtype=torch.int32, device=qb.device)
    base = qb * (nkb + 1)
    one = ok.to(torch.int32)
    diff.scatter_add_(-1, (base + first.clamp(0, nkb)).reshape(*lead, -1), one.reshape(*lead, -1))
    diff.scatter_add_(-1, (base + (last + 1).clamp(0, nkb)).reshape(*lead, -1), -one.reshape(*lead, -1))
    return diff.view(*lead, nqb, nkb + 1).cumsum(-1)[..., :nkb] > 0


@torch.no_grad()
def plan(q, k, q_meta, k_meta, r, bm: int | None = None, bn: int | None = None) -> TritonPlan:
    """Block visit lists and int32 layout tables for the kernels (``r``: the routing)."""
    bm, bn = bm or BLOCK_M, bn or BLOCK_N
    t = r.table
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    dev = q.device
    nqb, nkb = (Nq + bm - 1) // bm, (Nk + bn - 1) // bn
    qidx = torch.arange(Nq, device=dev)
    qb = (qidx // bm).expand(B, Nq)
    qvalid = r.qslot >= 0
    own = r.qslot.clamp(min=0)
    # own chunk: from its start to the query itself (key index Nk - Nq + i)
    own_start = t.start.gather(1, own) if t.C else torch.zeros_like(own)
    own_cov = _range_cover(qb, own_start // bn, (Nk - Nq + qidx).expand(B, Nq) // bn, qvalid, (B,), nqb, nkb)
    # routed chunks, per head
    W = r.sel.shape[-1]
    visit = own_cov[:, None].expand(B, Hq, nqb, nkb)
    if W and t.C:
        sc = r.sel.clamp(min=0)
        rs = t.start[:, None, None, :].expand(B, Hq, Nq, t.C).gather(-1, sc)
        rl = t.length[:, None, None, :].expand(B, Hq, Nq, t.C).gather(-1, sc)
        qbw = qb[:, None, :, None].expand(B, Hq, Nq, W)
        visit = visit | _range_cover(qbw, rs // bn, (rs + rl - 1) // bn, r.sel >= 0, (B, Hq), nqb, nkb)
    # blocks holding mandatory keys of the query block's documents, not after its last query
    km = t.key_mand
    if bool(km.any()):
        kdoc = k_meta.doc_ids.long()
        kbi = (torch.arange(Nk, device=dev) // bn).expand(B, Nk)
        big = torch.iinfo(torch.long).max
        f = lambda init, vals, how: torch.full((B, nkb), init, dtype=torch.long, device=dev).scatter_reduce(  # noqa: E731
            1, kbi, torch.where(km, vals, torch.full_like(vals, init)), how)
        kd_min, kd_max = f(big, kdoc, "amin"), f(-1, kdoc, "amax")
        k_first = f(big, torch.arange(Nk, device=dev).expand(B, Nk), "amin")
        qdoc = r.qdoc
        g = lambda init, vals, how: torch.full((B, nqb), init, dtype=torch.long, device=dev).scatter_reduce(  # noqa: E731
            1, qb, torch.where(qvalid, vals, torch.full_like(vals, init)), how)
        qd_min, qd_max = g(big, qdoc, "amin"), g(-1, qdoc, "amax")
        q_last = g(-1, (Nk - Nq + qidx).expand(B, Nq), "amax")
        mand = ((kd_min[:, None, :] <= qd_max[:, :, None]) & (kd_max[:, None, :] >= qd_min[:, :, None])
                & (k_first[:, None, :] <= q_last[:, :, None]))
        visit = visit | mand[:, None]
    visit = visit.contiguous()
    qlist, qcnt = _lists(visit)
    klist, kcnt = _lists(visit.transpose(-1, -2))
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    sel = i32(r.sel) if W else torch.full((B, Hq, Nq, 1), -1, dtype=torch.int32, device=dev)
    return TritonPlan(i32(q_meta.positions), i32(q_meta.doc_ids), i32(r.qslot), i32(k_meta.positions),
                      i32(k_meta.doc_ids), i32(t.kslot), i32(t.key_mand), sel, _bitmask(sel, t.C), qlist, qcnt,
                      klist, kcnt, bm, bn)


# ----------------------------------------------------------------------------- autograd
def _meta_args(p: TritonPlan):
    return (p.qpos, p.qdoc, p.qslot, p.kpos, p.kdoc, p.kslot, p.kmand, p.sel, p.selbits)


class TritonMoC(torch.autograd.Function):
    """Exact MoC attention over a :class:`TritonPlan`; backward recomputes from the LSE."""

    @staticmethod
    def forward(ctx, q, k, v, p: TritonPlan):
        fwd, _, _ = _kernels()
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
        nqb = (Nq + p.bm - 1) // p.bm
        bd = max(16, 1 << (D - 1).bit_length())
        ieee = 1 if q.dtype == torch.float32 else (2 if q.device.type == "cpu" else 0)
        scale = 1.0 / math.sqrt(D)
        W = max(p.W, 1)
        fwd[(nqb, B * Hq)](q, k, v, out, lse, *_meta_args(p), p.qlist, p.qcnt, Hq, Hq // Hkv, Nq, Nk, D, nqb,
                           p.qlist.shape[1], p.NW, scale, W=W, BM=p.bm, BN=p.bn, BD=bd, IEEE=ieee)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.p, ctx.bd, ctx.ieee, ctx.scale, ctx.W = p, bd, ieee, scale, W
        return out

    @staticmethod
    def backward(ctx, dout):
        _, bwd_dq, bwd_dkdv = _kernels()
        q, k, v, out, lse = ctx.saved_tensors
        p: TritonPlan = ctx.p
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        dout = dout.to(q.dtype).contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        nqb, nkb = (Nq + p.bm - 1) // p.bm, (Nk + p.bn - 1) // p.bn
        dq = torch.empty(B, Hq, Nq, D, dtype=torch.float32, device=q.device)
        dk = torch.empty(B, Hq, Nk, D, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
        common = dict(W=ctx.W, BM=p.bm, BN=p.bn, BD=ctx.bd, IEEE=ctx.ieee)
        bwd_dq[(nqb, B * Hq)](q, k, v, dout, lse, delta, dq, *_meta_args(p), p.qlist, p.qcnt, Hq, G, Nq, Nk, D,
                              nqb, p.qlist.shape[1], p.NW, ctx.scale, **common)
        bwd_dkdv[(nkb, B * Hq)](q, k, v, dout, lse, delta, dk, dv, *_meta_args(p), p.klist, p.kcnt, Hq, G, Nq, Nk,
                                D, nkb, p.klist.shape[1], p.NW, ctx.scale, **common)
        dk = dk.view(B, Hkv, G, Nk, D).sum(2)
        dv = dv.view(B, Hkv, G, Nk, D).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def moc_attention(q, k, v, q_meta, k_meta, r, bm: int | None = None, bn: int | None = None) -> torch.Tensor:
    """MoC attention output ``[B, Hq, Nq, D]`` for the routing ``r`` (padding rows zero)."""
    why = unavailable_reason(q.device.type)
    if why:
        raise ValueError(f"attention backend 'triton' cannot run: {why}")
    return TritonMoC.apply(q, k, v, plan(q, k, q_meta, k_meta, r, bm, bn))


@register_attention("triton")
def triton_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    require_triton(q.device)
    r = plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    if not bool((r.qslot >= 0).any()):
        return self_values(v, q.shape[1], q.shape[2]).to(q.dtype)
    out = moc_attention(q, k, v, q_meta, k_meta, r)
    return with_padding(out, v, r)
