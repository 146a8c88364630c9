"""Triton kernels of the ``triton`` MoC backend (see ``attention_triton.py`` for the plan
and the autograd wrapper). Importing this module imports triton; ``attention_triton``
imports it only on first use, so ``TRITON_INTERPRET`` is read then.

Layout: q/out ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` contiguous; per-token tables
int32 ``[B, N]``; ``SEL`` ``[B, Hq, Nq, W]`` selected chunk slots (-1 none); ``LIST``
``[rows, MAXC]`` block indices to visit with ``CNT`` ``[rows]`` of them valid.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``IEEE``: 0 the native dot (bf16/fp16 operands, fp32 accumulation); 1 exact fp32 (no
    TF32, so fp32 matches the oracle); 2 the operands upcast to fp32 first: the same
    products (a bf16 x bf16 product is exact in fp32), used under the CPU interpreter,
    whose 16-bit dot is wrong."""
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _mask(offs_m, offs_n, m_ok, n_ok, QPOS, QDOC, QSLOT, KPOS, KDOC, KSLOT, KMAND, SEL, SELBITS, NW,
          W: tl.constexpr):
    """Exact per-query MoC mask of a [BLOCK_M, BLOCK_N] tile (the oracle's rules).

    A query reads a key of its own chunk, of a chunk it selected, or a mandatory key. When all
    the tile's keys lie in one chunk (most tiles: frames are whole multiples of the tile), the
    chunk test is one bit per query row, read from the query's bitmask of selected chunk slots
    (``SELBITS``, ``NW`` int32 words a query), whatever ``top_k`` is; tiles across a chunk
    boundary compare every (query, key) pair with each selected slot."""
    qpos = tl.load(QPOS + offs_m, mask=m_ok, other=-1)
    qdoc = tl.load(QDOC + offs_m, mask=m_ok, other=-1)
    qslot = tl.load(QSLOT + offs_m, mask=m_ok, other=-1)
    kpos = tl.load(KPOS + offs_n, mask=n_ok, other=2147483647)
    kdoc = tl.load(KDOC + offs_n, mask=n_ok, other=-1)
    kslot = tl.load(KSLOT + offs_n, mask=n_ok, other=-1)
    kmand = tl.load(KMAND + offs_n, mask=n_ok, other=0)
    ks_lo = tl.min(tl.where(n_ok, kslot, 2147483647), 0)
    ks_hi = tl.max(tl.where(n_ok, kslot, -2147483647), 0)
    if ks_lo == ks_hi:  # one chunk slot in the tile (-1: padding keys, which `inside` drops)
        kk = tl.maximum(ks_lo, 0)
        word = tl.load(SELBITS + offs_m * NW + kk // 32, mask=m_ok, other=0)
        hit = (qslot == ks_lo) | (((word >> (kk % 32)) & 1) != 0)
        allowed = hit[:, None] | (kmand[None, :] != 0)
    else:
        allowed = (kslot[None, :] == qslot[:, None]) | (kmand[None, :] != 0)
        for w in tl.static_range(W):
            sw = tl.load(SEL + offs_m * W + w, mask=m_ok, other=-1)
            allowed = allowed | (sw[:, None] == kslot[None, :])
    inside = (kpos[None, :] <= qpos[:, None]) & (kdoc[None, :] == qdoc[:, None]) & (kdoc[None, :] >= 0)
    return allowed & inside & (qslot[:, None] >= 0)


@triton.jit
def _fwd(Q, K, V, O, LSE, QPOS, QDOC, QSLOT, KPOS, KDOC, KSLOT, KMAND, SEL, SELBITS, LIST, CNT,
         Hq, G, Nq, Nk, D, NQB, MAXC, NW, scale,
         W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = b * (Hq // G) + (bh % Hq) // G
    offs_m = qb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    q_base = bh.to(tl.int64) * Nq * D
    kv_base = hk.to(tl.int64) * Nk * D
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    row = bh * NQB + qb
    n_blocks = tl.load(CNT + row)
    for i in range(0, n_blocks):
        kb = tl.load(LIST + row.to(tl.int64) * MAXC + i)
        offs_n = kb * BN + tl.arange(0, BN)
        n_ok = offs_n < Nk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale
        ok = _mask(offs_m, offs_n, m_ok, n_ok, QPOS + b * Nq, QDOC + b * Nq, QSLOT + b * Nq, KPOS + b * Nk,
                   KDOC + b * Nk, KSLOT + b * Nk, KMAND + b * Nk, SEL + bh.to(tl.int64) * Nq * W,
                   SELBITS + bh.to(tl.int64) * Nq * NW, NW, W)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)
    tl.store(O + q_base + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, QPOS, QDOC, QSLOT, KPOS, KDOC, KSLOT, KMAND, SEL, SELBITS, LIST, CNT,
            Hq, G, Nq, Nk, D, NQB, MAXC, NW, scale,
            W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = b * (Hq // G) + (bh % Hq) // G
    offs_m = qb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    q_base = bh.to(tl.int64) * Nq * D
    kv_base = hk.to(tl.int64) * Nk * D
    qmask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + q_base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    row = bh * NQB + qb
    n_blocks = tl.load(CNT + row)
    for i in range(0, n_blocks):
        kb = tl.load(LIST + row.to(tl.int64) * MAXC + i)
        offs_n = kb * BN + tl.arange(0, BN)
        n_ok = offs_n < Nk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale
        ok = _mask(offs_m, offs_n, m_ok, n_ok, QPOS + b * Nq, QDOC + b * Nq, QSLOT + b * Nq, KPOS + b * Nk,
                   KDOC + b * Nk, KSLOT + b * Nk, KMAND + b * Nk, SEL + bh.to(tl.int64) * Nq * W,
                   SELBITS + bh.to(tl.int64) * Nq * NW, NW, W)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + q_base + offs_m[:, None] * D + offs_d[None, :], dq * scale, mask=qmask)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QPOS, QDOC, QSLOT, KPOS, KDOC, KSLOT, KMAND, SEL, SELBITS, LIST, CNT,
              Hq, G, Nq, Nk, D, NKB, MAXC, NW, scale,
              W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = b * (Hq // G) + (bh % Hq) // G
    offs_n = kb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    n_ok = offs_n < Nk
    d_ok = offs_d < D
    q_base = bh.to(tl.int64) * Nq * D
    kv_base = hk.to(tl.int64) * Nk * D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    row = bh * NKB + kb
    n_blocks = tl.load(CNT + row)
    for i in range(0, n_blocks):
        qb = tl.load(LIST + row.to(tl.int64) * MAXC + i)
        offs_m = qb * BM + tl.arange(0, BM)
        m_ok = offs_m < Nq
        qmask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + q_base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale
        ok = _mask(offs_m, offs_n, m_ok, n_ok, QPOS + b * Nq, QDOC + b * Nq, QSLOT + b * Nq, KPOS + b * Nk,
                   KDOC + b * Nk, KSLOT + b * Nk, KMAND + b * Nk, SEL + bh.to(tl.int64) * Nq * W,
                   SELBITS + bh.to(tl.int64) * Nq * NW, NW, W)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out_base = bh.to(tl.int64) * Nk * D
    tl.store(DK + out_base + offs_n[:, None] * D + offs_d[None, :], dk * scale, mask=kv_mask)
    tl.store(DV + out_base + offs_n[:, None] * D + offs_d[None, :], dv, mask=kv_mask)
