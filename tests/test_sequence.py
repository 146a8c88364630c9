"""Task templates: the layout and the loss mask of every template, and the errors of bad input."""
from __future__ import annotations

import numpy as np
import pytest

from unified_wm.sequence import DEFAULT_TEMPLATES, MIN_FRAMES, TEMPLATES, StreamBuilder, TaskWeights
from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, BOS, EOS, FRAME, TEXT_CLOSE, TEXT_OPEN

CAPS = [{"t": 0, "text": "a red car"}, {"t": 1, "text": "the camera pans left"}]
ACTS = ["left", "right", "up", "down", "stay"]


def _inputs(processor, T):
    rng = np.random.default_rng(T)
    fids = rng.integers(processor.video_offset, processor.vocab_size, (T, processor.tokens_per_frame))
    acts = [processor.encode_actions([ACTS[t % len(ACTS)]]) for t in range(T - 1)]
    return fids, acts


def _build(processor, template, T=4, captions=CAPS, weights=None, **kw):
    fids, acts = _inputs(processor, T)
    doc = StreamBuilder(processor).build(template, fids, acts, captions, weights or TaskWeights(), **kw)
    return np.array(doc.input_ids), np.array(doc.loss_weight), fids, acts


def _kinds(processor, ids):
    text = (ids >= processor.text_offset) & (ids < processor.action_offset)
    action = (ids >= processor.action_offset) & (ids < processor.video_offset)
    video = ids >= processor.video_offset
    return text, action, video


def _segments(ids) -> list[str]:
    """The order of segments: 't' text, 'a' action, 'f' frame."""
    return [{TEXT_OPEN: "t", ACT_OPEN: "a", FRAME: "f"}[int(x)] for x in ids if int(x) in (TEXT_OPEN, ACT_OPEN, FRAME)]


def _expected(processor, fids, acts, order) -> list[int]:
    """Ids of a document from an order of ('t', text) / ('f', t) / ('a', t) items."""
    out = [BOS]
    for kind, x in order:
        if kind == "t":
            out += [TEXT_OPEN, *processor.encode_text(x), TEXT_CLOSE]
        elif kind == "f":
            out += [FRAME, *[int(v) for v in fids[x]]]
        else:
            out += [ACT_OPEN, *acts[x], ACT_CLOSE]
    return out + [EOS]


def test_template_names():
    assert TEMPLATES[:3] == DEFAULT_TEMPLATES == ("interleaved", "caption", "inverse")
    assert set(TEMPLATES) == {"interleaved", "caption", "inverse", "dynamics", "t2v", "policy"}
    assert set(MIN_FRAMES) == set(TEMPLATES)


def test_interleaved_all_tokens_are_targets(processor):
    ids, w, fids, acts = _build(processor, "interleaved", T=3)
    want = _expected(processor, fids, acts, [("t", "a red car"), ("f", 0), ("a", 0), ("t", "the camera pans left"), ("f", 1), ("a", 1), ("f", 2)])
    assert ids.tolist() == want
    assert w[0] == 0 and (w[1:] > 0).all()


def test_dynamics_layout_and_loss_on_frames_after_the_first(processor):
    ids, w, fids, acts = _build(processor, "dynamics", T=4)
    # only the episode caption: the event caption at t=1 would tell the model what frame 1 shows
    want = _expected(processor, fids, acts, [("t", "a red car"), ("f", 0), ("a", 0), ("f", 1), ("a", 1), ("f", 2), ("a", 2), ("f", 3)])
    assert ids.tolist() == want
    text, action, video = _kinds(processor, ids)
    hw = processor.tokens_per_frame
    frame_pos = np.nonzero(ids == FRAME)[0]
    first_frame = np.zeros(len(ids), bool)
    first_frame[frame_pos[0]:frame_pos[0] + 1 + hw] = True
    assert (w[first_frame] == 0).all()  # frame 0 is context
    assert (w[video & ~first_frame] > 0).all() and (w[frame_pos[1:]] > 0).all()
    assert (w[text] == 0).all() and (w[action] == 0).all()
    assert (w[(ids == TEXT_OPEN) | (ids == TEXT_CLOSE) | (ids == ACT_OPEN) | (ids == ACT_CLOSE)] == 0).all()
    assert w[0] == 0 and w[-1] > 0
    assert int((w > 0).sum()) == 3 * (hw + 1) + 1  # three predicted frames and <eos>


def test_t2v_layout_and_loss_on_every_frame(processor):
    ids, w, fids, acts = _build(processor, "t2v", T=3)
    want = _expected(processor, fids, acts, [("t", "a red car"), ("f", 0), ("t", "the camera pans left"), ("f", 1), ("f", 2)])
    assert ids.tolist() == want
    text, action, video = _kinds(processor, ids)
    assert not action.any() and ACT_OPEN not in ids.tolist()
    assert (w[video] > 0).all() and (w[ids == FRAME] > 0).all()
    assert (w[text] == 0).all() and (w[(ids == TEXT_OPEN) | (ids == TEXT_CLOSE)] == 0).all()


def test_caption_layout_and_loss_on_the_text(processor):
    ids, w, fids, acts = _build(processor, "caption", T=3)
    want = _expected(processor, fids, acts, [("f", 0), ("a", 0), ("f", 1), ("a", 1), ("f", 2), ("t", "a red car")])
    assert ids.tolist() == want
    t_open = int(np.nonzero(ids == TEXT_OPEN)[0][0])
    assert (w[:t_open] == 0).all() and (w[t_open:] > 0).all()


