"""Packed training batches: token documents sampled by task weight, condition dropout, greedy
packing into rows of ``train.seq_len`` tokens, and the loss weight of every token."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from unified_wm.model.modeling_uwm import stream_layout
from unified_wm.sequence import MODALITY_KEYS
from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, TEXT_CLOSE, TEXT_OPEN
from unified_wm.utils import ConfigError

if TYPE_CHECKING:
    from unified_wm.recipe import Recipe


class PackedBatches:
    """Deterministic packed rows: (epoch, rank) -> list of rows; the order only depends on the seed.

    Each epoch samples documents by task weight (with replacement inside a template), then packs
    them greedily into rows of ``seq_len`` tokens; a document longer than a row is refused, split
    or cut at the row's end, as ``data.long_documents`` says (:mod:`unified_wm.data.long_documents`).
    Rows are dealt to ranks round-robin. ``batch(i)`` is a
    pure function of ``i``: resuming at step ``s`` continues the data order exactly.
    """

    def __init__(self, docs, recipe: Recipe, rank: int, world: int, pad_id: int = 0, source: str | None = None):
        from unified_wm.data.long_documents import fit_documents

        docs = fit_documents(docs, recipe, source or recipe.data.tokens)  # data.long_documents
        self.docs, self.recipe, self.rank, self.world, self.pad = docs, recipe, rank, world, pad_id
        templates = np.array(docs["template"])
        self.by_task = {name: np.nonzero(templates == name)[0] for name in recipe.tasks}
        missing = [n for n, idx in self.by_task.items() if len(idx) == 0 and recipe.tasks[n].weight > 0]
        if missing:
            where = source or recipe.data.tokens
            raise ConfigError(f"tasks: template '{missing[0]}' has no documents in '{where}' (tokenize with it)")
        self.task_of = np.zeros(len(templates), dtype=np.int64)
        for i, name in enumerate(recipe.tasks):
            self.task_of[self.by_task[name]] = i
        self.ids = docs["input_ids"]
        self.masks = docs["loss_mask"]
        self._epoch_rows: dict[int, list] = {}  # the epoch in use (one epoch of rows held at a time)
        self._per_rank: int | None = None

    def epoch_rows(self, epoch: int):
        if epoch not in self._epoch_rows:
            self._epoch_rows = {epoch: self._pack(epoch)}
        return self._epoch_rows[epoch]

    def _pack(self, epoch: int) -> list:
        rng = np.random.default_rng(self.recipe.train.seed * 1000003 + epoch)
        names = [n for n in self.recipe.tasks if len(self.by_task[n]) and self.recipe.tasks[n].weight > 0]
        w = np.array([self.recipe.tasks[n].weight for n in names], dtype=float)
        n_docs = sum(len(self.by_task[n]) for n in names)
        choice = rng.choice(len(names), size=n_docs, p=w / w.sum())
        order = [int(self.by_task[names[c]][rng.integers(len(self.by_task[names[c]]))]) for c in choice]
        L = self.recipe.train.seq_len
        tr = self.recipe.train
        # a separate generator: the document order does not change when dropout is switched on
        drop_rng = np.random.default_rng([tr.seed, epoch, 7])
        task_names = list(self.recipe.tasks)
        rows, cur_ids, cur_mask, cur_task = [], [], [], []
        for d in order:
            ids, mask = list(self.ids[d]), list(self.masks[d])
            if tr.text_dropout or tr.action_dropout:
                name = task_names[int(self.task_of[d])]
                u_text, u_act = drop_rng.random(2)
                if name in TEXT_DROPPABLE and u_text < tr.text_dropout:
                    ids, mask = drop_segments(ids, mask, TEXT_OPEN, TEXT_CLOSE)
                if name in ACTION_DROPPABLE and u_act < tr.action_dropout:
                    ids, mask = drop_segments(ids, mask, ACT_OPEN, ACT_CLOSE)
            if cur_ids and len(cur_ids) + len(ids) > L:
                rows.append((cur_ids, cur_mask, cur_task))
                cur_ids, cur_mask, cur_task = [], [], []
            take = ids[:L - len(cur_ids)]
            cur_ids += take
            cur_mask += mask[:len(take)]
            cur_task += [int(self.task_of[d])] * len(take)
        if cur_ids:
            rows.append((cur_ids, cur_mask, cur_task))
        return rows

    def rows_per_rank_per_epoch(self) -> int:
        """Epoch 0's rows per rank: every epoch is this many micro-batches long. Counted once: asking
        epoch 0 again from a later epoch would re-pack both epochs at every step."""
        if self._per_rank is None:
            self._per_rank = len(self.epoch_rows(0)) // self.world
        return self._per_rank

    def batch(self, micro_step: int):
        """The micro-batch of global micro-step ``micro_step`` for this rank."""
        mbs = self.recipe.train.micro_batch_size
        per_epoch = max(1, self.rows_per_rank_per_epoch() // mbs)
        epoch, k = divmod(micro_step, per_epoch)
        rows = self.epoch_rows(epoch)
        picked = [rows[((k * mbs + j) * self.world + self.rank) % len(rows)] for j in range(mbs)]
        L = self.recipe.train.seq_len
        ids = torch.full((mbs, L), self.pad, dtype=torch.long)
        mask = torch.zeros((mbs, L), dtype=torch.float32)
        task = torch.zeros((mbs, L), dtype=torch.long)
        for j, (r_ids, r_mask, r_task) in enumerate(picked):
            ids[j, :len(r_ids)] = torch.tensor(r_ids)
            mask[j, :len(r_mask)] = torch.tensor(r_mask, dtype=torch.float32)
            task[j, :len(r_task)] = torch.tensor(r_task)
        return ids, mask, task, epoch


# templates whose text / action segments are conditions (not the only target) and may be dropped
TEXT_DROPPABLE = ("interleaved", "dynamics", "t2v")
ACTION_DROPPABLE = ("interleaved", "dynamics")


def drop_segments(ids: list[int], mask: list, open_id: int, close_id: int) -> tuple[list[int], list]:
    """``ids``/``mask`` without every ``open_id ... close_id`` segment (markers included)."""
    out_ids, out_mask, inside = [], [], False
    for t, m in zip(ids, mask):
        if t == open_id:
            inside = True
        if not inside:
            out_ids.append(t)
            out_mask.append(m)
        if t == close_id:
            inside = False
    return out_ids, out_mask


def token_weights(ids, mask, task, modality, recipe: Recipe, task_names: list[str]) -> torch.Tensor:
    """Loss weight of every token: its template's mask x the recipe's weight for its modality."""
    table = torch.tensor([[getattr(recipe.tasks[n].loss, m) for m in MODALITY_KEYS] for n in task_names])
    return mask * table[task, modality]


def prepare_batch(batches: PackedBatches, micro_step: int, config, recipe: Recipe, task_names: list[str]):
    ids, mask, task, _ = batches.batch(micro_step)
    _, modality = stream_layout(ids, config)
    weights = token_weights(ids, mask, task, modality, recipe, task_names)
    labels = torch.where(weights > 0, ids, torch.full_like(ids, -100))
    return ids, labels, weights, task
