"""The ``dense`` backend: causal attention inside each document of a packed row (no routing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_core import StreamMeta, register_attention


def dense_mask(q_meta: StreamMeta, k_meta: StreamMeta) -> torch.Tensor:
    """Boolean ``[B, 1, Nq, Nk]``: key is not after the query and in the same document.

    Padding queries attend to themselves only, so no row of the mask is empty.
    """
    qp, kp = q_meta.positions[:, :, None], k_meta.positions[:, None, :]
    qd, kd = q_meta.doc_ids[:, :, None], k_meta.doc_ids[:, None, :]
    allowed = (kp <= qp) & (qd == kd) & (kd >= 0)
    allowed = allowed | (kp == qp)
    return allowed[:, None]


@register_attention("dense")
def dense_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    gqa = q.shape[1] != k.shape[1]
    if q.shape[2] == k.shape[2] and bool((k_meta.doc_ids == k_meta.doc_ids[:, :1]).all()) and bool((k_meta.doc_ids >= 0).all()):
        # one document per row, no padding: the mask is plain causal, and the fused causal
        # kernel skips the upper triangle instead of reading an N x N mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = dense_mask(q_meta, k_meta)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
