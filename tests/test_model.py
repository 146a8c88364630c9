"""The model: stream layout, save/load, KV cache, grammar-constrained generation, packing."""
from __future__ import annotations

import pytest
import torch

import unified_wm  # noqa: F401  (registers the Auto classes)
from unified_wm.model.grammar import StreamGrammar
from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM, stream_layout, stream_layout_continue

# ids: 0 pad 1 bos 2 eos 3 <text> 4 </text> 5 <act> 6 </act> 7 <frame>; text 16-39, actions 40-44, video 45-99
CFG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, text_range=(16, 40), action_range=(40, 45), video_range=(45, 100),
           tokens_per_frame=4, max_chunk_len=2, max_position_embeddings=256)
DOC = [1, 3, 20, 21, 4, 7, 50, 51, 52, 53, 5, 41, 6, 7, 60, 61, 62, 63, 2]


def model(**kw):
    torch.manual_seed(0)
    return UnifiedWMForCausalLM(UnifiedWMConfig(**{**CFG, **kw})).eval()


def test_stream_layout_chunks_docs_text_and_modality():
    cfg = UnifiedWMConfig(**CFG)
    ids = torch.tensor([DOC + [1, 3, 22, 4, 0, 0]])
    meta, mod = stream_layout(ids, cfg)
    # bos | <text>..</text> | <frame> v v | v v (tile: max_chunk_len=2) | <act> a </act> | <frame> v v | v v eos
    assert meta.chunk_ids[0, :19].tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6]
    assert meta.doc_ids[0].tolist() == [0] * 19 + [1, 1, 1, 1, -1, -1]
    assert meta.chunk_ids[0, 19:].tolist() == [7, 8, 8, 8, -1, -1]  # a new document starts new chunks
    assert meta.is_text[0, :6].tolist() == [False, True, True, True, True, False]
    assert meta.pos_in_doc[0, 19:23].tolist() == [0, 1, 2, 3]
    assert mod[0, :13].tolist() == [0, 0, 1, 1, 0, 0, 3, 3, 3, 3, 0, 2, 0]


def test_mandatory_actions_mark_action_segments_as_mandatory():
    """``attention.mandatory_actions``: the action segment (``<act> a </act>``) joins the text
    as mandatory keys (``is_text``); chunks and everything else stay as they were."""
    ids = torch.tensor([DOC])
    off, _ = stream_layout(ids, UnifiedWMConfig(**CFG))
    on, _ = stream_layout(ids, UnifiedWMConfig(**CFG, attention={"backend": "moc", "mandatory_actions": True}))
    act = torch.tensor([[i in (10, 11, 12) for i in range(len(DOC))]])  # <act> 41 </act>
    assert not bool((off.is_text & act).any())
    assert torch.equal(on.is_text, off.is_text | act)
    assert torch.equal(on.chunk_ids, off.chunk_ids) and torch.equal(on.doc_ids, off.doc_ids)


def test_stream_layout_continued_piece_by_piece_equals_the_whole():
    """Decoding lays out only the new tokens (`stream_layout_continue` with the prefix's
    state); cut anywhere, the pieces must equal the layout of the whole row: random rows
    with pads, several documents, open text segments, frames split into tiles."""
    cfg = UnifiedWMConfig(**CFG, prev_frame_input="cross")
    g = torch.Generator().manual_seed(0)
    vocab = [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 41, 50, 51, 52, 60]
    for trial in range(40):
        B, N = 2, int(torch.randint(1, 60, (1,), generator=g))
        ids = torch.tensor(vocab)[torch.randint(0, len(vocab), (B, N), generator=g)]
        if trial % 2:
            ids[0, : min(N, len(DOC))] = torch.tensor(DOC[: min(N, len(DOC))])
        whole, whole_mod = stream_layout(ids, cfg)
        cuts = sorted(set(torch.randint(0, N + 1, (3,), generator=g).tolist()) | {0, N})
        state, metas, mods, coords = None, [], [], []
        for a, b in zip(cuts[:-1], cuts[1:]):
            m, mod, state, c = stream_layout_continue(ids[:, a:b], cfg, state)
            metas.append(m)
            mods.append(mod)
            coords.append(c)
        for name in ("chunk_ids", "doc_ids", "is_text", "pos_in_doc", "positions"):
            got = torch.cat([getattr(m, name) for m in metas], 1)
            assert torch.equal(got, getattr(whole, name)), (trial, name, ids.tolist(), cuts)
        assert torch.equal(torch.cat(mods, 1), whole_mod)
        for j, whole_c in enumerate(stream_layout_continue(ids, cfg, None)[3]):  # q, k, prev
            assert torch.equal(torch.cat([c[j] for c in coords], 1), whole_c), (trial, j, ids.tolist(), cuts)


