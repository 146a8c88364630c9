"""The ``flex`` backend: Mixture of Contexts through ``torch.nn.attention.flex_attention`` with a
``mask_mod`` built from the routing (CUDA: compiled, forward and backward; CPU: inference only)."""
from __future__ import annotations

import torch

from .attention_core import register_attention
from .attention_routing import plan_routing

_COMPILED_FLEX = None


@register_attention("flex")
def flex_attend(q, k, v, q_meta, k_meta, settings, training, stats):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _COMPILED_FLEX
    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError(
            "attention backend 'flex' has no backward on CPU (a PyTorch FlexAttention limitation); "
            "set attention backend to 'gather' (or 'moc') to train on CPU"
        )
    r = plan_routing(q, k, q_meta, k_meta, settings, training, stats)
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
