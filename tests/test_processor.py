"""The processor: one id space, round trips, task templates' layout and loss masks."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unified_wm.sequence import StreamBuilder, TaskWeights
from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, BOS, EOS, FRAME, TEXT_CLOSE, TEXT_OPEN, UnifiedProcessor


def test_id_space_is_contiguous_and_disjoint(processor):
    p = processor
    assert p.text_offset == 16 < p.action_offset < p.video_offset < p.vocab_size
    assert p.vocab_size == p.video_offset + p.video.codebook_size
    assert p.tokens_per_frame == 64


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["a red car", "the camera pans left", "a blue ball enters from the right", "box"]), min_size=1, max_size=3))
def test_text_round_trip(processor, parts):
    text = " ".join(parts)
    ids = processor.encode_text(text)
    assert all(processor.text_offset <= i < processor.action_offset for i in ids)
    assert processor.decode_text(ids) == text


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["stay", "left", "right", "up", "down", "fire", "noop"]), min_size=1, max_size=10))
def test_action_round_trip(processor, names):
    ids = processor.encode_actions(names)
    assert all(processor.action_offset <= i < processor.video_offset for i in ids)
    assert processor.decode_actions(ids) == names


def test_unknown_action_name_is_named(processor):
    with pytest.raises(ValueError, match="unknown action name 'jump'.*valid actions: stay"):
        processor.encode_actions("left,jump")


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path / "p")
    q = UnifiedProcessor.from_pretrained(tmp_path / "p")
    assert q.model_layout() == processor.model_layout()
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(q.encode_frames(frames), processor.encode_frames(frames))
    assert q.encode_text("a red car") == processor.encode_text("a red car")


def test_missing_processor_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UnifiedProcessor.from_pretrained(tmp_path / "nowhere")


def test_frames_round_trip_through_the_stream(processor, world_data):
    from unified_wm.data.episodes import get_episode, load_episodes

    ep = get_episode(load_episodes(world_data), 0)
    fids = processor.encode_frames(ep["frames"][:4])
    doc = StreamBuilder(processor).build("interleaved", fids, [processor.encode_actions([a]) for a in ep["actions"][:3]],
                                         ep["captions"][:1], TaskWeights())
    dec = processor.decode_stream(doc.input_ids)
    assert np.array_equal(dec["frames"], processor.decode_frames(fids))
    assert dec["actions"] == list(ep["actions"][:3])
    assert dec["texts"] == [ep["captions"][0]["text"]]


def _doc(processor, template, T=3):
    rng = np.random.default_rng(0)
    fids = rng.integers(processor.video_offset, processor.vocab_size, (T, processor.tokens_per_frame))
    acts = [processor.encode_actions(["left"]) for _ in range(T - 1)]
    caps = [{"t": 0, "text": "a red car"}, {"t": 1, "text": "the camera pans left"}]
    return StreamBuilder(processor).build(template, fids, acts, caps, TaskWeights()), fids


def test_interleaved_layout_and_loss_mask(processor):
    doc, fids = _doc(processor, "interleaved")
    ids, w = doc.input_ids, doc.loss_weight
    hw = processor.tokens_per_frame
    assert ids[0] == BOS and ids[-1] == EOS and w[0] == 0
    cap = processor.encode_text("a red car")
    assert ids[1:3 + len(cap)] == [TEXT_OPEN, *cap, TEXT_CLOSE]
    f0 = 3 + len(cap)
    assert ids[f0] == FRAME and ids[f0 + 1:f0 + 1 + hw] == list(fids[0])
    assert ids[f0 + 1 + hw:f0 + 4 + hw] == [ACT_OPEN, processor.encode_actions(["left"])[0], ACT_CLOSE]
    assert ids.count(FRAME) == 3 and ids.count(TEXT_OPEN) == 2  # the event caption sits before frame 1
    assert all(x > 0 for x in w[1:])  # every segment is a target in this template


def test_caption_template_puts_loss_on_the_final_text_only(processor):
    doc, _ = _doc(processor, "caption")
    ids, w = np.array(doc.input_ids), np.array(doc.loss_weight)
    t_open = int(np.nonzero(ids == TEXT_OPEN)[0][-1])
    assert ids.tolist().count(TEXT_OPEN) == 1 and t_open > int(np.nonzero(ids == FRAME)[0][-1])
    assert (w[:t_open] == 0).all() and (w[t_open:] > 0).all()


def test_inverse_template_puts_loss_on_actions_only(processor):
    doc, _ = _doc(processor, "inverse", T=4)
    ids, w = np.array(doc.input_ids), np.array(doc.loss_weight)
    is_action = (ids >= processor.action_offset) & (ids < processor.video_offset)
    assert is_action.sum() == 3
    assert (w[is_action] > 0).all()
    video = ids >= processor.video_offset
    assert (w[video] == 0).all()
    # the action between frames t and t+1 comes after both frames
    first_act = int(np.nonzero(ids == ACT_OPEN)[0][0])
    assert (ids[:first_act] == FRAME).sum() == 2


def test_layout_matches_model_chunk_rule(processor):
    import torch

    from tests.conftest import tiny_model_config
    from unified_wm.model.modeling_uwm import stream_layout

    doc, _ = _doc(processor, "interleaved")
    meta, modality = stream_layout(torch.tensor([doc.input_ids]), tiny_model_config(processor))
    ids = np.array(doc.input_ids)
    chunk = meta.chunk_ids[0].numpy()
    for pos in np.nonzero((ids == FRAME) | (ids == ACT_OPEN) | (ids == TEXT_OPEN))[0]:
        assert chunk[pos] == chunk[pos - 1] + 1  # each segment opens a chunk
    assert (modality[0].numpy()[ids >= processor.video_offset] == 3).all()


def test_model_and_processor_vocab_mismatch_is_refused(processor):
    from tests.conftest import tiny_model_config

    cfg = tiny_model_config(processor)
    cfg.vocab_size = processor.vocab_size + 7
    with pytest.raises(ValueError, match=r"disagree on 'vocab_size': model has \d+, processor has \d+"):
        processor.check_model(cfg)


def test_tokenized_documents(tokens_dir, processor):
    from unified_wm.data.tokenize import load_token_documents

    ds = load_token_documents(tokens_dir)
    assert set(ds["template"]) == {"interleaved", "caption", "inverse"}
    row = ds[0]
    assert len(row["input_ids"]) == len(row["loss_mask"])
    assert max(max(r) for r in ds["input_ids"]) < processor.vocab_size
