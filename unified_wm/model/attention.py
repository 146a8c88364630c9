"""Attention for the unified stream: one interface, several backends, one oracle.

Every backend computes ``softmax(q k^T * scale + mask) v`` for the SAME mask; they differ
only in how they avoid materialising it. The mask is defined by the per-token stream
layout (:class:`StreamMeta`) and, for Mixture of Contexts, by a parameter-free router;
never by the backend. ``scale`` is ``1/sqrt(D)``.

Backends (``AttentionSettings.backend``)
----------------------------------------
``dense``      causal attention restricted to the query's own document (packed rows).
``reference``  Mixture of Contexts (MoC) as a dense boolean mask ``[B, Hq, Nq, Nk]``
               (:func:`routed_mask`) fed to SDPA. The oracle; memory O(N^2).
``gather``     MoC with its own forward AND backward (CPU training). Work and memory grow
               with ``N * (k + 2) * chunk_len``, never ``N^2``. On CPU it runs a compiled
               kernel (``moc_cpu.cpp`` next to this file; built on first use by torch's
               extension loader with ``-march=native`` and cached per CPU): top-k routing,
               counting-sorted work lists of (query row, key chunk) pairs, then per key
               chunk register-blocked tiles with an online softmax per row; the backward
               recomputes each tile with the row's global LSE (flash-attention style).
               Elsewhere (CUDA, no compiler, head dim not a multiple of 16,
               ``UWM_MOC_CPU_KERNEL=0``) it falls back to pure torch: pairs grouped into
               tiles of ``gather_tile`` query rows per key chunk, each tile a small dense
               attention (PyTorch's fused CPU flash kernels on CPU, bmm/softmax
               elsewhere), merged exactly by log-sum-exp; backward feeds each tile the
               row's global output and LSE (the MoBA trick). Both equal the reference.
``flex``       MoC through ``torch.nn.attention.flex_attention`` with a ``mask_mod``
               built from the routing. CUDA: compiled, forward and backward. CPU:
               eager, inference only (PyTorch has no FlexAttention backward on CPU).
``flash``      MoC through flash-attn's varlen kernel, the MoBA scheme (own chunk causal,
               routed chunks, earlier mandatory keys: three varlen calls merged by LSE;
               ``attention_flash.py``, which also has the dense packed-document path).
               Needs flash-attn and CUDA (checked when the settings are validated). Its
               glue is tested on CPU with a pure-torch stand-in for the kernel; it has NOT
               been run on a GPU yet.
``triton``     MoC with Triton kernels, forward and backward (``attention_triton.py``):
               per (query block, head) lists of key blocks to visit, the exact per-query
               mask inside the kernel, online softmax, LSE kept for a flash-attention-2
               style backward. CUDA; on CPU only under ``TRITON_INTERPRET=1`` (tests).
``moc``        alias resolved per call: ``triton`` on CUDA (``flex`` when triton is not
               installed), ``gather`` on CPU.

Mixture-of-Contexts semantics (one definition for every MoC backend)
--------------------------------------------------------------------
Shapes: q ``[B, Hq, Nq, D]``; k, v ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (grouped-query
attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``). The queries are the LAST
``Nq`` tokens of the key row (``Nq < Nk`` during cached decoding).

* Chunks: maximal runs of equal ``chunk_ids`` (ids increase along the row, are unique
  across the packed documents of a row, -1 is padding). Chunks vary in length.
* Descriptor of a chunk = mean of its keys, per batch row and KV head (float32).
  Score = ``q . descriptor`` per query head, against its KV group's descriptors.
* Mandatory keys (outside the ``top_k`` budget), for a query of document ``d``:
  every text token of ``d`` (``is_text``), the first ``n_sink`` tokens of ``d``
  (``pos_in_doc < n_sink``), and the query's own chunk. All of them only at or before
  the query.
* Candidates for routing: chunks of the same document whose id is strictly less than
  the query's own chunk id (causal routing: never a chunk at/after its own), excluding
  chunks made ONLY of mandatory tokens (text/sink chunks are visible anyway, so ``k``
  buys extra context). A chunk that mixes mandatory and other tokens stays a candidate.
* Each query head picks the ``top_k`` highest-scoring candidates (fewer when fewer
  exist; ties broken by ``torch.topk``). With ``own_chunk_in_k=True`` (MoBA
  convention) the own chunk counts inside the budget: ``top_k - 1`` are routed.
* Allowed keys = causal (key position <= query position) AND same document AND
  (mandatory OR in a selected chunk). Padding queries (doc -1) attend to themselves
  only, as in :func:`dense_mask`, so no softmax row is empty.
* Regularisers (only when ``training=True``, torch's global RNG): ``drop_off`` drops each
  selected chunk with that probability; ``drop_in`` draws ``top_k`` extra candidates
  uniformly (without replacement) among the non-selected ones and keeps each with
  probability ``drop_in``.
* The router has no parameters and is computed under ``torch.no_grad()`` in every
  backend: gradients reach q/k/v only through attention over the selected keys.

Decoding: :func:`new_decode_state` gives a per-layer :class:`MoCDecodeState` that the
model passes as ``state=`` on every cached step. It ingests the keys it has not seen yet,
keeps per-chunk key sums/counts (and chunk doc/start/mandatory counts, the indices of the
mandatory tokens), and scores descriptors without re-reading past keys; a step then
gathers only its own chunk, its selected chunks and its mandatory keys.

Statistics: pass ``stats={}`` to accumulate routing statistics (see :func:`_accumulate_stats`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import platform
import sys
import warnings
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "reference", "gather", "triton", "flex", "flash", "moc")
MOC_BACKENDS = ("reference", "gather", "triton", "flex", "flash", "moc")
_BIG = torch.iinfo(torch.int64).max // 4
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
# ``gather`` on CPU runs its tiles through PyTorch's fused flash-attention CPU kernels
# (set False to use the plain bmm/softmax tile loop, which is also what runs on CUDA).
GATHER_FUSED_CPU = True
# Upper bound on (query row, key chunk) pairs per query block of the ``gather`` backend.
_BLOCK_PAIRS = 1 << 16
# ``gather`` on CPU first tries its compiled kernel (``moc_cpu.cpp`` next to this file,
# built by torch's C++ extension loader on first use and cached); it falls back to the
# pure-torch tile loop below when no compiler is available, when the head dim is not a
# multiple of 16, or when this flag (or the environment variable UWM_MOC_CPU_KERNEL=0)
# turns it off.
GATHER_KERNEL_CPU = os.environ.get("UWM_MOC_CPU_KERNEL", "1") != "0"
# Queries per segment of the compiled kernel's work lists (cache / TLB locality).
KERNEL_SEGMENT = 1024
_CPU_EXT = None


@dataclass
class StreamMeta:
    """Per-token layout of a (possibly packed) stream row; all tensors ``[B, N]``.

    chunk_ids   routing chunk of each token, increasing along the row, unique across
                documents of one row; -1 for padding.
    doc_ids     document of each token (packed rows hold several); -1 for padding.
    is_text     token belongs to a text segment (a mandatory link for MoC).
    pos_in_doc  0-based position inside its document (attention sinks are pos_in_doc < n_sink).
    positions   absolute index in the row (causality also holds across a KV cache).
    """

    chunk_ids: torch.Tensor
    doc_ids: torch.Tensor
    is_text: torch.Tensor
    pos_in_doc: torch.Tensor
    positions: torch.Tensor

    def slice(self, start: int, end: int | None = None) -> "StreamMeta":
        return StreamMeta(*(t[:, start:end] for t in (self.chunk_ids, self.doc_ids, self.is_text, self.pos_in_doc, self.positions)))


@dataclass
class AttentionSettings:
    """Which backend and, for Mixture of Contexts, its routing knobs.

    top_k           chunks routed per query and head (mandatory links come on top).
    n_sink          first ``n_sink`` tokens of each document are always attended.
    drop_off        training only: probability of dropping each selected chunk.
    drop_in         training only: probability of keeping each of ``top_k`` random extra chunks.
    own_chunk_in_k  MoBA convention: the own chunk uses one of the ``top_k`` slots.
    gather_tile     query rows per (key chunk) tile in the ``gather`` backend.
    gather_block    most queries per block in the ``gather`` backend; blocks also shrink so
                    that one holds at most 65536 (query row, key chunk) pairs (workspace bound).
    """

    backend: str = "dense"
    top_k: int = 4
    n_sink: int = 1
    drop_off: float = 0.0
    drop_in: float = 0.0
    own_chunk_in_k: bool = False
    gather_tile: int = 128
    gather_block: int = 1024

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"attention backend '{self.backend}' is unknown; expected one of {list(BACKENDS)}")
        for name in ("top_k", "gather_tile", "gather_block"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"attention setting '{name}' must be a positive integer, got {val!r}")
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"attention setting 'n_sink' must be an integer >= 0, got {self.n_sink!r}")
        for name in ("drop_off", "drop_in"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= float(val) < 1.0:
                raise ValueError(f"attention setting '{name}' must be a number in [0, 1), got {val!r}")
        if not isinstance(self.own_chunk_in_k, bool):
            raise ValueError(f"attention setting 'own_chunk_in_k' must be true or false, got {self.own_chunk_in_k!r}")
        if self.backend == "flash":
            _require_flash(None)
        if self.backend == "triton":
            _require_triton(None)


def _require_flash(device: torch.device | None) -> None:
    """Raise a ValueError naming the setting when flash-attn or CUDA is missing."""
    why = None
    if importlib.util.find_spec("flash_attn") is None:
        why = "the flash-attn package is not installed (pip install '.[gpu]')"
    elif not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        why = "no CUDA GPU holds the tensors"
    if why:
        raise ValueError(
            f"attention backend 'flash' needs flash-attn and a CUDA GPU (recipe key attention.backend); {why}. "
            "Set attention backend to 'gather' (CPU) or 'flex'/'moc' instead."
        )


def _require_triton(device: torch.device | None) -> None:
    """Raise a ValueError naming the setting when the Triton kernels cannot run here."""
    from unified_wm.model import attention_triton

    why = attention_triton.unavailable_reason(None if device is None else device.type)
    if why:
        raise ValueError(
            f"attention backend 'triton' (recipe key attention.backend) cannot run on this machine: {why}. "
            "Set attention backend to 'moc' (Triton on CUDA, the compiled kernel on CPU) or 'gather' (CPU)."
        )


def dense_mask(q_meta: StreamMeta, k_meta: StreamMeta) -> torch.Tensor:
    """Boolean ``[B, 1, Nq, Nk]``: key is not after the query and in the same document.

    Padding queries attend to themselves only, so no row of the mask is empty.
    """
    qp, kp = q_meta.positions[:, :, None], k_meta.positions[:, None, :]
    qd, kd = q_meta.doc_ids[:, :, None], k_meta.doc_ids[:, None, :]
    allowed = (kp <= qp) & (qd == kd) & (kd >= 0)
    allowed = allowed | (kp == qp)
    return allowed[:, None]


# ----------------------------------------------------------------------------- layout & routing
@dataclass
class _ChunkTable:
    """Chunks of the key row, per batch row, as slots ``0..C-1`` (padded with empty slots).

    kslot [B, Nk] slot of each key (-1 padding); cid/doc/start/length/mand_count [B, C]
    (empty slots: cid _BIG, doc -2, length 0); key_mand [B, Nk] mandatory (text or sink)
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