def test_rotary_coordinates_put_the_same_cell_one_frame_back_at_one_offset():
    """rope_mode 3d: keys at (pos, frame, row, col) of their own cell, queries at the cell they
    predict; the offset from a query to the same cell of the previous frame is (*, 1, 0, 0)
    whether or not a caption lies between the frames (tokens_per_frame 4: a 2x2 grid)."""
    cfg = UnifiedWMConfig(**CFG, rope_mode="3d")
    assert cfg.video_grid == [2, 2]
    _, _, _, (qt, kt, _) = stream_layout_continue(torch.tensor([DOC]), cfg, None)
    q, k = qt[0].tolist(), kt[0].tolist()
    # DOC: bos <text> a b </text> <frame> v v v v <act> a </act> <frame> v v v v eos
    assert [c[1] for c in k] == [0] * 5 + [1] * 8 + [2] * 6  # frames begun so far
    assert [c[2:] for c in k[5:10]] == [[0, 0], [0, 0], [0, 1], [1, 0], [1, 1]]  # <frame>, then the 2x2 codes
    assert [c[2:] for c in q[5:10]] == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 1]]  # the cell each predicts
    assert all(a[0] == b[0] for a, b in zip(q, k))  # the document position is the token's own
    with_caption = DOC[:13] + [3, 22, 23, 24, 4] + DOC[13:]
    _, _, _, (q2, k2, _) = stream_layout_continue(torch.tensor([with_caption]), cfg, None)
    for j in range(4):  # the query predicting code j of frame 1 against the key of code j of frame 0
        for qq, kk, first in ((qt, kt, 13), (q2, k2, 18)):
            d = (qq[0, first + j] - kk[0, 6 + j]).tolist()
            assert d[1:] == [1, 0, 0], (j, d)


def test_prev_frame_input_points_at_the_previous_frame_around_the_predicted_cell():
    """prev_frame_input: a position that predicts a code reads the previous frame's codes at
    that cell ("cell") and beside it ("cross"), by index into the ids; the first frame of a
    document, cells off the grid and positions that predict no code read nothing (-1)."""
    with_caption = DOC[:13] + [3, 22, 23, 24, 4] + DOC[13:]  # frame 1 starts at 18, its codes at 19-22
    ids = torch.tensor([with_caption + DOC])  # a second document: its first frame has no previous one
    _, _, _, (_, _, cell) = stream_layout_continue(ids, UnifiedWMConfig(**CFG, prev_frame_input="cell"), None)
    _, _, _, (_, _, cross) = stream_layout_continue(ids, UnifiedWMConfig(**CFG, prev_frame_input="cross"), None)
    assert cell.shape[-1] == 1 and cross.shape[-1] == 5
    assert (cross < torch.arange(ids.shape[1])[None, :, None]).all()  # only ids already fed: causal
    # frame 0's codes sit at 6-9; frame 1's <frame> (18) predicts cell (0,0), code j (19+j) predicts j+1
    assert cell[0, 18:22, 0].tolist() == [6, 7, 8, 9]
    assert (cell[0, :18] == -1).all() and cell[0, 22:, 0].tolist()[:1] == [-1]  # the last code predicts no code
    # cross at cell (0,0) of the 2x2 grid: itself, left (off), right, up (off), down
    assert cross[0, 18].tolist() == [6, -1, 7, -1, 8]
    assert cross[0, 21].tolist() == [9, 8, -1, 7, -1]  # predicts (1,1)
    second = len(with_caption)  # the next document: its frames 0 and 1
    assert (cell[0, second:second + 13] == -1).all()
    assert cell[0, second + 13:second + 17, 0].tolist() == [second + 6 + j for j in range(4)]
    with pytest.raises(ValueError, match="prev_frame_input"):
        UnifiedWMConfig(**CFG, prev_frame_input="diagonal")


def test_3d_rotary_needs_room_and_a_matching_grid():
    with pytest.raises(ValueError, match="rope_mode"):
        UnifiedWMConfig(**CFG, rope_mode="2d")
    with pytest.raises(ValueError, match="video_grid"):
        UnifiedWMConfig(**CFG, rope_mode="3d", video_grid=[3, 2])


@pytest.mark.parametrize("prev", ["none", "cross"])
def test_save_load_round_trip_with_auto_classes(tmp_path, prev):
    from transformers import AutoConfig, AutoModelForCausalLM

    m = model(prev_frame_input=prev)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "unified_wm"
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([DOC])
    assert torch.allclose(m(ids).logits, m2(ids).logits, atol=1e-6)
    assert m2.lm_head.weight.data_ptr() == m2.embed_tokens.weight.data_ptr()  # tied


