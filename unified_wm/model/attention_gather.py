"""The ``gather`` backend: Mixture of Contexts with its own forward and backward, for CPU training.

On CPU it runs the compiled kernel (``attention_cpu_kernel``); elsewhere, or without a compiler,
pairs of (query row, key chunk) are grouped into tiles, each a small dense attention merged
exactly by log-sum-exp; the backward feeds each tile the row's global output and LSE."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import attention_cpu_kernel
from .attention_core import AttentionSettings, register_attention
from .attention_cpu_kernel import KERNEL_SEGMENT
from .attention_routing import Routing, plan_routing, self_values, with_padding

# ``gather`` on CPU runs its tiles through PyTorch's fused flash-attention CPU kernels
# (set False to use the plain bmm/softmax tile loop, which is also what runs on CUDA).
GATHER_FUSED_CPU = True
# Upper bound on (query row, key chunk) pairs per query block of the ``gather`` backend.
_BLOCK_PAIRS = 1 << 16


@dataclass
class _TilePlan:
    """Work list of the ``gather`` backend (built under no_grad, reused by backward).

    A tile is up to ``T`` query rows (any heads of one KV group) that read ONE key chunk
    in one mode: 0 = own chunk (causal), 1 = routed chunk (its non-mandatory keys),
    2 = a past chunk holding mandatory keys (only those keys). The three key sets are
    disjoint per query, so summing their softmax terms gives exactly the routed mask.
    Query rows are numbered block-major (``((blk*B + b)*Hq + h)*Qb + q % Qb``) and tiles
    are sorted by query block, so each block holds every tile of its rows: the softmax is
    finished block by block, and per-row sums are a gather over ``inv`` (the tile
    position of each of a row's pairs), never a serial scatter.
    """

    rows: torch.Tensor       # [n_tiles, T] block-major query row; padding = nrows (a zero row)
    kc: torch.Tensor         # [n_tiles] chunk-padded K/V row (b*Hkv + hk)*C + slot
    bc: torch.Tensor         # [n_tiles] key-table row b*C + slot
    mode: torch.Tensor       # [n_tiles]
    blocks: list             # (t0, t_own_end, t1) tile ranges of each query block
    inv: torch.Tensor        # [nrows, P] global tile position of each pair of a row (-1 none)
    kidx: torch.Tensor       # [B, C, L] key index of each padded chunk position (clamped)
    kvalid: torch.Tensor     # [B*C, L]
    kmand: torch.Tensor      # [B*C, L]
    kpos: torch.Tensor       # [B*C, L]
    qpos: torch.Tensor       # [nrows + 1]
    kslot: torch.Tensor      # [B, Nk]
    start: torch.Tensor      # [B, C]
    shape: tuple             # (B, Hq, Hkv, Nq, Nk, D, C, L, T, Qb, nqb)
    scale: float

    @property
    def nrows(self) -> int:
        B, Hq, *_, Qb, nqb = self.shape
        return nqb * B * Hq * Qb


@torch.no_grad()
def _tile_plan(q, k, q_meta, k_meta, r: Routing, settings: AttentionSettings, scale: float) -> _TilePlan:
    t = r.table
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    C, L = t.C, max(t.lmax, 1)
    # a block holds at most ~_BLOCK_PAIRS (query row, chunk) pairs so its tiles stay cache-sized
    W0 = r.sel.shape[-1]
    T = settings.gather_tile
    Qb = max(1, min(settings.gather_block, Nq, max(T, _BLOCK_PAIRS // (Hq * (W0 + 2)))))
    nqb = (Nq + Qb - 1) // Qb
    dev = q.device
    qv = r.qslot >= 0
    W = r.sel.shape[-1]
    # --- pairs (b, h, q, slot, mode, column of the row's pair list)
    bq = qv.nonzero()
    b0, q0 = bq[:, 0], bq[:, 1]
    own_slot = r.qslot[b0, q0]
    hs = torch.arange(Hq, device=dev)
    parts = [(b0.repeat(Hq), hs.repeat_interleave(len(b0)), q0.repeat(Hq), own_slot.repeat(Hq), 0, torch.zeros_like(b0).repeat(Hq))]
    nz = (r.sel >= 0).nonzero()  # (b, h, q, w)
    if len(nz):
        parts.append((nz[:, 0], nz[:, 1], nz[:, 2], r.sel[nz[:, 0], nz[:, 1], nz[:, 2], nz[:, 3]], 1, 1 + nz[:, 3]))
    hasmand = t.mand_count > 0
    M = int(hasmand.sum(1).max()) if C else 0
    if M:
        ar = torch.arange(C, device=dev).expand(B, C)
        mslots = torch.where(hasmand, ar, torch.full_like(ar, C)).sort(1).values[:, :M]
        mdoc = torch.cat([t.doc, torch.full((B, 1), -3, dtype=t.doc.dtype, device=dev)], 1).gather(1, mslots)
        cond = (mslots[:, None, :] < r.qslot[:, :, None]) & (mdoc[:, None, :] == r.qdoc[:, :, None]) & qv[:, :, None]
        nzm = cond.nonzero()  # (b, q, m)
        if len(nzm):
            ms = mslots[nzm[:, 0], nzm[:, 2]]
            n = len(ms)
            parts.append((nzm[:, 0].repeat(Hq), hs.repeat_interleave(n), nzm[:, 1].repeat(Hq), ms.repeat(Hq), 2, (1 + W + nzm[:, 2]).repeat(Hq)))
    pb, ph, pq, ps, pc = (torch.cat([p[i] for p in parts]) for i in (0, 1, 2, 3, 5))
    pm = torch.cat([torch.full_like(p[0], p[4]) for p in parts])
    # --- sort by (query block, mode, b, kv head, slot) then (head in group, query)
    group = ((((pq // Qb) * 3 + pm) * B + pb) * Hkv + ph // G) * C + ps
    comp, perm = torch.sort(group * (G * Nq) + (ph % G) * Nq + pq)
    pc = pc[perm]
    group = comp // (G * Nq)
    rest = comp % (G * Nq)
    g, qq = rest // Nq, rest % Nq
    slot = group % C
    hk = (group // C) % Hkv
    bb = (group // (C * Hkv)) % B
    mode = (group // (C * Hkv * B)) % 3
    qblock = group // (C * Hkv * B * 3)
    ug, counts = torch.unique_consecutive(group, return_counts=True)
    ntile = (counts + T - 1) // T
    tstart = ntile.cumsum(0) - ntile
    gstart = counts.cumsum(0) - counts
    gi = torch.repeat_interleave(torch.arange(len(ug), device=dev), counts)
    rank = torch.arange(len(comp), device=dev) - gstart[gi]
    n_tiles = int(ntile.sum())
    nrows = nqb * B * Hq * Qb
    row = ((qblock * B + bb) * Hq + hk * G + g) * Qb + qq % Qb
    pos = (tstart[gi] + rank // T) * T + rank % T
    rows = torch.full((n_tiles * T,), nrows, dtype=torch.long, device=dev)
    rows[pos] = row
    inv = torch.full((nrows, 1 + W + M), -1, dtype=torch.long, device=dev)
    inv[row, pc] = pos
    tg = torch.repeat_interleave(gstart, ntile)
    t_slot, t_hk, t_b, t_mode, t_qb = slot[tg], hk[tg], bb[tg], mode[tg], qblock[tg]
    kc = (t_b * Hkv + t_hk) * C + t_slot
    bc = t_b * C + t_slot
    bounds = torch.searchsorted(t_qb.contiguous(), torch.arange(nqb + 1, device=dev)).tolist()
    own_end = torch.searchsorted((t_qb * 3 + t_mode).contiguous(), torch.arange(nqb, device=dev) * 3 + 1).tolist()
    blocks = [(bounds[i], own_end[i], bounds[i + 1]) for i in range(nqb)]
    # --- key tables of the chunk-padded layout
    j = torch.arange(L, device=dev)
    kvalid = j[None, None, :] < t.length[:, :, None]
    kidx = torch.where(kvalid, t.start[:, :, None] + j, torch.zeros_like(kvalid, dtype=torch.long)).clamp(max=max(Nk - 1, 0))
    kmand = t.key_mand.gather(1, kidx.view(B, -1)).view(B, C, L) & kvalid
    kpos = k_meta.positions.long().gather(1, kidx.view(B, -1)).view(B, C, L)
    qpos = torch.cat([_block_major(q_meta.positions.long()[:, None, :, None].expand(B, Hq, Nq, 1), Qb).view(-1),
                      torch.full((1,), -1, dtype=torch.long, device=dev)])
    return _TilePlan(rows.view(n_tiles, T), kc, bc, t_mode, blocks, inv, kidx, kvalid.view(B * C, L),
                     kmand.view(B * C, L), kpos.view(B * C, L), qpos, t.kslot, t.start,
                     (B, Hq, Hkv, Nq, Nk, D, C, L, T, Qb, nqb), scale)


def _block_major(x: torch.Tensor, Qb: int) -> torch.Tensor:
    """``[B, H, Nq, D]`` -> ``[nqb*B*H*Qb, D]`` rows in block-major order (zero padded)."""
    B, H, Nq, D = x.shape
    nqb = (Nq + Qb - 1) // Qb
    if nqb * Qb != Nq:
        x = torch.cat([x, x.new_zeros(B, H, nqb * Qb - Nq, D)], 2)
    return x.view(B, H, nqb, Qb, D).permute(2, 0, 1, 3, 4).reshape(nqb * B * H * Qb, D)


def _from_block_major(x: torch.Tensor, B: int, H: int, Nq: int, Qb: int) -> torch.Tensor:
    nqb = (Nq + Qb - 1) // Qb
    D = x.shape[-1]
    return x.view(nqb, B, H, Qb, D).permute(1, 2, 0, 3, 4).reshape(B, H, nqb * Qb, D)[:, :, :Nq]


def _chunk_pad(x: torch.Tensor, p: _TilePlan) -> torch.Tensor:
    """``[B, Hkv, Nk, D]`` -> chunk-padded ``[B*Hkv*C, L, D]`` float32 (invalid slots zero)."""
    B, Hq, Hkv, Nq, Nk, D, C, L = p.shape[:8]
    idx = p.kidx.view(B, 1, C * L, 1).expand(B, Hkv, C * L, D)
    xc = x.float().gather(2, idx).view(B, Hkv, C, L, D)
    return (xc * p.kvalid.view(B, 1, C, L, 1)).view(B * Hkv * C, L, D)


def _chunk_unpad(xc: torch.Tensor, p: _TilePlan) -> torch.Tensor:
    """Inverse of :func:`_chunk_pad` for gradients: ``[B*Hkv*C, L, D]`` -> ``[B, Hkv, Nk, D]``."""
    B, Hq, Hkv, Nq, Nk, D, C, L = p.shape[:8]
    ks = p.kslot.clamp(min=0)
    off = torch.arange(Nk, device=xc.device)[None, :] - p.start.gather(1, ks)
    fi = (ks * L + off.clamp(0, L - 1))[:, None, :, None].expand(B, Hkv, Nk, D)
    out = xc.view(B, Hkv, C * L, D).gather(2, fi)
    return out * (p.kslot >= 0)[:, None, :, None]


def _tile_scores(qf, kc, p: _TilePlan, t0: int, t_own: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked scores ``[n, T, L]`` (``-inf`` where not allowed) of tiles ``t0:t1``, and their rows."""
    R = p.rows[t0:t1]
    n, T = R.shape
    s = torch.bmm(qf.index_select(0, R.reshape(-1)).view(n, T, -1), kc.index_select(0, p.kc[t0:t1]).transpose(1, 2))
    bc, mode = p.bc[t0:t1], p.mode[t0:t1]
    km = p.kmand.index_select(0, bc)
    keep = p.kvalid.index_select(0, bc) & torch.where((mode == 1)[:, None], ~km, torch.where((mode == 2)[:, None], km, torch.ones_like(km)))
    s.masked_fill_(~keep[:, None, :], float("-inf"))
    n0 = t_own - t0
    if n0 > 0:
        later = p.kpos.index_select(0, bc[:n0])[:, None, :] > p.qpos.index_select(0, R[:n0].reshape(-1)).view(n0, T, 1)
        s[:n0].masked_fill_(later, float("-inf"))
    return s, R


def _row_sum(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Sum over each row's pairs: ``x`` [n*T + 1, ...] (last entry zero), ``inv`` [R, P] -> [R, ...]."""
    return x.index_select(0, inv.reshape(-1)).view(*inv.shape, *x.shape[1:]).sum(1)


def _fused_ops():
    """PyTorch's fused CPU flash-attention kernels (forward returns the LSE; backward
    accepts an external output and LSE), or None where this build lacks them."""
    if not GATHER_FUSED_CPU:
        return None
    ops = torch.ops.aten
    try:
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    except (AttributeError, RuntimeError):
        return None


def _tile_masks(p: _TilePlan, t0: int, t_own: int, t1: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive masks for the fused kernel: ``[n0, 1, T, L]`` for own-chunk tiles (causal)
    and ``[n - n0, 1, 1, L]`` key masks for routed / mandatory tiles."""
    R = p.rows[t0:t1]
    bc, mode = p.bc[t0:t1], p.mode[t0:t1]
    km = p.kmand.index_select(0, bc)
    keep = p.kvalid.index_select(0, bc) & torch.where((mode == 1)[:, None], ~km, torch.where((mode == 2)[:, None], km, torch.ones_like(km)))
    n0 = t_own - t0
    neg = float("-inf")
    own = rest = None
    if n0 > 0:
        ok = keep[:n0, None, :] & (p.kpos.index_select(0, bc[:n0])[:, None, :] <= p.qpos.index_select(0, R[:n0].reshape(-1)).view(n0, -1, 1))
        own = torch.zeros(ok.shape, device=ok.device).masked_fill_(~ok, neg)[:, None]
    if t1 - t_own > 0:
        rest = torch.zeros(keep[n0:].shape, device=keep.device).masked_fill_(~keep[n0:], neg)[:, None, None]
    return own, rest


def _fused_block_forward(fa, qf, kc, vc, p: _TilePlan, t0, t_own, t1):
    """Per-tile (normalised output ``[n*T, D]``, LSE ``[n*T]``) with the fused kernel."""
    R = p.rows[t0:t1]
    n, T = R.shape
    D = qf.shape[1]
    KC = p.kc[t0:t1]
    qt = qf.index_select(0, R.reshape(-1)).view(n, 1, T, D)
    kt, vt = kc.index_select(0, KC)[:, None], vc.index_select(0, KC)[:, None]
    own, rest = _tile_masks(p, t0, t_own, t1)
    n0 = t_own - t0
    outs, lses = [], []
    for sl, mask in ((slice(0, n0), own), (slice(n0, n), rest)):
        if mask is None:
            continue
        o, lse = fa(qt[sl], kt[sl], vt[sl], 0.0, False, attn_mask=mask, scale=1.0)[:2]
        outs.append(o.reshape(-1, D))
        lses.append(lse.reshape(-1))
    return torch.cat(outs), torch.cat(lses)


def _fused_block_backward(fb, qf, kc, vc, dof, out, lse, p: _TilePlan, t0, t_own, t1):
    """Per-tile gradients with the fused backward fed the GLOBAL output and LSE of each
    row (so each tile's share is exactly that tile's part of the full softmax gradient)."""
    R = p.rows[t0:t1]
    n, T = R.shape
    D = qf.shape[1]
    Rf = R.reshape(-1)
    KC = p.kc[t0:t1]
    qt = qf.index_select(0, Rf).view(n, 1, T, D)
    kt, vt = kc.index_select(0, KC)[:, None], vc.index_select(0, KC)[:, None]
    go = dof.index_select(0, Rf).view(n, 1, T, D)
    og = out.index_select(0, Rf).view(n, 1, T, D)
    lg = lse.index_select(0, Rf).view(n, 1, T)
    own, rest = _tile_masks(p, t0, t_own, t1)
    n0 = t_own - t0
    dqs, dks, dvs = [], [], []
    for sl, mask in ((slice(0, n0), own), (slice(n0, n), rest)):
        if mask is None:
            continue
        dq, dk, dv = fb(go[sl], qt[sl], kt[sl], vt[sl], og[sl], lg[sl], 0.0, False, attn_mask=mask, scale=1.0)
        dqs.append(dq.reshape(-1, D))
        dks.append(dk[:, 0])
        dvs.append(dv[:, 0])
    return torch.cat(dqs), torch.cat(dks), torch.cat(dvs)


class _GatherMoC(torch.autograd.Function):
    """Exact MoC attention over a :class:`_TilePlan`, with a recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _TilePlan):
        B, Hq, Hkv, Nq, Nk, D, C, L, T, Qb, nqb = plan.shape
        nrows, Rb = plan.nrows, B * Hq * Qb
        dev = q.device
        qf = torch.cat([_block_major(q.detach().float() * plan.scale, Qb), torch.zeros(1, D, device=dev)])
        kc, vc = _chunk_pad(k.detach(), plan), _chunk_pad(v.detach(), plan)
        out = torch.zeros(nrows + 1, D, device=dev)
        lse = torch.zeros(nrows + 1, device=dev)
        neg = torch.full((1,), float("-inf"), device=dev)
        zero = torch.zeros(1, device=dev)
        for blk, (t0, t_own, t1) in enumerate(plan.blocks):
            if t1 == t0:
                continue
            base = blk * Rb
            inv = plan.inv[base:base + Rb]
            n = t1 - t0
            inv = torch.where(inv >= 0, inv - t0 * T, torch.full_like(inv, n * T))
            fused = _fused_ops() if not q.is_cuda else None
            if fused is not None:
                o_t, l_t = _fused_block_forward(fused[0], qf, kc, vc, plan, t0, t_own, t1)
                m = _row_sum_max(torch.cat([l_t, neg]), inv)
                m = m.masked_fill(m == float("-inf"), 0.0)
                rl = (plan.rows[t0:t1] - base).clamp(max=Rb).view(-1)
                w = (l_t - torch.cat([m, zero]).index_select(0, rl)).exp_()
                lsum = _row_sum(torch.cat([w, zero]), inv)
                acc = _row_sum(torch.cat([o_t * w[:, None], torch.zeros(1, D, device=dev)]), inv)
                ok = lsum > 0
                out[base:base + Rb] = acc / torch.where(ok, lsum, torch.ones_like(lsum))[:, None]
                lse[base:base + Rb] = torch.where(ok, m + lsum.clamp(min=1e-30).log(), torch.zeros_like(m))
                continue
            s, R = _tile_scores(qf, kc, plan, t0, t_own, t1)
            m = _row_sum_max(torch.cat([s.amax(-1).view(-1), neg]), inv)
            m = m.masked_fill(m == float("-inf"), 0.0)
            rl = (R - base).clamp(max=Rb).view(-1)
            s.sub_(torch.cat([m, zero]).index_select(0, rl).view(n, T, 1)).exp_()
            lsum = _row_sum(torch.cat([s.sum(-1).view(-1), zero]), inv)
            pv = torch.empty(n * T + 1, D, device=dev)
            pv[-1] = 0
            torch.bmm(s, vc.index_select(0, plan.kc[t0:t1]), out=pv[:-1].view(n, T, D))
            acc = _row_sum(pv, inv)
            ok = lsum > 0
            out[base:base + Rb] = acc / torch.where(ok, lsum, torch.ones_like(lsum))[:, None]
            lse[base:base + Rb] = torch.where(ok, m + lsum.clamp(min=1e-30).log(), torch.zeros_like(m))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return _from_block_major(out[:nrows], B, Hq, Nq, Qb)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _TilePlan = ctx.plan
        B, Hq, Hkv, Nq, Nk, D, C, L, T, Qb, nqb = plan.shape
        nrows, Rb = plan.nrows, B * Hq * Qb
        dev = q.device
        qf = torch.cat([_block_major(q.float() * plan.scale, Qb), torch.zeros(1, D, device=dev)])
        kc, vc = _chunk_pad(k, plan), _chunk_pad(v, plan)
        dof = torch.cat([_block_major(dout.float(), Qb), torch.zeros(1, D, device=dev)])
        delta = (dof * out).sum(-1)
        dq = torch.zeros(nrows, D, device=dev)
        dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
        for blk, (t0, t_own, t1) in enumerate(plan.blocks):
            if t1 == t0:
                continue
            base = blk * Rb
            n = t1 - t0
            inv = plan.inv[base:base + Rb]
            inv = torch.where(inv >= 0, inv - t0 * T, torch.full_like(inv, n * T))
            fused = _fused_ops() if not q.is_cuda else None
            if fused is not None:
                dq_t, dk_t, dv_t = _fused_block_backward(fused[1], qf, kc, vc, dof, out, lse, plan, t0, t_own, t1)
                KC = plan.kc[t0:t1]
                dq[base:base + Rb] = _row_sum(torch.cat([dq_t, torch.zeros(1, D, device=dev)]), inv)
                dkc.index_add_(0, KC, dk_t)
                dvc.index_add_(0, KC, dv_t)
                continue
            s, R = _tile_scores(qf, kc, plan, t0, t_own, t1)
            Rf = R.reshape(-1)
            KC = plan.kc[t0:t1]
            p = s.sub_(lse.index_select(0, Rf).view(n, T, 1)).exp_()
            do_t = dof.index_select(0, Rf).view(n, T, D)
            dvc.index_add_(0, KC, torch.bmm(p.transpose(1, 2), do_t))
            ds = torch.bmm(do_t, vc.index_select(0, KC).transpose(1, 2))
            ds.sub_(delta.index_select(0, Rf).view(n, T, 1)).mul_(p)
            dqt = torch.empty(n * T + 1, D, device=dev)
            dqt[-1] = 0
            torch.bmm(ds, kc.index_select(0, KC), out=dqt[:-1].view(n, T, D))
            dq[base:base + Rb] = _row_sum(dqt, inv)
            dkc.index_add_(0, KC, torch.bmm(ds.transpose(1, 2), qf.index_select(0, Rf).view(n, T, D)))
        dq = _from_block_major(dq * plan.scale, B, Hq, Nq, Qb).to(q.dtype)
        return dq, _chunk_unpad(dkc, plan).to(k.dtype), _chunk_unpad(dvc, plan).to(v.dtype), None


def _row_sum_max(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Max over each row's pairs (``x`` [n*T + 1] with last entry -inf, ``inv`` [R, P])."""
    return x.index_select(0, inv.reshape(-1)).view(inv.shape).amax(1)


class _KernelMoC(torch.autograd.Function):
    """Exact MoC attention through the compiled CPU kernel (``moc_cpu.cpp``)."""

    @staticmethod
    def forward(ctx, q, k, v, r: Routing, scale: float, ext):
        t = r.table
        Hkv = k.shape[1]
        with torch.no_grad():
            ptr, rows = ext.moc_plan(r.sel.contiguous(), r.qslot.contiguous(), r.qdoc.contiguous(),
                                     t.doc.contiguous(), t.mand_count.contiguous(), Hkv, KERNEL_SEGMENT)
            chunks = (t.start.contiguous(), t.length.contiguous(), t.key_mand.contiguous())
            qf = (q.detach().float() * scale).contiguous()
            kf, vf = k.detach().float().contiguous(), v.detach().float().contiguous()
            out, lse = ext.moc_forward(qf, kf, vf, ptr, rows, *chunks, t.lmax)
        ctx.save_for_backward(qf, kf, vf, out, lse, ptr, rows, *chunks)
        ctx.lmax, ctx.scale, ctx.ext = t.lmax, scale, ext
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, out, lse, ptr, rows, *chunks = ctx.saved_tensors
        dout = dout.float().contiguous()
        delta = (dout * out).sum(-1).contiguous()
        dq, dk, dv = ctx.ext.moc_backward(qf, kf, vf, dout, lse, delta, ptr, rows, *chunks, ctx.lmax)
        dq = dq * ctx.scale
        return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), None, None, None


@register_attention("gather")
def gather_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    scale = 1.0 / math.sqrt(q.shape[-1])
    r = plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    if not bool((r.qslot >= 0).any()):
        return self_values(v, q.shape[1], q.shape[2]).to(q.dtype)
    if q.device.type == "cpu" and q.shape[-1] % 16 == 0:
        ext = attention_cpu_kernel.cpu_kernel()
        if ext is not None:
            out = _KernelMoC.apply(q, k, v, r, scale, ext).to(q.dtype)
            return with_padding(out, v, r)
    plan = _tile_plan(q, k, q_meta, k_meta, r, settings, scale)
    out = _GatherMoC.apply(q, k, v, plan).to(q.dtype)
    return with_padding(out, v, r)
