"""Mixture-of-Contexts attention: every backend against the dense-mask oracle.

Random packed rows with several documents, uneven chunks, text chunks, padding and
grouped-query heads. The oracle (``reference``) is itself checked against an
independent naive MoBA implementation and against the semantics (causal routing,
mandatory links, dense limit).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unified_wm.model.attention import (
    BACKENDS,
    AttentionSettings,
    MoCDecodeState,
    StreamMeta,
    attend,
    dense_mask,
    new_decode_state,
    resolve_backend,
    routed_mask,
)


def make_meta(B: int, N: int, *, max_chunk: int = 7, text_p: float = 0.3, pad_max: int = 5,
              n_docs: int = 3, seed: int = 0) -> StreamMeta:
    """Packed rows: ``n_docs`` documents, chunks of 1..max_chunk tokens, some text chunks,
    rows after the first end with up to ``pad_max`` padding tokens."""
    g = torch.Generator().manual_seed(seed)
    chunk = torch.full((B, N), -1, dtype=torch.long)
    doc = torch.full((B, N), -1, dtype=torch.long)
    is_text = torch.zeros(B, N, dtype=torch.bool)
    pid = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        pad = int(torch.randint(1, pad_max + 1, (1,), generator=g)) if b and pad_max else 0
        n = N - pad
        cuts = sorted(torch.randperm(n - 1, generator=g)[: n_docs - 1].add(1).tolist()) if n_docs > 1 else []
        bounds = [0, *cuts, n]
        cid = 0
        for d, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:])):
            i = s0
            while i < s1:
                e = min(s1, i + int(torch.randint(1, max_chunk + 1, (1,), generator=g)))
                chunk[b, i:e], doc[b, i:e] = cid, d
                is_text[b, i:e] = bool(torch.rand(1, generator=g) < text_p)
                pid[b, i:e] = torch.arange(i - s0, e - s0)
                cid, i = cid + 1, e
    return StreamMeta(chunk, doc, is_text, pid, torch.arange(N).expand(B, N).contiguous())


def qkv(B=2, Hq=4, Hkv=2, N=83, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, N, D, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


def run(backend, q, k, v, meta, grad_seed=1, **kw):
    """Output and input gradients (q, k, v) of one backend for a fixed random cotangent."""
    s = AttentionSettings(backend=backend, **kw)
    out = attend(q, k, v, meta, meta, s)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    grads = torch.autograd.grad((out * cot).sum(), (q, k, v))
    return (out, *grads)


def moc_kw(**kw):
    base = dict(top_k=2, n_sink=2, gather_tile=8, gather_block=32)
    base.update(kw)
    return base


# ----------------------------------------------------------------------------- backends vs oracle
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("own_in_k", [False, True])
def test_gather_matches_reference_fp32(top_k, own_in_k):
    meta = make_meta(2, 83)
    q, k, v = qkv()
    kw = moc_kw(top_k=top_k, own_chunk_in_k=own_in_k)
    ref = run("reference", q, k, v, meta, **kw)
    got = run("gather", q, k, v, meta, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_gather_unfused_tile_loop_matches_reference(monkeypatch):
    """The plain bmm/softmax tile loop (used on CUDA and where the fused CPU kernels are missing)."""
    from unified_wm.model import attention_cpu_kernel, attention_gather

    monkeypatch.setattr(attention_gather, "GATHER_FUSED_CPU", False)
    monkeypatch.setattr(attention_cpu_kernel, "_CPU_EXT", False)  # not the compiled kernel either
    assert attention_gather._fused_ops() is None and attention_cpu_kernel.cpu_kernel() is None
    meta = make_meta(2, 83, seed=21)
    q, k, v = qkv(seed=21)
    ref = run("reference", q, k, v, meta, **moc_kw(top_k=2))
    got = run("gather", q, k, v, meta, **moc_kw(top_k=2))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_cpu_kernel_builds_here():
    """The compiled CPU kernel is what `gather` runs on this machine (a broken build would
    silently fall back to the slower torch tiles, so CI checks that it builds)."""
    from unified_wm.model import attention_cpu_kernel as attention

    if not attention.GATHER_KERNEL_CPU:
        pytest.skip("UWM_MOC_CPU_KERNEL=0 turns the compiled kernel off")
    ext = attention.cpu_kernel()
    assert ext is not None and hasattr(ext, "moc_forward")
    # it lives where training builds DeepSpeed's ops too, so rollout and eval reuse the training's build
    from unified_wm.utils import extensions_dir

    built = Path(ext.__file__).resolve()
    if extensions_dir() is not None:
        assert built.parent.parent == Path(extensions_dir()).resolve()
    assert built.parent.name.startswith("uwm_moc_cpu_")


def test_a_build_stopped_half_way_does_not_block_the_next(tmp_path):
    """torch's loader waits while its ``lock`` file exists; one left by a killed build is removed
    (under an OS lock that dies with its holder), and the kernel loads in a new process."""
    import os
    import shutil
    import subprocess
    import sys

    from unified_wm.model import attention_cpu_kernel as attention

    if not attention.GATHER_KERNEL_CPU:
        pytest.skip("UWM_MOC_CPU_KERNEL=0 turns the compiled kernel off")
    built = Path(attention.cpu_kernel().__file__).resolve().parent
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / built.name, ignore=shutil.ignore_patterns("lock", "uwm_build.lock"))
    (ext / built.name / "lock").touch()  # what a build killed half-way leaves
    code = "from unified_wm.model.attention_cpu_kernel import cpu_kernel; print(cpu_kernel() is not None)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]
    assert "left by a build that was stopped half-way" in r.stderr
    assert not (ext / built.name / "lock").exists()


def test_deepspeed_build_lock_is_removed_only_when_stale(tmp_path):
    import os
    import time

    from unified_wm.distributed import remove_stale_build_lock

    assert not remove_stale_build_lock(str(tmp_path))  # no lock
    lock = tmp_path / "lock"
    lock.touch()
    assert not remove_stale_build_lock(str(tmp_path)) and lock.exists()  # a build in progress
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert remove_stale_build_lock(str(tmp_path)) and not lock.exists()


def test_extensions_dir_follows_the_environment(monkeypatch, tmp_path):
    import sys

    from unified_wm.utils import extensions_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert extensions_dir() == str(tmp_path / "ext")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    (tmp_path / "venv").mkdir()
    assert extensions_dir() == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "venv"))  # not a virtual environment
    assert extensions_dir() is None


@pytest.mark.parametrize("D,max_chunk,Hq,Hkv", [(64, 70, 8, 2), (32, 19, 4, 4), (16, 3, 6, 2)])
def test_cpu_kernel_matches_torch_tiles_and_reference(monkeypatch, D, max_chunk, Hq, Hkv):
    """Chunks of 1 to 70 keys, longer than 64 and not multiples of 16 (the kernel computes each
    at its own padded width, 16 to 80), several head dims and GQA groups: the compiled kernel,
    the torch tiles and the oracle agree, gradients too."""
    from unified_wm.model import attention_cpu_kernel as attention

    meta = make_meta(2, 160, max_chunk=max_chunk, seed=D + max_chunk)
    q, k, v = qkv(Hq=Hq, Hkv=Hkv, N=160, D=D, seed=D)
    kw = moc_kw(top_k=3)
    ref = run("reference", q, k, v, meta, **kw)
    got = run("gather", q, k, v, meta, **kw)
    monkeypatch.setattr(attention, "_CPU_EXT", False)
    tiles = run("gather", q, k, v, meta, **kw)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ref, got, tiles):
        torch.testing.assert_close(b, a, atol=3e-5, rtol=1e-4, msg=lambda m: f"kernel {name}: {m}")
        torch.testing.assert_close(c, a, atol=3e-5, rtol=1e-4, msg=lambda m: f"tiles {name}: {m}")


def test_cpu_routing_kernel_selects_the_same_chunks(monkeypatch):
    """The compiled top-k routing picks the same chunk set per query and head as torch.topk."""
    from unified_wm.model import attention_cpu_kernel, attention_routing

    meta = make_meta(2, 200, max_chunk=9, seed=4)
    q, k, _ = qkv(Hq=8, Hkv=2, N=200, D=32, seed=4)
    for top_k in (1, 4, 40):
        s = AttentionSettings(backend="gather", top_k=top_k)
        r_kernel = attention_routing.plan_routing(q, k, meta, meta, s, False, None)
        with monkeypatch.context() as m:
            m.setattr(attention_cpu_kernel, "_CPU_EXT", False)
            r_torch = attention_routing.plan_routing(q, k, meta, meta, s, False, None)
        assert r_kernel.sel.shape == r_torch.sel.shape
        assert (r_kernel.sel >= 0).sum() > 0
        torch.testing.assert_close(r_kernel.sel.sort(-1).values, r_torch.sel.sort(-1).values)


def test_gather_head_dim_not_multiple_of_16_uses_torch_tiles():
    meta = make_meta(2, 83, seed=9)
    q, k, v = qkv(D=24, seed=9)
    ref = run("reference", q, k, v, meta, **moc_kw(top_k=2))
    got = run("gather", q, k, v, meta, **moc_kw(top_k=2))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_gather_matches_reference_bf16():
    meta = make_meta(2, 83, seed=3)
    q, k, v = qkv(dtype=torch.bfloat16, seed=3)
    kw = moc_kw(top_k=2)
    # same routing (routing always runs in float32) -> compare to the fp32 oracle on the same values
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = run("reference", qf, kf, vf, meta, **kw)
    got = run("gather", q, k, v, meta, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")
    ref_bf16 = run("reference", q, k, v, meta, **kw)
    torch.testing.assert_close(ref_bf16[0].float(), ref[0], atol=3e-2, rtol=3e-2)


def test_gather_with_fewer_queries_than_keys():
    """Cached prefill of a second segment: queries are the last Nq tokens of the row."""
    meta = make_meta(2, 70, seed=5)
    q, k, v = qkv(N=70, seed=5)
    qs = q[:, :, -30:].detach().requires_grad_()
    s_ref = AttentionSettings(backend="reference", **moc_kw())
    s_gat = AttentionSettings(backend="gather", **moc_kw())
    a = attend(qs, k, v, meta.slice(40), meta, s_ref)
    b = attend(qs, k, v, meta.slice(40), meta, s_gat)
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_flex_forward_matches_reference_on_cpu():
    meta = make_meta(2, 83, seed=7)
    q, k, v = qkv(seed=7)
    kw = moc_kw(top_k=2)
    with torch.no_grad():
        ref = attend(q, k, v, meta, meta, AttentionSettings(backend="reference", **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = attend(q, k, v, meta, meta, AttentionSettings(backend="flex", **kw))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_flex_refuses_backward_on_cpu():
    meta = make_meta(1, 20, n_docs=1, pad_max=0)
    q, k, v = qkv(B=1, N=20)
    with pytest.raises(ValueError, match="'flex'.*CPU"):
        attend(q, k, v, meta, meta, AttentionSettings(backend="flex"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA/flash-attn are absent")
def test_flash_unavailable_names_the_setting():
    with pytest.raises(ValueError, match="attention backend 'flash' needs flash-attn and a CUDA GPU"):
        AttentionSettings(backend="flash").validate()


def test_moc_alias_resolves_per_device():
    s = AttentionSettings(backend="moc")
    assert resolve_backend(s, torch.device("cpu")) == "gather"
    from unified_wm.model import attention_triton

    assert resolve_backend(s, torch.device("cuda")) == ("triton" if attention_triton.available() else "flex")
    meta = make_meta(2, 50, seed=2)
    q, k, v = qkv(N=50, seed=2)
    a = attend(q, k, v, meta, meta, AttentionSettings(backend="moc", top_k=2))
    b = attend(q, k, v, meta, meta, AttentionSettings(backend="reference", top_k=2))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- semantics of the mask
def _mask(meta, top_k=2, n_sink=2, **kw):
    q, k, _ = qkv(B=meta.chunk_ids.shape[0], N=meta.chunk_ids.shape[1])
    return routed_mask(q, k, meta, meta, AttentionSettings(backend="reference", top_k=top_k, n_sink=n_sink, **kw))


def test_padding_rows_attend_only_to_themselves():
    meta = make_meta(3, 40, pad_max=6, seed=4)
    pad = meta.doc_ids < 0
    assert pad.any(), "the fixture must contain padding"
    m = _mask(meta)
    eye = torch.eye(40, dtype=torch.bool)
    for b, i in pad.nonzero().tolist():
        assert torch.equal(m[b, :, i], eye[i].expand(m.shape[1], 40))
    q, k, v = qkv(B=3, N=40)
    out = attend(q, k, v, meta, meta, AttentionSettings(backend="gather", top_k=2))
    vself = v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out[pad[:, None].expand_as(out[..., 0])], vself[pad[:, None].expand_as(out[..., 0])])


def test_routing_is_causal_and_same_document():
    meta = make_meta(2, 83, seed=8)
    m = _mask(meta, top_k=3)
    c, d, p = meta.chunk_ids, meta.doc_ids, meta.positions
    later_chunk = c[:, None, :] > c[:, :, None]  # key chunk after query chunk
    other_doc = d[:, None, :] != d[:, :, None]
    future = p[:, None, :] > p[:, :, None]
    valid_q = (d >= 0)[:, :, None]
    bad = m & (later_chunk | other_doc | future)[:, None] & valid_q[:, None]
    assert not bad.any()
    # routed (non-mandatory, non-own) keys come only from strictly earlier chunks
    mand = meta.is_text | (meta.pos_in_doc < 2)
    own = c[:, None, :] == c[:, :, None]
    routed = m & ~mand[:, None, None, :] & ~own[:, None]
    assert routed.any()
    assert not (routed & ~(c[:, None, :] < c[:, :, None])[:, None]).any()


def test_mandatory_links_always_present():
    meta = make_meta(2, 83, seed=9)
    m = _mask(meta, top_k=1, n_sink=3)
    d, p, c = meta.doc_ids, meta.positions, meta.chunk_ids
    same = (d[:, None, :] == d[:, :, None]) & (d >= 0)[:, :, None] & (p[:, None, :] <= p[:, :, None])
    text = same & meta.is_text[:, None, :]
    sink = same & (meta.pos_in_doc < 3)[:, None, :]
    own = same & (c[:, None, :] == c[:, :, None])
    assert text.any() and sink.any()
    for need in (text, sink, own):
        assert (m | ~need[:, None]).all()


def test_mask_is_sparser_than_dense_and_selects_top_k_chunks():
    meta = make_meta(1, 120, n_docs=1, text_p=0.0, pad_max=0, max_chunk=5, seed=10)
    m = _mask(meta, top_k=2, n_sink=0)
    dm = dense_mask(meta, meta)
    assert m.sum() < dm.sum()
    c = meta.chunk_ids[0]
    for h in range(m.shape[1]):
        for i in range(120):
            keys = m[0, h, i].nonzero().flatten()
            routed_chunks = set(c[keys].tolist()) - {int(c[i])}
            assert len(routed_chunks) == min(2, int(c[i]))


def test_top_k_beyond_chunk_count_is_dense():
    meta = make_meta(2, 83, seed=11)
    m = _mask(meta, top_k=1000)
    assert torch.equal(m, dense_mask(meta, meta).expand_as(m))
    q, k, v = qkv(seed=11)
    dense = attend(q, k, v, meta, meta, AttentionSettings(backend="dense"))
    gat = attend(q, k, v, meta, meta, AttentionSettings(backend="gather", top_k=1000, gather_tile=16))
    torch.testing.assert_close(gat, dense, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- MoBA equivalence
def naive_moba(q, k, v, block: int, top_k: int):
    """MoBA (arXiv 2502.13189) written from the paper, token by token.

    Keys are split in blocks of ``block``; gate = q . mean(K_block); the current block is
    always selected and counts inside ``top_k``; future blocks are excluded; attention is
    causal inside the current block.
    """
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros_like(q)
    nb = math.ceil(N / block)
    for b in range(B):
        for h in range(Hq):
            K, V = k[b, h // G], v[b, h // G]
            means = torch.stack([K[j * block:(j + 1) * block].mean(0) for j in range(nb)])
            for i in range(N):
                cur = i // block
                gate = means @ q[b, h, i]
                gate[cur] = float("inf")
                gate[cur + 1:] = float("-inf")
                n_sel = min(top_k, cur + 1)
                chosen = gate.topk(n_sel).indices.tolist()
                keys = [j for blk in chosen for j in range(blk * block, min((blk + 1) * block, N)) if j <= i]
                s = (K[keys] @ q[b, h, i]) / math.sqrt(D)
                out[b, h, i] = torch.softmax(s, 0) @ V[keys]
    return out


def test_reference_equals_naive_moba():
    B, N, block = 1, 40, 5
    q, k, v = qkv(B=B, N=N, seed=12)
    cid = (torch.arange(N) // block).expand(B, N)
    meta = StreamMeta(cid.contiguous(), torch.zeros(B, N, dtype=torch.long), torch.zeros(B, N, dtype=torch.bool),
                      torch.arange(N).expand(B, N).contiguous(), torch.arange(N).expand(B, N).contiguous())
    s = AttentionSettings(backend="reference", top_k=3, n_sink=0, own_chunk_in_k=True)
    with torch.no_grad():
        ours = attend(q, k, v, meta, meta, s)
        want = naive_moba(q, k, v, block, 3)
        gat = attend(q, k, v, meta, meta, AttentionSettings(**{**s.__dict__, "backend": "gather"}))
    torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gat, want, atol=2e-5, rtol=1e-4)


def test_dense_text_queries_read_their_whole_document():
    """With ``dense_text_queries`` a text query's row of the mask is the dense row; other rows
    keep their routing; every MoC backend (here gather and its decode state) equals the
    reference, gradients included; the statistics count the dense rows."""
    meta = make_meta(2, 83, seed=23)
    q, k, v = qkv(seed=23)
    kw = moc_kw(top_k=1)
    on = AttentionSettings(backend="reference", dense_text_queries=True, **kw)
    off = AttentionSettings(backend="reference", **kw)
    m_on, m_off = routed_mask(q, k, meta, meta, on), routed_mask(q, k, meta, meta, off)
    text = (meta.is_text & (meta.doc_ids >= 0))[:, None, :, None]
    dense = dense_mask(meta, meta).expand_as(m_on)
    assert bool((m_on == torch.where(text, dense, m_off)).all())
    assert bool((m_on & text).sum() > (m_off & text).sum())  # top-k 1 leaves text rows sparse without it
    ref = run("reference", q, k, v, meta, dense_text_queries=True, **kw)
    got = run("gather", q, k, v, meta, dense_text_queries=True, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    stats: dict = {}
    attend(q, k, v, meta, meta, AttentionSettings(backend="gather", dense_text_queries=True, **kw), stats=stats)
    assert stats["moc_routed_pairs"] == float((m_on & (meta.doc_ids >= 0)[:, None, :, None]).sum())


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("dense_text", [False, True])
@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_incremental_decoding_matches_full_reference(dense_text, path, monkeypatch):
    """Token-by-token decoding with the decode state equals the reference, on both of its paths:
    the routed mask over a short cache, the gathered routed keys over a long one."""
    from unified_wm.model import attention as attention_mod

    used = []
    for name in ("attend", "attend_masked"):
        orig = getattr(MoCDecodeState, name)
        monkeypatch.setattr(MoCDecodeState, name, lambda self, *a, _o=orig, _n=name, **kw: (used.append(_n), _o(self, *a, **kw))[1])
    if path == "gathered":  # every cache counts as long
        monkeypatch.setattr(attention_mod, "DECODE_MASKED_MAX_KEYS", 0)
    B, N, p = 2, 60, 20
    meta = make_meta(B, N, seed=13)
    q, k, v = qkv(B=B, N=N, seed=13)
    kw = dict(top_k=2, n_sink=2, dense_text_queries=dense_text)
    s = AttentionSettings(backend="gather", **kw)
    state = new_decode_state(s)
    assert isinstance(state, MoCDecodeState)
    assert new_decode_state(AttentionSettings(backend="dense")) is None
    with torch.no_grad():
        full = attend(q, k, v, meta, meta, AttentionSettings(backend="reference", **kw))
        outs = [attend(q[:, :, :p], k[:, :, :p], v[:, :, :p], meta.slice(0, p), meta.slice(0, p), s, state=state)]
        for t in range(p, N):
            outs.append(attend(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], meta.slice(t, t + 1),
                               meta.slice(0, t + 1), s, state=state))
    assert state.n_seen == N
    assert used[1:] == ["attend" if path == "gathered" else "attend_masked"] * (N - p)  # after the prefill
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=2e-5, rtol=1e-4)
    # a shorter cache (new sequence) rebuilds the state instead of mixing sequences
    with torch.no_grad():
        again = attend(q[:, :, :5], k[:, :, :5], v[:, :, :5], meta.slice(0, 5), meta.slice(0, 5), s, state=state)
    assert state.n_seen == 5
    torch.testing.assert_close(again, full[:, :, :5], atol=2e-5, rtol=1e-4)


def test_decode_state_reads_sizes_back_only_now_and_then(monkeypatch):
    """Single-token steps keep the decode state's bookkeeping on the device: the host reads the
    exact table sizes back for the prefill and then once every DECODE_REFRESH_EVERY tokens."""
    from unified_wm.model import attention_decode as attention

    calls = []
    orig = MoCDecodeState._refresh
    monkeypatch.setattr(MoCDecodeState, "_refresh", lambda self: (calls.append(1), orig(self))[1])
    B, N, p = 1, 60, 20
    meta = make_meta(B, N, seed=17, n_docs=2, pad_max=0)
    q, k, v = qkv(B=B, N=N, seed=17)
    s = AttentionSettings(backend="gather", top_k=2, n_sink=2)
    state = new_decode_state(s)
    with torch.no_grad():
        full = attend(q, k, v, meta, meta, AttentionSettings(backend="reference", top_k=2, n_sink=2))
        outs = [attend(q[:, :, :p], k[:, :, :p], v[:, :, :p], meta.slice(0, p), meta.slice(0, p), s, state=state)]
        for t in range(p, N):
            outs.append(attend(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], meta.slice(t, t + 1),
                               meta.slice(0, t + 1), s, state=state))
    assert len(calls) == 1 + (N - p) // attention.DECODE_REFRESH_EVERY
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- stats, regularisers, errors
def test_stats_count_the_mask():
    meta = make_meta(2, 83, seed=14)
    q, k, v = qkv(seed=14)
    stats: dict = {}
    s = AttentionSettings(backend="gather", **moc_kw())
    attend(q, k, v, meta, meta, s, stats=stats)
    m = routed_mask(q, k, meta, meta, s)
    valid = (meta.doc_ids >= 0)[:, None, :, None]
    assert stats["moc_routed_pairs"] == float((m & valid).sum())
    causal = dense_mask(meta, meta) & valid
    assert stats["moc_causal_pairs"] == float(causal.sum()) * q.shape[1]
    assert 0.0 < stats["moc_sparsity"] < 1.0
    assert stats["moc_sel_total"] > 0 and stats["moc_sel_prev"] > 0 and stats["moc_sel_far"] >= 0
    assert stats["moc_sel_prev"] + stats["moc_sel_sink"] + stats["moc_sel_text"] + stats["moc_sel_far"] >= stats["moc_sel_total"]
    assert stats["moc_selection_entropy"] > 0
    attend(q, k, v, meta, meta, s, stats=stats)
    assert stats["moc_calls"] == 2.0 and stats["moc_routed_pairs"] == 2 * float((m & valid).sum())


def test_regularisers_only_in_training_and_backends_agree():
    meta = make_meta(2, 83, seed=15)
    q, k, v = qkv(seed=15)
    kw = dict(backend="reference", top_k=2, n_sink=2, drop_off=0.5, drop_in=0.5)
    plain = routed_mask(q, k, meta, meta, AttentionSettings(backend="reference", top_k=2, n_sink=2))
    assert torch.equal(routed_mask(q, k, meta, meta, AttentionSettings(**kw), training=False), plain)
    torch.manual_seed(0)
    trained = routed_mask(q, k, meta, meta, AttentionSettings(**kw), training=True)
    assert not torch.equal(trained, plain)
    off = dict(kw, drop_in=0.0)
    torch.manual_seed(0)
    dropped = routed_mask(q, k, meta, meta, AttentionSettings(**off), training=True)
    assert (dropped <= plain).all() and dropped.sum() < plain.sum()
    on = dict(kw, drop_off=0.0)
    torch.manual_seed(0)
    added = routed_mask(q, k, meta, meta, AttentionSettings(**on), training=True)
    assert (added >= plain).all() and added.sum() > plain.sum()
    outs = []
    for backend in ("reference", "gather"):
        torch.manual_seed(123)
        outs.append(attend(q, k, v, meta, meta, AttentionSettings(**dict(kw, backend=backend)), training=True))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(backend="sparse"), "backend"),
        (dict(backend="gather", top_k=0), "top_k"),
        (dict(backend="gather", top_k=-2), "top_k"),
        (dict(backend="gather", n_sink=-1), "n_sink"),
        (dict(backend="gather", drop_off=1.0), "drop_off"),
        (dict(backend="gather", drop_in=-0.1), "drop_in"),
        (dict(backend="gather", gather_tile=0), "gather_tile"),
        (dict(backend="gather", dense_text_queries="yes"), "dense_text_queries"),
        (dict(backend="gather", mandatory_actions=1), "mandatory_actions"),
    ],
)
def test_bad_settings_name_the_setting(kw, name):
    s = AttentionSettings(**kw)
    with pytest.raises(ValueError, match=name):
        s.validate()
    meta = make_meta(1, 10, n_docs=1, pad_max=0)
    q, k, v = qkv(B=1, N=10)
    with pytest.raises(ValueError, match=name):
        attend(q, k, v, meta, meta, s)


def test_bad_chunk_layout_is_rejected():
    meta = make_meta(1, 12, n_docs=1, pad_max=0, max_chunk=3)
    broken = StreamMeta(meta.chunk_ids.clone(), meta.doc_ids, meta.is_text, meta.pos_in_doc, meta.positions)
    broken.chunk_ids[0, -1] = 0  # chunk 0 reappears at the end
    q, k, v = qkv(B=1, N=12)
    with pytest.raises(ValueError, match="chunk_ids"):
        attend(q, k, v, broken, broken, AttentionSettings(backend="gather"))


def test_backends_tuple_lists_all_moc_backends():
    assert {"dense", "reference", "gather", "triton", "flex", "flash", "moc"} <= set(BACKENDS)
    # dense backend is untouched: same as SDPA with the dense mask
    meta = make_meta(2, 30, seed=16)
    q, k, v = qkv(N=30, seed=16)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(meta, meta), enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, meta, meta, AttentionSettings()), want)


def test_every_backend_is_one_registered_function_and_new_ones_plug_in():
    """dense is a backend like the others: one registry, one signature; a registered function
    becomes a backend that attend() and the model run (here a copy of the oracle)."""
    from unified_wm.model.attention import ATTENTION_FUNCTIONS, register_attention

    assert set(BACKENDS) - {"moc"} <= set(ATTENTION_FUNCTIONS)
    calls = []

    @register_attention("test_oracle_copy")
    def _copy(q, k, v, q_meta, k_meta, settings, training, stats):
        calls.append(q.shape)
        return ATTENTION_FUNCTIONS["reference"](q, k, v, q_meta, k_meta, settings, training, stats)

    try:
        meta = make_meta(2, 40, seed=21)
        q, k, v = qkv(N=40, seed=21)
        got = attend(q, k, v, meta, meta, AttentionSettings(backend="test_oracle_copy", top_k=2))
        want = attend(q, k, v, meta, meta, AttentionSettings(backend="reference", top_k=2))
        torch.testing.assert_close(got, want)
        assert calls == [q.shape]
        with pytest.raises(ValueError, match="'moc'"):
            register_attention("moc")
    finally:
        ATTENTION_FUNCTIONS.pop("test_oracle_copy", None)
    with pytest.raises(ValueError, match="test_oracle_copy' is unknown"):
        AttentionSettings(backend="test_oracle_copy").validate()


def test_routing_in_query_slices_selects_the_same(monkeypatch):
    """The torch routing path (CUDA's) scores queries in slices to bound its memory; any slice
    size selects the same chunks (a head dim that is not a multiple of 16 keeps off the CPU kernel)."""
    from unified_wm.model import attention_routing as R

    meta = make_meta(2, 83, seed=4)
    q, k, _ = qkv(N=83, D=12, seed=4)
    s = AttentionSettings(**moc_kw(top_k=3))
    whole = R.plan_routing(q, k, meta, meta, s, False, None).sel
    for budget in (1, 4 * 7 * 5):  # one query a slice; a few queries a slice, the last one short
        monkeypatch.setattr(R, "ROUTE_SLICE_SCORES", budget)
        assert torch.equal(R.plan_routing(q, k, meta, meta, s, False, None).sel, whole)
