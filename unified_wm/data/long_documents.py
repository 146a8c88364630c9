"""Token documents longer than ``train.seq_len``: refused, split or truncated, never cut silently.

Training packs whole documents into rows of ``seq_len`` tokens. What happens to a document that
does not fit in one row is the recipe's ``data.long_documents``:

  refuse    (default) training does not start: the error names the documents' template, their
            length and ``seq_len``.
  split     the document is cut at segment boundaries (before a ``<text>``, ``<act>`` or
            ``<frame>``) into pieces of at most ``seq_len`` tokens; every piece after the first
            starts with its own ``<bos>`` (it is a document of its own: it does not see the
            pieces before it). Pieces without loss tokens are left out. A single segment longer
            than ``seq_len`` cannot be split: an error.
  truncate  the document is cut at ``seq_len`` and the rest is dropped (what training did
            before this switch existed). A one-line note says how many documents and loss
            tokens are cut.

Whatever the mode, a task (template) whose loss tokens would all be cut is an error (e.g. the
``caption`` template, whose targets come after every frame, at a ``seq_len`` shorter than its
frames). Only the templates the recipe samples (``tasks`` with a positive weight) are checked.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from unified_wm.utils import ConfigError

MODES = ("refuse", "split", "truncate")


def document_lengths(docs) -> np.ndarray:
    """Token count of every document (from the Arrow column when ``docs`` is a ``datasets.Dataset``)."""
    data = getattr(docs, "data", None)
    if data is not None and hasattr(data, "column"):
        import pyarrow.compute as pc

        return np.asarray(pc.list_value_length(data.column("input_ids")).to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.array([len(x) for x in docs["input_ids"]], dtype=np.int64)


def _segment_starts(ids: np.ndarray) -> np.ndarray:
    from unified_wm.tokenization.processor import ACT_OPEN, FRAME, TEXT_OPEN

    return np.nonzero(np.isin(ids, (TEXT_OPEN, ACT_OPEN, FRAME)))[0]


def split_document(ids, mask, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """``ids``/``mask`` cut at segment boundaries into pieces of at most ``seq_len`` tokens; pieces
    after the first start with ``<bos>`` (mask 0); pieces without a loss token are left out.
    A ValueError when one segment (with the ``<bos>`` of its piece) is longer than ``seq_len``."""
    from unified_wm.tokenization.processor import BOS

    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask)
    n = len(ids)
    if n <= seq_len:
        return [(ids.tolist(), mask.tolist())]
    cuts = np.append(_segment_starts(ids), n)  # where a piece may end (exclusive)
    pieces, start = [], 0
    while start < n:
        room = seq_len - (1 if start > 0 else 0)
        ends = cuts[(cuts > start) & (cuts - start <= room)]
        if not len(ends):
            nxt = cuts[cuts > start]
            seg = int(nxt[0] - start) if len(nxt) else n - start
            raise ValueError(f"a segment of {seg} tokens at position {start} does not fit in seq_len {seq_len}"
                             + (" with the <bos> of its piece" if start > 0 else ""))
        end = int(ends[-1])
        p_ids, p_mask = ids[start:end].tolist(), mask[start:end].tolist()
        if start > 0:
            p_ids, p_mask = [BOS] + p_ids, [0] + p_mask
        if any(p_mask):
            pieces.append((p_ids, p_mask))
        start = end
    return pieces


class _SplitColumn:
    def __init__(self, view, key: int):
        self.view, self.key = view, key

    def __getitem__(self, i):
        return self.view.piece(int(i))[self.key]

    def __len__(self):
        return len(self.view.index)


class SplitDocuments:
    """The documents with every long one replaced by its pieces: indexable like the dataset's
    ``input_ids``, ``loss_mask`` and ``template`` columns (what the packer reads)."""

    def __init__(self, docs, pieces: dict[int, list]):
        self.ids, self.masks = docs["input_ids"], docs["loss_mask"]
        templates = list(docs["template"])
        self.index: list[tuple[int, int]] = []  # (document, piece or -1 for the whole document)
        for d in range(len(templates)):
            if d in pieces:
                self.index += [(d, k) for k in range(len(pieces[d]))]
            else:
                self.index.append((d, -1))
        self.pieces = pieces
        self.templates = [templates[d] for d, _ in self.index]

    def piece(self, i: int):
        d, k = self.index[i]
        return self.pieces[d][k] if k >= 0 else (self.ids[d], self.masks[d])

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key: str):
        if key == "template":
            return self.templates
        if key in ("input_ids", "loss_mask"):
            return _SplitColumn(self, 0 if key == "input_ids" else 1)
        raise KeyError(key)


def fit_documents(docs, recipe, where: str):
    """``docs`` as training should read them under ``recipe.data.long_documents`` (see the module
    doc); a ConfigError naming ``where``, the template, the lengths and ``train.seq_len`` when they
    cannot be used. Returns ``docs`` itself unless documents are split."""
    mode = getattr(recipe.data, "long_documents", "refuse")
    L = recipe.train.seq_len
    lengths = document_lengths(docs)
    templates = np.array(docs["template"])
    sampled = [n for n, t in recipe.tasks.items() if t.weight > 0]
    long = np.nonzero((lengths > L) & np.isin(templates, sampled))[0]
    if not len(long):
        return docs
    by_tpl = {t: long[templates[long] == t] for t in sampled if (templates[long] == t).any()}
    stats = "; ".join(f"template '{t}': {len(ix)} of {int((templates == t).sum())} documents, up to "
                      f"{int(lengths[ix].max())} tokens" for t, ix in by_tpl.items())
    longest = int(lengths[long].max())
    if mode == "refuse":
        raise ConfigError(
            f"token documents '{where}': {len(long)} documents are longer than train.seq_len = {L} ({stats}); "
            f"raise train.seq_len to at least {longest}, tokenize with a shorter --clip-frames, or set "
            f"data.long_documents: split (cut them at segment boundaries into documents of at most seq_len tokens) "
            f"or truncate (cut them at seq_len, dropping the rest)"
        )
    masks = docs["loss_mask"]
    if mode == "truncate":
        lost_by_tpl = {}
        for t, ix in by_tpl.items():
            kept = lost = 0
            for d in ix:
                m = np.asarray(masks[int(d)])
                kept_d = int(m[:L].sum())
                kept, lost = kept + kept_d, lost + int(m.sum()) - kept_d
            fitting = int(((templates == t) & (lengths <= L)).sum())
            if kept == 0 and fitting == 0:
                raise ConfigError(
                    f"token documents '{where}': template '{t}' would get no loss tokens at train.seq_len = {L}: all its "
                    f"{len(ix)} documents are longer (up to {int(lengths[ix].max())} tokens) and their loss tokens all lie "
                    f"beyond token {L} (data.long_documents: truncate); raise train.seq_len to at least "
                    f"{int(lengths[ix].max())}, or set data.long_documents: split"
                )
            lost_by_tpl[t] = (lost, kept + lost)
        if os.environ.get("RANK", "0") == "0":
            cut = "; ".join(f"{t}: {lost} of the {tot} loss tokens of its long documents" for t, (lost, tot) in lost_by_tpl.items())
            print(f"note: data.long_documents: truncate: {len(long)} documents of '{where}' are longer than seq_len {L} "
                  f"and are cut at it ({stats}; loss tokens dropped: {cut})", file=sys.stderr, flush=True)
        return docs
    if mode != "split":
        raise ConfigError(f"data.long_documents: unknown value '{mode}'; valid values: {', '.join(MODES)}")
    ids = docs["input_ids"]
    pieces = {}
    for d in long:
        try:
            pieces[int(d)] = split_document(ids[int(d)], masks[int(d)], L)
        except ValueError as e:
            raise ConfigError(f"token documents '{where}': document {int(d)} (template '{templates[d]}', {int(lengths[d])} "
                              f"tokens) cannot be split for train.seq_len = {L}: {e} (data.long_documents: split)") from None
    if os.environ.get("RANK", "0") == "0":
        print(f"note: data.long_documents: split: {len(long)} documents of '{where}' longer than seq_len {L} are split "
              f"at segment boundaries into {sum(len(p) for p in pieces.values())} documents ({stats})",
              file=sys.stderr, flush=True)
    return SplitDocuments(docs, pieces)