@pytest.mark.parametrize("cache_kind,rope_mode,bias,prev", [("uwm", "1d", False, "none"), ("hf_dynamic", "1d", False, "none"),
                                                            ("uwm", "3d", True, "none"), ("uwm", "3d", True, "cross")])
def test_incremental_decoding_matches_full_forward(cache_kind, rope_mode, bias, prev):
    from transformers import DynamicCache

    from unified_wm.model.cache import UWMCache

    m = model(rope_mode=rope_mode, attention_bias=bias, prev_frame_input=prev)
    if prev != "none":  # trained weights are not near zero: make the previous frame's input count
        torch.nn.init.normal_(m.prev_frame_proj.weight, std=1.0)
    assert (m.layers[0].self_attn.q_proj.bias is not None) == bias
    ids = torch.tensor([DOC])
    full = m(ids).logits
    cache = UWMCache(m.config) if cache_kind == "uwm" else DynamicCache(config=m.config)
    steps = [m(ids[:, :5], cache=cache, use_cache=True).logits]
    for i in range(5, ids.shape[1]):
        steps.append(m(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_greedy_generate_same_with_and_without_cache():
    m = model()
    prompt = torch.tensor([DOC[:6]])
    a = m.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
    b = m.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def _well_formed(ids, cfg):
    """Check the grammar on a generated stream; return the number of complete frames."""
    i, frames = 0, 0
    lo, hi = cfg.video_range
    while i < len(ids):
        t = ids[i]
        if t == cfg.frame_id:
            codes = ids[i + 1:i + 1 + cfg.tokens_per_frame]
            assert all(lo <= c < hi for c in codes), f"non-video token inside a frame: {codes}"
            frames += len(codes) == cfg.tokens_per_frame
            i += 1 + cfg.tokens_per_frame
        elif t == cfg.act_open_id:
            seg = ids[i + 1:i + 3]
            if len(seg) == 2:
                assert cfg.action_range[0] <= seg[0] < cfg.action_range[1] and seg[1] == cfg.act_close_id
            i += 3
        else:
            i += 1
    return frames


def test_sampled_generation_obeys_stream_grammar():
    m = model()
    torch.manual_seed(1)
    out = m.generate(torch.tensor([DOC[:6]]), max_new_tokens=80, do_sample=True, temperature=2.0, top_k=0)
    assert _well_formed(out[0].tolist(), m.config) >= 1
    for seed in range(2, 6):
        torch.manual_seed(seed)
        out = m.generate(torch.tensor([DOC[:6]]), max_new_tokens=60, do_sample=True, temperature=3.0)
        _well_formed(out[0].tolist(), m.config)


def test_grammar_states():
    g = StreamGrammar(UnifiedWMConfig(**CFG))
    assert g.state_of([1, 7, 50]) == "video"
    assert g.state_of([1, 7, 50, 51, 52, 53]) == "between"
    assert g.state_of([1, 5]) == "action"
    assert g.state_of([1, 5, 41]) == "act_close"
    assert g.state_of([1, 3, 20]) == "text"
    scores = torch.zeros(1, 100)
    out = g(torch.tensor([[1, 7, 50]]), scores)
    assert torch.isfinite(out[0, 45:100]).all() and torch.isinf(out[0, :45]).all()


def test_packed_documents_do_not_see_each_other():
    m = model()
    other = [1, 3, 30, 31, 32, 4, 7, 90, 91, 92, 93, 2]
    alone = m(torch.tensor([DOC])).logits
    packed = m(torch.tensor([other + DOC])).logits[:, len(other):]
    assert torch.allclose(alone, packed, atol=1e-5)


def test_per_modality_losses_and_loss_weights():
    m = model()
    ids = torch.tensor([DOC])
    out = m(ids, labels=ids)
    assert set(out.modality_losses) == {"special", "text", "action", "video"}
    w = torch.zeros_like(ids, dtype=torch.float)
    w[0, 6:10] = 1.0  # the first frame's codes only
    out_w = m(ids, labels=ids, loss_weights=w)
    meta, mod = stream_layout(ids, m.config)
    ce = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="none")
    assert torch.allclose(out_w.loss, ce[5:9].mean(), atol=1e-5)


def test_growing_cache_buffers_are_reused():
    from unified_wm.model.cache import UWMCache

    m = model()
    cache = UWMCache(m.config)
    m(torch.tensor([DOC[:5]]), cache=cache, use_cache=True)
    layer = cache.layers[0]
    buf = layer._kbuf.data_ptr()
    for t in DOC[5:]:
        m(torch.tensor([[t]]), cache=cache, use_cache=True)
    assert layer._kbuf.data_ptr() == buf  # appended in place, no copy per token
    assert cache.get_seq_length() == len(DOC) and layer.keys.shape[-2] == len(DOC)


def test_bad_head_config_is_refused():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        UnifiedWMConfig(**{**CFG, "num_attention_heads": 4, "num_key_value_heads": 3})


@pytest.mark.parametrize("rope_mode,mandatory_actions", [("1d", False), ("3d", False), ("3d", True)])
def test_moc_model_decodes_like_full_forward_and_trains(rope_mode, mandatory_actions, monkeypatch):
    """The model with Mixture-of-Contexts attention: cached sparse decoding == teacher forcing,
    with the routed mask of a short cache and with the gathered keys of a long one (the layers
    of a step share one chunk layout)."""
    from unified_wm.model import attention as attention_mod
    from unified_wm.model.cache import UWMCache
    from unified_wm.model.attention_routing import summarize_routing

    doc = [1, 3, 20, 21, 4] + sum(([7, 50, 51, 52, 53, 5, 41, 6] for _ in range(6)), []) + [2]
    m = model(attention={"backend": "moc", "top_k": 2, "mandatory_actions": mandatory_actions}, max_chunk_len=4,
              rope_mode=rope_mode)
    ids = torch.tensor([doc])
    out = m(ids, return_routing_stats=True)
    for max_keys in (attention_mod.DECODE_MASKED_MAX_KEYS, 0):
        monkeypatch.setattr(attention_mod, "DECODE_MASKED_MAX_KEYS", max_keys)
        cache = UWMCache(m.config)
        steps = [m(ids[:, :6], cache=cache, use_cache=True).logits]
        for i in range(6, ids.shape[1]):
            steps.append(m(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
        assert torch.allclose(torch.cat(steps, 1), out.logits, atol=1e-4), f"decoding with at most {max_keys} keys masked"
    summary = summarize_routing(out.routing_stats)
    assert 0.0 < summary["moc_sparsity"] < 1.0 and "moc_entropy_layer1" in summary
    dense = model(attention={"backend": "dense"}, rope_mode=rope_mode)(ids).logits
    assert not torch.allclose(dense, out.logits, atol=1e-4)  # routing really drops context
    m.train()
    loss = m(ids, labels=ids).loss
    loss.backward()
    assert m.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["dense", "moc"])
def test_activation_checkpointing_gives_the_same_gradients(backend):
    """gradient_checkpointing_enable() recomputes each Block in the backward: same loss, same
    gradients, routing statistics counted once (not again in the recompute)."""
    from unified_wm.train import enable_checkpointing

    doc = [1, 3, 20, 21, 4] + sum(([7, 50, 51, 52, 53, 5, 41, 6] for _ in range(4)), []) + [2]
    ids = torch.tensor([doc, doc[:20] + [0] * (len(doc) - 20)])
    runs = []
    for ckpt in (False, True):
        m = model(attention={"backend": backend, "top_k": 2, "drop_off": 0.3}, max_chunk_len=4)
        assert m.supports_gradient_checkpointing and not m.gradient_checkpointing
        if ckpt:
            enable_checkpointing(m)
            assert m.gradient_checkpointing
        calls = []
        m.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
        m.train()
        torch.manual_seed(1)  # the drop_off regulariser draws the same routing (the recompute replays the RNG)
        out = m(ids, labels=ids, return_routing_stats=True)
        out.loss.backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing really recomputed the Block
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, out.routing_stats))
    (l0, g0, s0), (l1, g1, s1) = runs
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-7, rtol=1e-6, msg=lambda msg: f"{n}: {msg}")
    if backend == "moc":
        assert s1["layer0"]["moc_calls"] == s0["layer0"]["moc_calls"] == 1.0


def test_the_model_and_the_stream_name_the_modalities_alike():
    """The model's files must load without the package (the exported folder), so the model keeps
    its own tuple of modality names; it must be the stream's, in the same order."""
    from unified_wm.model.modeling_uwm import MODALITIES
    from unified_wm.sequence import MODALITY_KEYS

    assert MODALITIES == MODALITY_KEYS


def test_an_older_transformers_is_named_at_import():
    """transformers < 5.24 calls the outputs' cache past_key_values: the import says which version is needed."""
    import subprocess
    import sys

    code = ("import transformers.modeling_outputs as m; del m.CausalLMOutputWithPast.__dataclass_fields__['cache']; "
            "import unified_wm.model.modeling_uwm")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "needs transformers>=5.24" in r.stderr and "pip install -U 'transformers>=5.24,<6'" in r.stderr