def test_inverse_layout_and_loss_on_actions(processor):
    ids, w, fids, acts = _build(processor, "inverse", T=4)
    want = _expected(processor, fids, acts, [("f", 0), ("f", 1), ("a", 0), ("f", 2), ("a", 1), ("f", 3), ("a", 2)])
    assert ids.tolist() == want
    text, action, video = _kinds(processor, ids)
    assert (w[action] > 0).all() and (w[video] == 0).all() and (w[ids == FRAME] == 0).all()
    assert int((w > 0).sum()) == 3 * 3 + 1  # three <act> a </act> and <eos>


def test_policy_layout_and_loss_on_actions(processor):
    ids, w, fids, acts = _build(processor, "policy", T=4)
    # history then the next action; the last frame has no action after it and is left out
    want = _expected(processor, fids, acts, [("t", "a red car"), ("f", 0), ("a", 0), ("t", "the camera pans left"),
                                               ("f", 1), ("a", 1), ("f", 2), ("a", 2)])
    assert ids.tolist() == want
    assert _segments(ids)[-1] == "a" and ids[-2] == ACT_CLOSE
    text, action, video = _kinds(processor, ids)
    assert (w[action] > 0).all() and (w[(ids == ACT_OPEN) | (ids == ACT_CLOSE)] > 0).all()
    assert (w[video] == 0).all() and (w[text] == 0).all() and (w[ids == FRAME] == 0).all()
    assert int((w > 0).sum()) == 3 * 3 + 1


def test_modality_weights_reach_the_tokens(processor):
    w = TaskWeights(special=0.2, text=0.5, action=0.7, video=0.9)
    ids, lw, *_ = _build(processor, "dynamics", weights=w)
    text, action, video = _kinds(processor, ids)
    assert set(np.unique(lw[video])) == {0.0, 0.9} and set(np.unique(lw[ids == FRAME])) == {0.0, 0.2}
    ids, lw, *_ = _build(processor, "policy", weights=w)
    assert (lw[_kinds(processor, ids)[1]] == 0.7).all()
    # a modality weight of 0 switches the template's target off
    ids, lw, *_ = _build(processor, "t2v", weights=TaskWeights(video=0.0))
    assert (lw[:-1] == 0).all()


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_decodes_and_opens_chunks(processor, template):
    import torch

    from tests.conftest import tiny_model_config
    from unified_wm.model.modeling_uwm import stream_layout

    ids, w, fids, acts = _build(processor, template, T=3)
    assert len(ids) == len(w) and ids[0] == BOS and ids[-1] == EOS
    dec = processor.decode_stream(ids.tolist())
    n_frames = {"policy": 2}.get(template, 3)
    assert np.array_equal(dec["frames"], processor.decode_frames(fids[:n_frames]))
    want_actions = {"t2v": []}.get(template, [ACTS[0], ACTS[1]])
    assert dec["actions"] == want_actions
    meta, _ = stream_layout(torch.tensor([ids.tolist()]), tiny_model_config(processor))
    chunk = meta.chunk_ids[0].numpy()
    for pos in np.nonzero((ids == FRAME) | (ids == ACT_OPEN) | (ids == TEXT_OPEN))[0]:
        assert chunk[pos] == chunk[pos - 1] + 1


@pytest.mark.parametrize("template", [t for t in TEMPLATES if MIN_FRAMES[t] >= 2])
def test_episode_too_short_for_its_template(processor, template):
    with pytest.raises(ValueError, match=rf"episode 'ep-7' has 1 frame\(s\); task template '{template}' needs at least 2"):
        _build(processor, template, T=1, episode_id="ep-7")


@pytest.mark.parametrize("template", ["interleaved", "caption", "t2v"])
def test_one_frame_is_enough_for_some_templates(processor, template):
    ids, w, *_ = _build(processor, template, T=1)
    assert (ids == FRAME).sum() == 1


@pytest.mark.parametrize("template", ["caption", "t2v"])
def test_templates_that_need_a_caption(processor, template):
    with pytest.raises(ValueError, match=rf"episode 'ep-3' has no caption at t=0; task template '{template}' needs one"):
        _build(processor, template, captions=[{"t": 2, "text": "later"}], episode_id="ep-3")
    # the others do without
    ids, _, *_ = _build(processor, "dynamics", captions=[])
    assert TEXT_OPEN not in ids.tolist()


def test_unknown_template_and_mismatched_actions(processor):
    with pytest.raises(ValueError, match="unknown task template 'video2text'; valid templates: interleaved, caption, inverse, dynamics, t2v, policy"):
        _build(processor, "video2text")
    fids, acts = _inputs(processor, 4)
    with pytest.raises(ValueError, match="episode 'e1': 4 frames need 3 actions, got 2"):
        StreamBuilder(processor).build("policy", fids, acts[:2], CAPS, TaskWeights(), episode_id="e1")


def test_new_templates_through_tokenize_and_a_recipe(processor, world_data):
    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.data.tokenize import episode_documents
    from unified_wm.recipe import Recipe
    from unified_wm.utils import from_dict

    ep = get_episode(load_episodes(world_data), 0)
    docs = list(episode_documents(processor, ep, ["dynamics", "t2v", "policy"], clip_frames=4))
    assert {d["template"] for d in docs} == {"dynamics", "t2v", "policy"}
    for d in docs:
        assert len(d["input_ids"]) == len(d["loss_mask"]) and any(d["loss_mask"])
    r = from_dict(Recipe, {"output_dir": "x", "tasks": {"dynamics": {"weight": 0.5}, "t2v": {"weight": 0.2}, "policy": {"weight": 0.3}}})
    assert set(r.tasks) == {"dynamics", "t2v", "policy"}
