"""Documents longer than train.seq_len are refused at start-up (naming template, length and
seq_len), split at segment boundaries, or truncated, as data.long_documents says; a task whose
loss tokens would all be cut is always an error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_tiny_recipe
from unified_wm.data.long_documents import document_lengths, split_document
from unified_wm.tokenization.processor import ACT_OPEN, BOS, FRAME, TEXT_OPEN
from unified_wm.data.packing import PackedBatches
from unified_wm.recipe import load_recipe
from unified_wm.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docs(tokens_dir):
    from unified_wm.data.tokenize import load_token_documents

    return load_token_documents(tokens_dir)


def _recipe(tmp_path, tokens_dir, processor_dir, seq_len, mode=None):
    over = {"data": {"long_documents": mode}} if mode else None
    return load_recipe(write_tiny_recipe(tmp_path, tokens_dir, processor_dir, seq_len=seq_len), over)


def test_a_document_longer_than_seq_len_is_refused_naming_template_length_and_seq_len(docs, tmp_path, tokens_dir, processor_dir):
    lengths, tpl = document_lengths(docs), np.array(docs["template"])
    longest = int(lengths[tpl == "interleaved"].max())
    L = longest - 10
    recipe = _recipe(tmp_path, tokens_dir, processor_dir, L)
    assert recipe.data.long_documents == "refuse"  # the default
    with pytest.raises(ConfigError) as e:
        PackedBatches(docs, recipe, 0, 1)
    msg = str(e.value)
    assert f"train.seq_len = {L}" in msg and "template 'interleaved'" in msg and f"up to {longest} tokens" in msg
    assert str(tokens_dir) in msg and "data.long_documents: split" in msg
    PackedBatches(docs, _recipe(tmp_path, tokens_dir, processor_dir, int(lengths.max())), 0, 1)  # all fit: fine


def test_split_cuts_at_segment_boundaries_and_keeps_every_loss_token(docs, tmp_path, tokens_dir, processor_dir):
    lengths = document_lengths(docs)
    L = int(np.median(lengths)) // 2
    d = int(np.argmax(lengths))
    ids, mask = list(docs[d]["input_ids"]), list(docs[d]["loss_mask"])
    pieces = split_document(ids, mask, L)
    assert len(pieces) >= 2 and all(len(p) <= L for p, _ in pieces)
    assert pieces[0][0][0] == BOS and all(p[0] == BOS and m[0] == 0 for p, m in pieces[1:])
    assert all(p[1] in (TEXT_OPEN, ACT_OPEN, FRAME) for p, _ in pieces[1:])  # each piece begins a segment
    assert sum(sum(m) for _, m in pieces) == sum(mask)  # no loss token is lost
    # the pieces, without their added <bos>, are spans of the document in order; what lies
    # between them (a piece left out) holds no loss token
    pos = 0
    for k, (p, _) in enumerate(pieces):
        body = p if k == 0 else p[1:]
        start = next(s for s in range(pos, len(ids)) if ids[s:s + len(body)] == body)
        assert sum(mask[pos:start]) == 0
        pos = start + len(body)
    assert sum(mask[pos:]) == 0
    with pytest.raises(ValueError, match="does not fit in seq_len"):
        split_document(ids, mask, 40)  # a frame segment is longer than 40 tokens

    recipe = _recipe(tmp_path, tokens_dir, processor_dir, L, "split")
    b = PackedBatches(docs, recipe, 0, 1)
    rows = b.epoch_rows(0)
    assert all(len(r[0]) <= L for r in rows)
    ids_b, mask_b, task_b, _ = b.batch(0)
    assert ids_b.shape == (recipe.train.micro_batch_size, L) and mask_b.sum() > 0


def test_truncate_keeps_todays_cut_but_a_task_without_any_loss_token_left_is_an_error(docs, tmp_path, tokens_dir, processor_dir, capsys):
    lengths, tpl = document_lengths(docs), np.array(docs["template"])
    cap = [i for i in range(len(docs)) if tpl[i] == "caption"]
    first_loss = min(list(docs[i]["loss_mask"]).index(1) for i in cap)
    with pytest.raises(ConfigError, match=r"template 'caption' would get no loss tokens at train.seq_len = "):
        PackedBatches(docs, _recipe(tmp_path, tokens_dir, processor_dir, first_loss - 1, "truncate"), 0, 1)
    L = int(lengths.max()) - 5
    b = PackedBatches(docs, _recipe(tmp_path, tokens_dir, processor_dir, L, "truncate"), 0, 1)
    assert "are cut at it" in capsys.readouterr().err
    assert all(len(r[0]) <= L for r in b.epoch_rows(0))


def test_unknown_mode_is_named_and_the_demo_recipe_keeps_its_cut_explicit(tmp_path, tokens_dir, processor_dir):
    with pytest.raises(ConfigError, match="data.long_documents"):
        _recipe(tmp_path, tokens_dir, processor_dir, 640, "cut")
    # the demo's interleaved documents run to ~1214 tokens at seq_len 1152: it says so and truncates
    assert load_recipe(ROOT / "recipes/tiny_cpu.yaml").data.long_documents == "truncate"


@pytest.mark.slow
def test_uwm_train_refuses_long_documents_at_start_up(docs, tmp_path, tokens_dir, processor_dir):
    rp = write_tiny_recipe(tmp_path, tokens_dir, processor_dir, seq_len=300)
    r = subprocess.run([sys.executable, "-m", "unified_wm.cli", "train", "--recipe", str(rp), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "longer than train.seq_len = 300" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