def _key_mandatory(meta: StreamMeta, n_sink: int) -> torch.Tensor:
    return (meta.doc_ids >= 0) & (meta.is_text.bool() | (meta.pos_in_doc < n_sink))


@torch.no_grad()
def _chunk_table(k: torch.Tensor, k_meta: StreamMeta, n_sink: int) -> _ChunkTable:
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
    start = torch.full((B, C + 1), _BIG, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, ar, "amin")[:, :C]
    last = torch.full((B, C + 1), -1, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, ar, "amax")[:, :C]
    exists = length > 0
    if bool((exists & (last - start + 1 != length)).any()):
        raise ValueError("StreamMeta.chunk_ids must form contiguous runs (a chunk id reappears after another chunk)")
    ctab = torch.full((B, C + 1), _BIG, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, cid, "amin")[:, :C]
    if C > 1 and bool(((ctab[:, 1:] <= ctab[:, :-1]) & exists[:, 1:]).any()):
        raise ValueError("StreamMeta.chunk_ids must increase along the row")
    doc = torch.full((B, C + 1), -2, dtype=torch.long, device=dev).scatter_reduce_(1, sidx, k_meta.doc_ids.long(), "amax")[:, :C]
    key_mand = _key_mandatory(k_meta, n_sink)
    mand_count = torch.zeros(B, C + 1, dtype=torch.long, device=dev).scatter_add_(1, sidx, key_mand.long())[:, :C]
    sink = (k_meta.pos_in_doc < n_sink) & valid
    sink_chunk = torch.zeros(B, C + 1, dtype=torch.long, device=dev).scatter_add_(1, sidx, sink.long())[:, :C] > 0
    Hkv, D = k.shape[1], k.shape[3]
    sums = torch.zeros(B, Hkv, C + 1, D, dtype=torch.float32, device=dev)
    sums.scatter_add_(2, sidx[:, None, :, None].expand(B, Hkv, N, D), k.detach().float())
    lmax = int(length.max()) if C else 0
    return _ChunkTable(kslot, ctab, doc, start.clamp(max=N), length, mand_count, sink_chunk, key_mand, sums[:, :, :C], lmax)


