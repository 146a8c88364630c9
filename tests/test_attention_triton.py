"""The ``triton`` MoC backend against the dense-mask oracle, on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` is set before triton is imported (the kernels module is imported
lazily by the backend, so the flag is read then). Shapes are tiny and the tiles are
16 x 16 so that chunks span several key blocks and query blocks mix documents; every
test compares the output AND the q/k/v gradients with ``reference`` on the randomised
layouts of ``test_attention.py`` (packed documents, uneven chunks, text, padding,
grouped-query heads). A real GPU run is the job of ``uwm bench gpu``.
"""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.test_attention import make_meta, moc_kw, qkv, run  # noqa: E402
from unified_wm.model import attention_routing, attention_triton  # noqa: E402
from unified_wm.model.attention import AttentionSettings, attend, resolve_backend, routed_mask  # noqa: E402

pytest.importorskip("triton", reason="the triton package is part of the dev extra")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(attention_triton, "BLOCK_M", 16)
    monkeypatch.setattr(attention_triton, "BLOCK_N", 16)


def check(ref, got, atol=2e-5, rtol=1e-4):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("top_k,own_in_k", [(1, False), (3, True)])
def test_triton_matches_reference_fp32(top_k, own_in_k):
    meta = make_meta(2, 64)
    q, k, v = qkv(N=64)
    kw = moc_kw(top_k=top_k, own_chunk_in_k=own_in_k)
    check(run("reference", q, k, v, meta, **kw), run("triton", q, k, v, meta, **kw))


@pytest.mark.parametrize("D,max_chunk,Hq,Hkv,N", [(32, 19, 4, 2, 56), (24, 40, 3, 1, 64)])
def test_triton_long_chunks_gqa_and_odd_head_dims(D, max_chunk, Hq, Hkv, N):
    """Chunks longer than a key block, several heads per KV head, a head dim that is not a power of two."""
    meta = make_meta(2, N, max_chunk=max_chunk, seed=D + N)
    q, k, v = qkv(Hq=Hq, Hkv=Hkv, N=N, D=D, seed=D)
    kw = moc_kw(top_k=2)
    check(run("reference", q, k, v, meta, **kw), run("triton", q, k, v, meta, **kw))


