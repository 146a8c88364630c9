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
  every text token of ``d`` (``is_text``; with ``mandatory_actions`` the model's stream layout
  marks its action segments there too), the first ``n_sink`` tokens of ``d``
  (``pos_in_doc < n_sink``), and the query's own chunk. All of them only at or before
  the query.
* Candidates for routing: chunks of the same document whose id is strictly less than
  the query's own chunk id (causal routing: never a chunk at/after its own), excluding
  chunks made ONLY of mandatory tokens (text/sink chunks are visible anyway, so ``k``
  buys extra context). A chunk that mixes mandatory and other tokens stays a candidate.
* Each query head picks the ``top_k`` highest-scoring candidates (fewer when fewer
  exist; ties broken by ``torch.topk``). With ``own_chunk_in_k=True`` (MoBA
  convention) the own chunk counts inside the budget: ``top_k - 1`` are routed.
* With ``dense_text_queries=True`` a text query (``is_text``) routes nothing and reads every
  key of its document at or before it, as in ``dense``: a caption written after a clip, or
  an event caption, reads the whole clip. ``attend`` recomputes those rows after any MoC
  backend (rows x keys of work); the reference mask holds them directly.
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

Statistics: pass ``stats={}`` to accumulate routing statistics (see :func:`accumulate_stats`).
"""
from __future__ import annotations

import torch

# each backend module registers itself in ATTENTION_FUNCTIONS when imported; written `from .x import y`,
# the form transformers' loader follows when an exported folder is loaded without the package (remote_code.py)
from .attention_dense import dense_attend  # noqa: F401
from .attention_flash import flash_attend  # noqa: F401
from .attention_flex import flex_attend  # noqa: F401
from .attention_gather import gather_attend  # noqa: F401
from .attention_routing import reference_attend  # noqa: F401
from .attention_triton import triton_attend  # noqa: F401
from .attention_core import ATTENTION_FUNCTIONS, BACKENDS, CONFIG_KEYS, MOC_BACKENDS, AttentionSettings, StreamMeta, register_attention  # noqa: F401 (CONFIG_KEYS: re-exported)
from .attention_decode import DECODE_MASKED_MAX_KEYS, DECODE_MASKED_MAX_PAIRS, DECODE_MAX_QUERIES, MoCDecodeState, new_decode_state
from .attention_dense import dense_mask
from .attention_routing import attend_dense_rows, check_shapes, dense_text_rows, routed_mask

__all__ = ["ATTENTION_FUNCTIONS", "BACKENDS", "MOC_BACKENDS", "AttentionSettings", "MoCDecodeState", "StreamMeta", "attend",
           "dense_mask", "new_decode_state", "register_attention", "resolve_backend", "routed_mask"]
assert set(BACKENDS) <= set(ATTENTION_FUNCTIONS) | {"moc"}, "every built-in backend name has a registered function"


def resolve_backend(settings: AttentionSettings, device: torch.device | str) -> str:
    """The concrete backend that runs on ``device`` (a device or its type, e.g. "cuda"):
    ``moc`` -> ``triton`` on CUDA (``flex`` when triton is not installed), ``gather`` elsewhere."""
    if settings.backend == "moc":
        kind = device if isinstance(device, str) else device.type
        if kind == "cuda":
            from .attention_triton import available

            return "triton" if available() else "flex"
        return "gather"
    return settings.backend


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
    unseen keys; calls with at most ``DECODE_MAX_QUERIES`` new queries then use it (gathering
    the routed keys, or over a cache of at most ``DECODE_MASKED_MAX_KEYS`` keys the routed mask),
    larger ones the routed mask up to ``DECODE_MASKED_MAX_PAIRS`` pairs, and prefill runs the
    configured backend. ``stats`` (a dict) accumulates routing
    statistics. Raises ValueError naming the setting for bad or unavailable settings.
    """
    settings.validate()
    check_shapes(q, k, v, q_meta, k_meta)
    backend = resolve_backend(settings, q.device)
    if backend in ("dense", "reference"):  # the reference's mask already holds the dense text rows
        return ATTENTION_FUNCTIONS[backend](q, k, v, q_meta, k_meta, settings, training, stats)
    out = None
    if state is not None:
        if not isinstance(state, MoCDecodeState):
            raise ValueError(f"attention state must be a MoCDecodeState (from new_decode_state), got {type(state).__name__}")
        state.update(k, k_meta)
        Nq, Nk = q.shape[2], k.shape[2]
        if Nq <= DECODE_MAX_QUERIES and (training or Nk > DECODE_MASKED_MAX_KEYS):
            out = state.attend(q, k, v, q_meta, k_meta, settings, training=training, stats=stats)
        elif Nq * Nk <= DECODE_MASKED_MAX_PAIRS and not training:
            out = state.attend_masked(q, k, v, q_meta, k_meta, settings, stats=stats)
    if out is None:
        out = ATTENTION_FUNCTIONS[backend](q, k, v, q_meta, k_meta, settings, training, stats)
    rows = dense_text_rows(q_meta, settings)
    return out if rows is None else attend_dense_rows(out, q, k, v, q_meta, k_meta, rows)
