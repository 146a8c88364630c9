"""Packed training rows: batch(i) is a pure function of i across epochs (resume continues the data
order exactly), and each epoch is packed once, not at every step after the first epoch."""
from __future__ import annotations

import torch

from tests.conftest import write_tiny_recipe
from unified_wm.data.packing import PackedBatches
from unified_wm.recipe import load_recipe


def test_each_epoch_is_packed_once_and_batches_are_a_pure_function_of_the_step(tmp_path, tokens_dir, processor_dir):
    from unified_wm.data.tokenize import load_token_documents

    docs = load_token_documents(tokens_dir)
    recipe = load_recipe(write_tiny_recipe(tmp_path, tokens_dir, processor_dir, seq_len=640))
    b = PackedBatches(docs, recipe, 1, 2)
    packed = []
    real_pack = b._pack
    b._pack = lambda epoch: packed.append(epoch) or real_pack(epoch)
    per_epoch = b.rows_per_rank_per_epoch() // recipe.train.micro_batch_size
    assert per_epoch >= 2
    steps = range(3 * per_epoch)
    seen = [b.batch(i) for i in steps]
    assert [e for *_, e in seen] == [i // per_epoch for i in steps]
    assert packed == [0, 1, 2]  # epoch 0 once: its row count is not re-derived at each later step
    # a fresh instance asked for one step of the third epoch (a resumed run) gives the same rows
    fresh = PackedBatches(docs, recipe, 1, 2)
    k = 2 * per_epoch + 1
    for a, c in zip(fresh.batch(k)[:3], seen[k][:3]):
        assert torch.equal(a, c)
    assert not torch.equal(seen[1][0], seen[per_epoch + 1][0])  # epochs are shuffled differently