def _query_slots(table: _ChunkTable, q_meta: StreamMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each query's own chunk (-1 for padding) and its document ([B, Nq] each)."""
    qc = q_meta.chunk_ids.long()
    qdoc = q_meta.doc_ids.long()
    C = table.C
    if C == 0:
        return torch.full_like(qc, -1), qdoc
    pos = torch.searchsorted(table.cid.contiguous(), qc.contiguous()).clamp(max=C - 1)
    found = (table.cid.gather(1, pos) == qc) & (qc >= 0) & (qdoc >= 0)
    return torch.where(found, pos, torch.full_like(pos, -1)), qdoc


@torch.no_grad()
def _route(q: torch.Tensor, table: _ChunkTable, qslot: torch.Tensor, qdoc: torch.Tensor,
           settings: AttentionSettings, training: bool) -> torch.Tensor:
    """Selected chunk slots ``[B, Hq, Nq, W]`` (-1 = none) for every query and head."""
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
        ext = _cpu_kernel()
        if ext is not None:  # same selection as below (ties at the k-th score: lower slot)
            return ext.moc_route(q.detach().float().contiguous(), desc.contiguous(), table.candidates().contiguous(),
                                 table.doc.contiguous(), qslot.contiguous(), qdoc.contiguous(), kk)
    slots = torch.arange(C, device=q.device)
    elig = (table.candidates()[:, None, :] & (table.doc[:, None, :] == qdoc[:, :, None])
            & (slots[None, None, :] < qslot[:, :, None]) & (qslot >= 0)[:, :, None])
    if plain:
        # all heads in one matmul: [B, Hkv, G*Nq, D] x [B, Hkv, D, C]
        s = torch.matmul(q.detach().float().reshape(B, Hkv, G * Nq, -1), desc.transpose(-1, -2)).view(B, Hq, Nq, C)
        s = s.masked_fill(~elig[:, None], float("-inf"))
        val, idx = s.topk(kk, dim=-1)
        return torch.where(val > float("-inf"), idx, torch.full_like(idx, -1))
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
def _accumulate_stats(stats: dict, sel: torch.Tensor, table: _ChunkTable, qslot: torch.Tensor,
                      q_meta: StreamMeta, q_index: torch.Tensor, mand_before: torch.Tensor) -> None:
    """Add routing statistics of one call to ``stats`` (accumulated over calls/layers).

    Keys: ``moc_calls``; ``moc_routed_pairs`` / ``moc_causal_pairs`` (allowed vs causal
    same-document query-key pairs, summed over heads) and ``moc_sparsity`` = 1 - ratio;
    ``moc_sel_{prev,sink,text,far,total}`` counts of routed selections by chunk kind
    (previous chunk, chunk holding a sink token, chunk holding text, any other past
    chunk); ``moc_selection_entropy`` mean entropy (nats) of the per-head histogram of
    selected chunks. ``q_index`` [B, Nq] index of each query in the key row;
    ``mand_before`` [B, Nq] mandatory keys of the query's document before its chunk.
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
    base = ((own_causal + mand_before) * valid_q).sum() * Hq
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


def _mand_before(table: _ChunkTable, qslot: torch.Tensor, q_meta: StreamMeta, q_index: torch.Tensor) -> torch.Tensor:
    """Mandatory keys of each query's document located before its own chunk ([B, Nq])."""
    km = table.key_mand.long()
    cum = torch.cat([torch.zeros_like(km[:, :1]), km.cumsum(1)], 1)
    own_start = table.start.gather(1, qslot.clamp(min=0)) if table.C else torch.zeros_like(qslot)
    doc_start = (q_index - q_meta.pos_in_doc.long()).clamp(min=0)
    n = cum.gather(1, own_start.clamp(max=km.shape[1])) - cum.gather(1, doc_start.clamp(max=km.shape[1]))
    return torch.where(qslot >= 0, n.clamp(min=0), torch.zeros_like(n))


@dataclass
class _Routing:
    table: _ChunkTable
    qslot: torch.Tensor
    qdoc: torch.Tensor
    sel: torch.Tensor
    q_index: torch.Tensor


@torch.no_grad()
def _plan_routing(q, k, q_meta, k_meta, settings, training, stats) -> _Routing:
    table = _chunk_table(k, k_meta, settings.n_sink)
    qslot, qdoc = _query_slots(table, q_meta)
    sel = _route(q, table, qslot, qdoc, settings, training)
    Nq, Nk = q.shape[2], k.shape[2]
    q_index = torch.arange(Nk - Nq, Nk, device=q.device).expand(q.shape[0], Nq)
    if stats is not None:
        _accumulate_stats(stats, sel, table, qslot, q_meta, q_index, _mand_before(table, qslot, q_meta, q_index))
    return _Routing(table, qslot, qdoc, sel, q_index)


def _check_shapes(q, k, v, q_meta, k_meta) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B,Hq,Nq,D] and k, v [B,Hkv,Nk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if tuple(q_meta.chunk_ids.shape) != (q.shape[0], q.shape[2]) or k_meta.chunk_ids.shape[1] != k.shape[2]:
        raise ValueError("StreamMeta shapes must be [B, Nq] for queries and [B, Nk] for keys")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}); queries are the last tokens of the key row")


