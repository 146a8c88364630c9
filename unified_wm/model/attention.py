"""Attention for the unified stream: one interface, several backends, one oracle.

Every backend computes ``softmax(q k^T * scale + mask) v`` for the SAME mask; they differ
only in how they avoid materialising it. The mask is defined by the per-token stream
layout (:class:`StreamMeta`), never by the backend.

``dense``      causal attention restricted to the query's own document (packed rows).

(The Mixture-of-Contexts backends, and their oracle ``reference``, extend this module.)

Shapes: q ``[B, Hq, Nq, D]``; k, v ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (grouped-query
attention). During cached decoding ``Nq < Nk`` and the queries are the last tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("dense",)


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
    """Which backend and, for Mixture of Contexts, its routing knobs."""

    backend: str = "dense"
    top_k: int = 4
    n_sink: int = 1
    drop_off: float = 0.0
    drop_in: float = 0.0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"attention backend '{self.backend}' is unknown; expected one of {list(BACKENDS)}")


def dense_mask(q_meta: StreamMeta, k_meta: StreamMeta) -> torch.Tensor:
    """Boolean ``[B, 1, Nq, Nk]``: key is not after the query and in the same document.

    Padding queries attend to themselves only, so no row of the mask is empty.
    """
    qp, kp = q_meta.positions[:, :, None], k_meta.positions[:, None, :]
    qd, kd = q_meta.doc_ids[:, :, None], k_meta.doc_ids[:, None, :]
    allowed = (kp <= qp) & (qd == kd) & (kd >= 0)
    allowed = allowed | (kp == qp)
    return allowed[:, None]


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
    """Attention output ``[B, Hq, Nq, D]`` under ``settings.backend``."""
    if settings.backend == "dense":
        mask = dense_mask(q_meta, k_meta)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    raise ValueError(f"attention backend '{settings.backend}' is unknown; expected one of {list(BACKENDS)}")