def test_triton_matches_reference_bf16():
    meta = make_meta(2, 64, seed=3)
    q, k, v = qkv(N=64, dtype=torch.bfloat16, seed=3)
    kw = moc_kw(top_k=2)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = run("reference", qf, kf, vf, meta, **kw)
    got = run("triton", q, k, v, meta, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")


def test_triton_with_fewer_queries_than_keys():
    """Cached prefill of a second segment: queries are the last Nq tokens of the row."""
    meta = make_meta(2, 60, seed=5)
    q, k, v = qkv(N=60, seed=5)
    qs = q[:, :, -30:].detach().requires_grad_()
    s_ref, s_tri = (AttentionSettings(backend=b, **moc_kw()) for b in ("reference", "triton"))
    ref = attend(qs, k, v, meta.slice(30), meta, s_ref)
    got = attend(qs, k, v, meta.slice(30), meta, s_tri)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    g_ref = torch.autograd.grad((ref * cot).sum(), (qs, k, v))
    g_got = torch.autograd.grad((got * cot).sum(), (qs, k, v))
    for a, b in zip(g_ref, g_got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_triton_training_regularisers_match_reference():
    """drop_off / drop_in widen the selection (W = 2 top_k): same RNG, same mask, same result."""
    meta = make_meta(2, 64, seed=15)
    q, k, v = qkv(N=64, seed=15)
    kw = dict(top_k=2, n_sink=2, drop_off=0.5, drop_in=0.5)
    outs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(123)
        out = attend(q, k, v, meta, meta, AttentionSettings(backend=backend, **kw), training=True)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    check(*outs)


def test_triton_top_k_beyond_chunk_count_is_dense():
    meta = make_meta(1, 40, seed=11)
    q, k, v = qkv(B=1, N=40, seed=11)
    dense = run("dense", q, k, v, meta)
    check(dense, run("triton", q, k, v, meta, top_k=1000))


def test_selection_bitmask_words_and_repeats():
    sel = torch.tensor([[31, 0, -1, 31], [63, 32, 5, -1]])
    words = attention_triton._bitmask(sel, 64)
    assert words.dtype == torch.int32 and words.shape == (2, 2)
    as_bits = lambda w: [(int(w) >> b) & 1 for b in range(32)]  # noqa: E731
    assert [b for b, on in enumerate(as_bits(words[0, 0])) if on] == [0, 31] and int(words[0, 1]) == 0
    assert [b for b, on in enumerate(as_bits(words[1, 0])) if on] == [5]
    assert [b for b, on in enumerate(as_bits(words[1, 1])) if on] == [0, 31]


def test_triton_many_chunks_aligned_to_the_tiles():
    """Over 32 chunks, each exactly one 16-key tile: the kernels take the one-chunk-per-tile path
    and read the selection bitmask's second word; some query selects slot 31 (the sign bit)."""
    from unified_wm.bench.attention import layout
    from unified_wm.model.attention_routing import plan_routing

    meta = layout(16 * 38, 16, 16)
    q, k, v = qkv(B=1, Hq=1, Hkv=1, N=16 * 38, D=16, seed=5)
    kw = moc_kw(top_k=6, n_sink=1)
    r = plan_routing(q, k, meta, meta, AttentionSettings(backend="triton", **kw), False, None)
    assert r.table.C > 32 and bool((r.sel == 31).any())
    check(run("reference", q, k, v, meta, **kw), run("triton", q, k, v, meta, **kw))


def test_block_lists_cover_every_allowed_pair():
    """The per-(query block, head) key-block lists are a superset of the routed mask, and the
    transposed lists hold the same pairs (what makes the kernels exact)."""
    meta = make_meta(2, 83, seed=4, max_chunk=20)
    q, k, _ = qkv(seed=4)
    s = AttentionSettings(backend="reference", **moc_kw(top_k=2))
    mask = routed_mask(q, k, meta, meta, s) & (meta.doc_ids >= 0)[:, None, :, None]
    r = attention_routing.plan_routing(q, k, meta, meta, s, False, None)
    p = attention_triton.plan(q, k, meta, meta, r, 16, 16)
    B, Hq, N, _ = mask.shape
    nb = (N + 15) // 16
    pad = nb * 16 - N
    m = torch.nn.functional.pad(mask, (0, pad, 0, pad)).view(B, Hq, nb, 16, nb, 16).any(5).any(3)
    visit = torch.zeros(B * Hq * nb, nb, dtype=torch.bool)
    for row in range(B * Hq * nb):
        visit[row, p.qlist[row, : p.qcnt[row]].long()] = True
    visit = visit.view(B, Hq, nb, nb)
    assert bool((visit | ~m).all()), "a needed key block is missing from a list"
    assert visit.sum() < visit.numel(), "the lists should skip blocks (sparse)"
    tvisit = torch.zeros(B * Hq * nb, nb, dtype=torch.bool)
    for row in range(B * Hq * nb):
        tvisit[row, p.klist[row, : p.kcnt[row]].long()] = True
    assert torch.equal(tvisit.view(B, Hq, nb, nb).transpose(-1, -2), visit)


# ----------------------------------------------------------------------------- resolution and errors
def test_moc_resolves_to_triton_on_cuda():
    s = AttentionSettings(backend="moc")
    assert resolve_backend(s, "cuda") == "triton"
    assert resolve_backend(s, torch.device("cuda")) == "triton"
    assert resolve_backend(s, "cpu") == "gather"


def test_moc_on_cuda_falls_back_to_flex_without_triton(monkeypatch):
    monkeypatch.setattr(attention_triton, "available", lambda: False)
    assert resolve_backend(AttentionSettings(backend="moc"), "cuda") == "flex"


def _build_model(backend):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM
    from tests.test_model import CFG

    return UnifiedWMForCausalLM(UnifiedWMConfig(**CFG, attention={"backend": backend}))


def test_triton_without_the_package_fails_when_the_model_is_built(monkeypatch):
    monkeypatch.setattr(attention_triton, "available", lambda: False)
    with pytest.raises(ValueError, match=r"'triton'.*attention\.backend.*pip install"):
        _build_model("triton")


def test_triton_on_cpu_without_the_interpreter_fails_when_the_model_is_built(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'triton'.*attention\.backend.*TRITON_INTERPRET=1"):
        _build_model("triton")
    _build_model("moc")  # the per-device alias is fine anywhere


def test_triton_model_trains_under_the_interpreter():
    """The model's forward + backward through the triton backend equals the reference one."""
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM
    from tests.test_model import CFG, DOC

    ids = torch.tensor([DOC + DOC[:13], DOC[:5] + DOC + [0] * 8])  # packed documents, padding
    grads = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        m = UnifiedWMForCausalLM(UnifiedWMConfig(**CFG, attention={"backend": backend, "top_k": 1}))
        m.train()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- the prepared GPU check
def test_bench_gpu_without_cuda_says_it_needs_a_gpu(monkeypatch, capsys, tmp_path):
    from unified_wm import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "gpu", "--out", str(tmp_path / "x.json")]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_gpu_arguments_and_shapes():
    from unified_wm.bench import gpu as bench_gpu
    from unified_wm.bench.attention import allowed_pairs, choose_k

    a = bench_gpu.parse_args(["--lengths", "32768,65536,131072", "--skip", "train"])
    assert a.lengths == [32768, 65536, 131072] and a.skip == {"train"}
    for n in a.lengths:  # the default chunk / text give ~85 % sparsity at every length
        k = choose_k(n, a.chunk, a.text, a.sparsity)
        assert abs(1 - allowed_pairs(n, a.chunk, a.text, k) / (n * (n + 1) / 2) - 0.85) < 0.05
    with pytest.raises(ValueError, match="--skip"):
        bench_gpu.parse_args(["--skip", "everything"])
    with pytest.raises(ValueError, match="--kv-heads"):
        bench_gpu.parse_args(["--heads", "6", "--kv-heads", "4"])
    meta = bench_gpu._packed_meta(300, 64, 10, "cpu")
    assert meta.doc_ids[0, 179].item() == 0 and meta.doc_ids[0, 180].item() == 1
    assert meta.is_text[0, :10].all() and meta.is_text[0, 180:190].all() and not meta.is_text[0, 10:180].any()
    assert bool((meta.chunk_ids[0, 1:] >= meta.chunk_ids[0, :-1]).all())


def test_bench_gpu_dry_run_on_cpu_writes_every_row(tmp_path, monkeypatch, capsys):
    """The GPU check's own code (correctness against the oracle, the speed rows with sparsity and
    visited blocks) at small sizes under the interpreter, so the script cannot rot between GPU runs."""
    from unified_wm import cli

    out = tmp_path / "gpu.json"
    rc = cli.main(["bench", "gpu", "--device", "cpu", "--lengths", "192", "--check-len", "256", "--chunk", "32",
                   "--text", "8", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--repeats", "1",
                   "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, res
    assert [c["dtype"] for c in res["correctness"]] == ["bfloat16 (oracle fp32)", "float32 (oracle fp32)"]
    bf16, fp32 = res["correctness"]
    assert all(bf16[f"rel_err_{nm}"] < 2e-2 and bf16[f"finite_{nm}"] for nm in ("out", "dq", "dk", "dv"))
    assert all(fp32[f"rel_err_{nm}"] < 1e-5 for nm in ("out", "dq", "dk", "dv"))
    (row,) = res["speed"]
    for m in ("triton_random", "triton_coherent", "dense_sdpa"):
        assert row[f"{m}_ms"] > 0, row
    for m in ("triton_random", "triton_coherent"):
        assert 0 < row[f"{m}_sparsity"] < 1 and 0 < row[f"{m}_block_share"] <= 1
    # queries shared within a block route alike, so the kernel visits no more blocks than for random ones
    assert row["triton_coherent_block_share"] <= row["triton_random_block_share"]
    assert "train" not in res
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cli.main(["bench", "gpu", "--device", "cpu", "--out", str(tmp_path / "y.json")]) != 0
    assert "set TRITON_INTERPRET=1" in capsys.readouterr().err


def test_bench_attention_runs_and_writes_its_rows(tmp_path):
    """`uwm bench attention` end to end on a small row: both methods timed, the kernel's pieces,
    the sparsity it asked for, and a refused argument that names itself."""
    from unified_wm import cli

    out = tmp_path / "attn.json"
    assert cli.main(["bench", "attention", "--lengths", "640", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                     "--chunk", "32", "--text", "8", "--threads", "1", "--repeats", "2", "--breakdown",
                     "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["N"] == 640 and abs(row["sparsity"] - 0.85) < 0.1
    for method in ("dense", "gather"):
        assert row[method]["total_s"] > 0 and row[method]["first_call_s"] > 0
    assert row["gather"]["path"] in ("compiled kernel", "torch tiles")
    if row["gather"]["path"] == "compiled kernel":
        assert set(row["gather"]["breakdown_s"]) == {"routing_and_stats", "work_lists", "forward", "backward"}
    with pytest.raises(SystemExit):
        cli.main(["bench", "attention", "--repeats", "-1"])
