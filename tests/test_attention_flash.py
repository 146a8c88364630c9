"""The ``flash`` backend's glue (varlen sequences, cu_seqlens, gathering, the LSE merge and
its gradient), on CPU.

flash-attn cannot run here (no CUDA), so these tests inject ``fake_varlen``: a pure-torch
function with the signature and semantics of ``flash_attn.flash_attn_varlen_func`` (packed
``[total, H, D]`` inputs, grouped-query heads, bottom-right causal alignment, the LSE
returned as ``[H, total_q]`` WITHOUT gradient, as flash-attn's autograd does). Everything
but the kernel itself is the code that runs on a GPU; the kernel has not been run yet.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_attention import make_meta, moc_kw, qkv
from unified_wm.model import attention_flash, attention_routing
from unified_wm.model.attention import AttentionSettings, attend


def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                softmax_scale=None, causal=False, return_attn_probs=False):
    assert q.dim() == 3 and k.shape == v.shape and q.shape[1] % k.shape[1] == 0
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert len(cu_seqlens_q) == len(cu_seqlens_k) and int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
    G = q.shape[1] // k.shape[1]
    scale = softmax_scale or q.shape[-1] ** -0.5
    outs, lses = [], []
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        assert 0 < q1 - q0 <= max_seqlen_q and 0 < k1 - k0 <= max_seqlen_k
        qs = q[q0:q1].transpose(0, 1).float()
        ks = k[k0:k1].repeat_interleave(G, 1).transpose(0, 1).float()
        vs = v[k0:k1].repeat_interleave(G, 1).transpose(0, 1).float()
        s = qs @ ks.transpose(1, 2) * scale
        if causal:  # bottom-right aligned: query i sees keys j <= i + (nk - nq)
            nq, nk = q1 - q0, k1 - k0
            ok = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
            s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1).to(q.dtype))
        lses.append(lse)
    out = torch.cat(outs)
    if return_attn_probs:
        return out, torch.cat(lses, 1).detach(), None
    return out


def grads(out, q, k, v, seed=1):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out, *torch.autograd.grad((out * cot).sum(), (q, k, v)))


def flash_moc(q, k, v, q_meta, k_meta, settings):
    r = attention_routing.plan_routing(q, k, q_meta, k_meta, settings, False, None)
    return attention_routing.with_padding(attention_flash.moc(q, k, v, q_meta, k_meta, r, varlen=fake_varlen), v, r)


@pytest.mark.parametrize("top_k,own_in_k,Hq,Hkv", [(2, False, 4, 2), (3, True, 4, 1), (1, False, 2, 2)])
def test_flash_moc_glue_matches_reference(top_k, own_in_k, Hq, Hkv):
    meta = make_meta(2, 83, seed=top_k)
    q, k, v = qkv(Hq=Hq, Hkv=Hkv, seed=top_k)
    s = AttentionSettings(backend="reference", **moc_kw(top_k=top_k, own_chunk_in_k=own_in_k))
    ref = grads(attend(q, k, v, meta, meta, s), q, k, v)
    got = grads(flash_moc(q, k, v, meta, meta, s), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_flash_moc_without_the_lse_gradient_would_be_wrong(monkeypatch):
    """The LSE-gradient correction is needed: switched off, dq differs from the oracle."""
    meta = make_meta(2, 83, seed=2)
    q, k, v = qkv(seed=2)
    s = AttentionSettings(backend="reference", **moc_kw(top_k=2))
    ref = grads(attend(q, k, v, meta, meta, s), q, k, v)
    monkeypatch.setattr(attention_flash._LseGrad, "apply", staticmethod(lambda out, *a: out))
    got = grads(flash_moc(q, k, v, meta, meta, s), q, k, v)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=1e-4)  # the forward is right anyway
    torch.testing.assert_close(got[3], ref[3], atol=2e-5, rtol=1e-4)  # dv needs no LSE term
    assert not torch.allclose(got[1], ref[1], atol=1e-3)


def test_flash_moc_fewer_queries_than_keys():
    meta = make_meta(2, 70, seed=5)
    q, k, v = qkv(N=70, seed=5)
    qs = q[:, :, -30:].detach().requires_grad_()
    s = AttentionSettings(backend="reference", **moc_kw())
    ref = grads(attend(qs, k, v, meta.slice(40), meta, s), qs, k, v)
    got = grads(flash_moc(qs, k, v, meta.slice(40), meta, s), qs, k, v)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_flash_dense_packed_documents_match_dense():
    meta = make_meta(2, 60, seed=8)
    q, k, v = qkv(N=60, seed=8)
    ref = grads(attend(q, k, v, meta, meta, AttentionSettings(backend="dense")), q, k, v)
    got = grads(attention_flash.dense(q, k, v, meta, meta, varlen=fake_varlen), q, k, v)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    qs = q[:, :, -10:].detach()  # a cached step: queries are the tail of the row
    with torch.no_grad():
        a = attend(qs, k, v, meta.slice(50), meta, AttentionSettings(backend="dense"))
        b = attention_flash.dense(qs, k, v, meta.slice(50), meta, varlen=fake_varlen)
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_cu_seqlens_from_doc_ids():
    doc = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    seg = attention_flash._segments(doc)
    assert seg.tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 4, 5]
    assert attention_flash._cu(torch.tensor([2, 3, 1])).tolist() == [0, 2, 5, 6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA/flash-attn are absent")
def test_flash_unavailable_fails_when_the_model_is_built():
    from tests.test_model import CFG
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    with pytest.raises(ValueError, match=r"'flash'.*attention\.backend.*pip install"):
        UnifiedWMForCausalLM(UnifiedWMConfig(**CFG, attention={"backend": "flash"}))