@torch.no_grad()
def _mask_from_routing(r: _Routing, q_meta: StreamMeta, k_meta: StreamMeta, Hq: int) -> torch.Tensor:
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
    _check_shapes(q, k, k, q_meta, k_meta)
    r = _plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    return _mask_from_routing(r, q_meta, k_meta, q.shape[1])


def _reference_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    mask = routed_mask(q, k, q_meta, k_meta, settings, training=training, stats=stats)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------- gather backend
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
def _tile_plan(q, k, q_meta, k_meta, r: _Routing, settings: AttentionSettings, scale: float) -> _TilePlan:
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


def _self_values(v: torch.Tensor, Hq: int, Nq: int) -> torch.Tensor:
    """Each query's own value row ``[B, Hq, Nq, D]`` (what a padding query attends to)."""
    return v[:, :, v.shape[2] - Nq:].repeat_interleave(Hq // v.shape[1], dim=1)


def _with_padding(out: torch.Tensor, v: torch.Tensor, r: _Routing) -> torch.Tensor:
    pad = r.qslot < 0
    if not bool(pad.any()):
        return out
    return torch.where(pad[:, None, :, None], _self_values(v, out.shape[1], out.shape[2]).to(out.dtype), out)


def _cpu_kernel():
    """The compiled CPU kernel module, or None (built once per machine, then cached)."""
    global _CPU_EXT
    if _CPU_EXT is None:
        _CPU_EXT = False
        if GATHER_KERNEL_CPU:
            try:
                from torch.utils.cpp_extension import load

                # -march=native code must not be reused on another CPU: the name carries
                # a hash of the CPU's feature flags (and the source, via torch's versioning)
                flags = ""
                try:
                    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))), "")
                except OSError:
                    pass
                # and of the source's path: ninja rebuilds a folder whose build file names another
                # checkout's source, so two checkouts sharing one folder would rebuild in turn.
                src = Path(__file__).resolve().with_name("moc_cpu.cpp")
                tag = hashlib.sha1(f"{platform.machine()} {flags} {src}".encode()).hexdigest()[:10]
                name = f"uwm_moc_cpu_{tag}"
                from unified_wm.utils import extensions_dir

                root = extensions_dir()  # the folder training uses too, so rollout/eval reuse its build
                build = Path(root) / name if root is not None else None
                kw = {}
                if build is not None:
                    build.mkdir(parents=True, exist_ok=True)
                    kw["build_directory"] = str(build)
                else:
                    try:  # only for the note below (a private torch helper: never fatal)
                        from torch.utils.cpp_extension import _get_build_directory

                        build = Path(_get_build_directory(name, verbose=False))
                    except Exception:
                        pass
                if build is None or not any(p.stat().st_mtime >= src.stat().st_mtime for p in build.glob("*.so")):
                    print(f"[uwm] building the MoC CPU attention kernel in {build or 'torch_extensions'} "
                          "(first use of this source on this machine, ~30 s)", file=sys.stderr, flush=True)
                _CPU_EXT = load(name=name, sources=[str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                extra_ldflags=["-fopenmp"], verbose=False, **kw)
            except Exception as e:  # no compiler, no headers, an unsupported CPU...
                warnings.warn(f"the MoC CPU kernel could not be built ({type(e).__name__}: {str(e)[:300]}); "
                              "the gather backend uses its pure-torch tiles instead (slower, same results)")
    return _CPU_EXT or None


class _KernelMoC(torch.autograd.Function):
    """Exact MoC attention through the compiled CPU kernel (``moc_cpu.cpp``)."""

    @staticmethod
    def forward(ctx, q, k, v, r: _Routing, scale: float, ext):
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


def _gather_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    scale = 1.0 / math.sqrt(q.shape[-1])
    r = _plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    if not bool((r.qslot >= 0).any()):
        return _self_values(v, q.shape[1], q.shape[2]).to(q.dtype)
    if q.device.type == "cpu" and q.shape[-1] % 16 == 0:
        ext = _cpu_kernel()
        if ext is not None:
            out = _KernelMoC.apply(q, k, v, r, scale, ext).to(q.dtype)
            return _with_padding(out, v, r)
    plan = _tile_plan(q, k, q_meta, k_meta, r, settings, scale)
    out = _GatherMoC.apply(q, k, v, plan).to(q.dtype)
    return _with_padding(out, v, r)


# ----------------------------------------------------------------------------- flex backend
_COMPILED_FLEX = None


def _flex_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _COMPILED_FLEX
    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError(
            "attention backend 'flex' has no backward on CPU (a PyTorch FlexAttention limitation); "
            "set attention backend to 'gather' (or 'moc') to train on CPU"
        )
    r = _plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    t = r.table
    B, Hq, Nq, D = q.shape
    Nk, C = k.shape[2], t.C
    onehot = torch.zeros(B, Hq, Nq, C + 1, dtype=torch.bool, device=q.device)
    onehot.scatter_(-1, torch.where(r.sel >= 0, r.sel, torch.full_like(r.sel, C)), True)
    kslot = torch.where(t.kslot >= 0, t.kslot, torch.full_like(t.kslot, C))
    qslot, kmand = r.qslot, t.key_mand
    qpos, kpos = q_meta.positions.long(), k_meta.positions.long()
    qdoc, kdoc = q_meta.doc_ids.long(), k_meta.doc_ids.long()

    def mask_mod(b, h, qi, ki):
        ks = kslot[b, ki]
        allowed = onehot[b, h, qi, ks] | (ks == qslot[b, qi]) | kmand[b, ki]
        inside = (kpos[b, ki] <= qpos[b, qi]) & (kdoc[b, ki] == qdoc[b, qi]) & (kdoc[b, ki] >= 0)
        return (inside & allowed) | (kpos[b, ki] == qpos[b, qi])

    block_mask = create_block_mask(mask_mod, B, Hq, Nq, Nk, device=q.device, _compile=q.is_cuda)
    fn = flex_attention
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    else:  # CPU: inference only (checked above); FlexAttention rejects inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=Hq != k.shape[1])


def _flash_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    from unified_wm.model import attention_flash

    _require_flash(q.device)
    r = _plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    return _with_padding(attention_flash.moc(q, k, v, q_meta, k_meta, r), v, r)


# ----------------------------------------------------------------------------- decoding
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
    _FILL = {"cid": _BIG, "doc": -2, "start": _BIG, "length": 0, "mand_count": 0, "sink_count": 0, "sums": 0.0,
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
        m = k_meta.slice(n0)
        cid = m.chunk_ids.long()
        valid = cid >= 0
        self.bad[0] |= ((m.doc_ids >= 0) & ~valid).any()
        mand = _key_mandatory(m, self.n_sink) & valid
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

    def table(self) -> _ChunkTable:
        C = self.c_hi
        return _ChunkTable(None, self.cid[:, :C], self.doc[:, :C], self.start[:, :C], self.length[:, :C],
                           self.mand_count[:, :C], self.sink_count[:, :C] > 0, None, self.sums[:, :, :C], self.lmax)

    def attend(self, q, k, v, q_meta, k_meta, settings, training=False, stats=None) -> torch.Tensor:
        """Attention of the last ``Nq`` tokens, reading only their routed and mandatory keys."""
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        t = self.table()
        qslot, qdoc = _query_slots(t, q_meta)
        sel = _route(q, t, qslot, qdoc, settings, training)
        W = sel.shape[-1]
        L = max(t.lmax, 1)
        dev = q.device
        j = torch.arange(L, device=dev)
        q_index = torch.arange(Nk - Nq, Nk, device=dev).expand(B, Nq)
        own = qslot.clamp(min=0)
        own_start = t.start.gather(1, own) if t.C else torch.zeros_like(own)
        own_len = t.length.gather(1, own) if t.C else torch.zeros_like(own)
        key_mand_full = _key_mandatory(k_meta, self.n_sink)
        # own chunk (causal by position) -> [B, 1, Nq, L]
        oi = (own_start[:, :, None] + j).clamp(max=Nk - 1)
        ov = (j < own_len[:, :, None]) & (qslot >= 0)[:, :, None]
        ov &= k_meta.positions.gather(1, oi.view(B, -1)).view(B, Nq, L) <= q_meta.positions[:, :, None]
        # routed chunks, their non-mandatory keys -> [B, Hq, Nq, W*L]
        sc = sel.clamp(min=0)
        rstart = t.start[:, None, None, :].expand(B, Hq, Nq, t.C).gather(-1, sc) if W else sc
        rlen = t.length[:, None, None, :].expand(B, Hq, Nq, t.C).gather(-1, sc) if W else sc
        ri = (rstart[..., None] + j).clamp(max=Nk - 1)
        rv = (j < rlen[..., None]) & (sel >= 0)[..., None]
        rv &= ~key_mand_full.gather(1, ri.view(B, -1)).view(ri.shape)
        ri, rv = ri.flatten(-2), rv.flatten(-2)
        # mandatory keys before the own chunk, same document -> [B, 1, Nq, M]
        M = self.m_hi
        mi = self.mand_idx[:, :M]
        mic = mi.clamp(min=0)
        mv = (mi[:, None, :] >= 0) & (mic[:, None, :] < own_start[:, :, None]) & (qslot >= 0)[:, :, None]
        mv &= k_meta.doc_ids.long().gather(1, mic)[:, None, :] == qdoc[:, :, None]
        idx = torch.cat([oi[:, None].expand(B, Hq, Nq, L), ri, mic[:, None, None, :].expand(B, Hq, Nq, M)], -1)
        valid = torch.cat([ov[:, None].expand(B, Hq, Nq, L), rv, mv[:, None].expand(B, Hq, Nq, M)], -1)
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
            _accumulate_stats(stats, sel, full, qslot, q_meta, q_index, _mand_before(full, qslot, q_meta, q_index))
        if W:  # how often each chunk is selected: unbounded streaming keeps the popular ones
            flat = sel.reshape(B, -1)
            self.sel_count[:, :t.C].scatter_add_(1, flat.clamp(min=0), (flat >= 0).float())
        r = _Routing(t, qslot, qdoc, sel, q_index)
        return _with_padding(out, v, r)

    def attend_masked(self, q, k, v, q_meta, k_meta, settings, stats=None) -> torch.Tensor:
        """Many new queries at once (parallel decoding of a frame): route with the decode state's
        chunk sums, then attend to the whole cache under the routed boolean mask."""
        B, Hq, Nq, D = q.shape
        Nk = k.shape[2]
        t = self.table()
        qslot, qdoc = _query_slots(t, q_meta)
        sel = _route(q, t, qslot, qdoc, settings, False)  # [B, Hq, Nq, W]
        key = (id(k_meta), t.C, Nk)
        memo = q_meta.__dict__.get("_masked_memo")
        if memo is None or memo[0] != key:  # the layout part is the same for every layer of a call
            kslot, kdoc = _query_slots(t, k_meta)  # slot of every key's chunk
            kmand = _key_mandatory(k_meta, self.n_sink)
            own_start = t.start.gather(1, qslot.clamp(min=0)) if t.C else torch.zeros_like(qslot)
            kpos, qpos = k_meta.positions, q_meta.positions
            same_doc = (kdoc[:, None, :] == qdoc[:, :, None]) & (kdoc >= 0)[:, None, :] & (qslot >= 0)[:, :, None]
            own = (kslot[:, None, :] == qslot[:, :, None]) & (kpos[:, None, :] <= qpos[:, :, None])
            mand = kmand[:, None, :] & (torch.arange(Nk, device=q.device)[None, None, :] < own_start[:, :, None])
            base = (own | mand) & same_doc  # [B, Nq, Nk]
            # a key's chunk slot, with chunks the query may not route to (other documents,
            # mandatory-only keys handled by ``base``) sent to a dummy slot C
            kslot_r = torch.where(same_doc, kslot[:, None, :], torch.full_like(base, t.C, dtype=torch.long))
            memo = q_meta.__dict__["_masked_memo"] = (key, base, kslot_r)
        _, base, kslot_r = memo
        if sel.shape[-1]:
            picked = torch.zeros(B, Hq, Nq, t.C + 1, dtype=torch.bool, device=q.device)
            picked.scatter_(-1, torch.where(sel >= 0, sel, torch.full_like(sel, t.C)), True)
            picked[..., t.C] = False
            if B == 1 and bool((kslot_r[0] == kslot_r[0, :1]).all()):  # one layout for all queries
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
            _accumulate_stats(stats, sel, full, qslot, q_meta, q_index, _mand_before(full, qslot, q_meta, q_index))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != k.shape[1])
        return out


def _chunk_table_lite(t: _ChunkTable, k_meta: StreamMeta, n_sink: int) -> _ChunkTable:
    """``t`` plus the per-key mandatory flags that statistics need."""
    return _ChunkTable(t.kslot, t.cid, t.doc, t.start, t.length, t.mand_count, t.sink_chunk,
                       _key_mandatory(k_meta, n_sink), t.sums, t.lmax)


def new_decode_state(settings: AttentionSettings) -> MoCDecodeState | None:
    """A fresh per-layer decode state for ``settings`` (None for ``dense``/``reference``,
    which recompute everything from the full cache)."""
    if settings.backend in ("dense", "reference"):
        return None
    return MoCDecodeState(settings.n_sink)


# ----------------------------------------------------------------------------- entry point
def resolve_backend(settings: AttentionSettings, device: torch.device | str) -> str:
    """The concrete backend that runs on ``device`` (a device or its type, e.g. "cuda"):
    ``moc`` -> ``triton`` on CUDA (``flex`` when triton is not installed), ``gather`` elsewhere."""
    if settings.backend == "moc":
        kind = device if isinstance(device, str) else device.type
        if kind == "cuda":
            from unified_wm.model import attention_triton

            return "triton" if attention_triton.available() else "flex"
        return "gather"
    return settings.backend


def _triton_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    from unified_wm.model import attention_triton

    _require_triton(q.device)
    r = _plan_routing(q, k, q_meta, k_meta, settings, training, stats)
    if not bool((r.qslot >= 0).any()):
        return _self_values(v, q.shape[1], q.shape[2]).to(q.dtype)
    out = attention_triton.moc_attention(q, k, v, q_meta, k_meta, r)
    return _with_padding(out, v, r)


_MOC_IMPL = {"reference": _reference_attend, "gather": _gather_attend, "triton": _triton_attend,
             "flex": _flex_attend, "flash": _flash_attend}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_meta: StreamMeta,
    k_meta: StreamMeta,
    settings: AttentionSettings,
    *,
    training: bool = False,
    state: object | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Attention output ``[B, Hq, Nq, D]`` under ``settings.backend``.

    ``state`` (a :class:`MoCDecodeState` from :func:`new_decode_state`) is updated with the
    unseen keys; calls with at most ``DECODE_MAX_QUERIES`` new queries then use it, larger
    ones (prefill) run the configured backend. ``stats`` (a dict) accumulates routing
    statistics. Raises ValueError naming the setting for bad or unavailable settings.
    """
    if settings.backend == "dense":
        gqa = q.shape[1] != k.shape[1]
        if q.shape[2] == k.shape[2] and bool((k_meta.doc_ids == k_meta.doc_ids[:, :1]).all()) and bool((k_meta.doc_ids >= 0).all()):
            # one document per row, no padding: the mask is plain causal, and the fused causal
            # kernel skips the upper triangle instead of reading an N x N mask
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = dense_mask(q_meta, k_meta)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    settings.validate()
    _check_shapes(q, k, v, q_meta, k_meta)
    backend = resolve_backend(settings, q.device)
    if state is not None and backend != "reference":
        if not isinstance(state, MoCDecodeState):
            raise ValueError(f"attention state must be a MoCDecodeState (from new_decode_state), got {type(state).__name__}")
        state.update(k, k_meta)
        if q.shape[2] <= DECODE_MAX_QUERIES:
            return state.attend(q, k, v, q_meta, k_meta, settings, training=training, stats=stats)
        if q.shape[2] * k.shape[2] <= DECODE_MASKED_MAX_PAIRS and not training:
            return state.attend_masked(q, k, v, q_meta, k_meta, settings, stats=stats)
    return _MOC_IMPL[backend](q, k, v, q_meta, k_meta, settings, training, stats)
