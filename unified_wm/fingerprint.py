"""Token-space fingerprints: which processor an artifact was made with, checked wherever two meet.

A processor defines the token space: the special tokens, the SentencePiece vocabulary (pieces
in id order), the action set (names in order, the continuous action space, tokens per action),
the video tokenizer (codebook size, code grid, frame size and its weights: what each code
means) and the chunk length. :func:`token_space` hashes each of these parts and the whole
(``fingerprint``), and keeps a short summary for messages. Every artifact made from a
processor records that record:

  processor        ``processor_config.json``  ``token_space`` (checked against its files on load)
  token documents  ``tokenize_info.json``     ``token_space``
  checkpoint       ``complete.json`` of each ``stepN`` and the run's ``recipe.json``: ``token_space``
  exported model   ``config.json``            ``token_space``

``train`` (token documents, held-out documents and, on resume, the checkpoint vs the recipe's
processor), ``export`` (the checkpoint vs the recipe's processor) and ``rollout``/``eval``/``play``
(the model's config vs the processor beside it) refuse a mismatch with a
:class:`FingerprintMismatch` naming both artifacts and the parts that differ. An artifact
made before fingerprints were recorded gets a warning (it cannot be checked), not an error.
"""
from __future__ import annotations

import hashlib
import json
import sys

from unified_wm.utils import ConfigError

FORMAT = 1
KEY = "token_space"  # the field every artifact records the processor's record under
PART_NAMES = {"special": "special tokens", "text": "text vocabulary", "actions": "action set",
              "video": "video tokenizer", "layout": "chunk length"}


class FingerprintMismatch(ConfigError):
    """Two artifacts were made with different processors (different token spaces)."""


def _h(obj) -> str:
    if isinstance(obj, bytes):
        data = obj
    else:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _state_hash(module) -> str:
    """Hash of a module's tensors (names, dtypes, shapes, bytes): what its weights are, not how they were stored."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def token_space(processor) -> dict:
    """The processor's token-space record: ``fingerprint``, per-part hashes and a summary (cached)."""
    cached = getattr(processor, "_token_space", None)
    if cached is not None:
        return cached
    from unified_wm.tokenization.processor import SPECIAL_TOKENS

    sp = processor.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    cont = processor.continuous.to_dict() if processor.continuous is not None else None
    video = processor.video
    video_desc = {"codebook_size": int(video.codebook_size), "grid": list(processor.grid),
                  "image_size": int(video.image_size)}
    parts = {
        "special": _h(list(SPECIAL_TOKENS)),
        "text": _h(pieces),
        "actions": _h({"names": list(processor.action_names), "continuous": cont,
                       "tokens_per_action": int(processor.tokens_per_action)}),
        "video": _h({**video_desc, "weights": _state_hash(video)}),
        "layout": _h({"max_chunk_len": int(processor.max_chunk_len)}),
    }
    record = {
        "format": FORMAT, "fingerprint": _h(parts), "parts": parts,
        "summary": {"vocab_size": int(processor.vocab_size), "text_pieces": len(pieces),
                    "actions": list(processor.action_names), "continuous_actions": cont, **video_desc,
                    "max_chunk_len": int(processor.max_chunk_len)},
    }
    try:
        processor._token_space = record
    except AttributeError:  # pragma: no cover - a processor that refuses attributes
        pass
    return record


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two token-space records, in words (``a`` first, then ``b``)."""
    pa, pb = a.get("parts") or {}, b.get("parts") or {}
    sa, sb = a.get("summary") or {}, b.get("summary") or {}
    out = []
    for key, name in PART_NAMES.items():
        if pa.get(key) == pb.get(key):
            continue
        if key == "actions":
            na, nb = sa.get("actions"), sb.get("actions")
            if na is not None and nb is not None and na != nb:
                if sorted(na) == sorted(nb):
                    i = next(k for k in range(len(na)) if na[k] != nb[k])
                    out.append(f"{name}: the same {len(na)} actions in another order (action {i} is '{na[i]}' vs '{nb[i]}')")
                else:
                    only_a, only_b = [x for x in na if x not in nb], [x for x in nb if x not in na]
                    out.append(f"{name}: {len(na)} vs {len(nb)} actions"
                               + (f", only in the first: {only_a[:5]}" if only_a else "")
                               + (f", only in the second: {only_b[:5]}" if only_b else ""))
            else:
                out.append(f"{name}: continuous action space or tokens per action "
                           f"({sa.get('continuous_actions')} vs {sb.get('continuous_actions')})")
        elif key == "text":
            ta, tb = sa.get("text_pieces"), sb.get("text_pieces")
            out.append(f"{name}: {ta} vs {tb} pieces" if ta != tb else f"{name}: the same size ({ta} pieces), other pieces")
        elif key == "video":
            da = {k: sa.get(k) for k in ("codebook_size", "grid", "image_size")}
            db = {k: sb.get(k) for k in ("codebook_size", "grid", "image_size")}
            out.append(f"{name}: {da} vs {db}" if da != db
                       else f"{name}: the same codebook ({da['codebook_size']} codes) and grid {da['grid']}, other weights "
                            f"(another training: its codes mean other things)")
        elif key == "layout":
            out.append(f"{name}: max_chunk_len {sa.get('max_chunk_len')} vs {sb.get('max_chunk_len')}")
        else:
            out.append(f"{name} differ")
    return out or ["the fingerprints differ"]


def check(recorded: dict | None, recorded_what: str, actual: dict, actual_what: str) -> bool:
    """Refuse when ``recorded`` (what an artifact was made with) is not ``actual``'s token space.

    ``recorded_what`` / ``actual_what`` name the two artifacts (e.g. "token documents 'runs/x/tokens'").
    A record that is missing (an artifact made before fingerprints) prints a warning and returns
    False; a match returns True."""
    if not recorded or not isinstance(recorded, dict) or "fingerprint" not in recorded:
        warn(f"{recorded_what} records no token-space fingerprint (made before fingerprints were recorded); "
             f"cannot check that it was made with {actual_what} (fingerprint {actual['fingerprint']}). "
             f"Re-make it to have it checked")
        return False
    if recorded["fingerprint"] == actual["fingerprint"]:
        return True
    raise FingerprintMismatch(
        f"{recorded_what} was made with another processor than {actual_what}: token-space fingerprint "
        f"{recorded['fingerprint']} vs {actual['fingerprint']}; differs: {'; '.join(differences(recorded, actual))}. "
        f"Use the processor it was made with, or re-make it with this one"
    )


def warn(msg: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def read_record(path) -> dict | None:
    """The ``token_space`` record in the JSON file ``path`` (None if the file or the key is missing)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text()).get(KEY)
    except (ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------- hooks, one per artifact
def check_token_documents(tokens_dir, processor, processor_what: str, what: str = "token documents") -> bool:
    """``tokens_dir`` (``uwm data tokenize``) against ``processor``."""
    from pathlib import Path

    info = Path(tokens_dir) / "tokenize_info.json"
    return check(read_record(info), f"{what} '{tokens_dir}' ({info.name})", token_space(processor), processor_what)


def check_checkpoint(ckpt, processor, processor_what: str) -> bool:
    """A checkpoint ``<run>/checkpoints/stepN`` against ``processor``: its ``complete.json``, else
    (saved before checkpoints recorded it) its run's ``recipe.json``."""
    from pathlib import Path

    ckpt = Path(ckpt)
    for f in (ckpt / "complete.json", ckpt.parent.parent / "recipe.json"):
        rec = read_record(f)
        if rec is not None:
            return check(rec, f"the checkpoint '{ckpt}' ({f.name})", token_space(processor), processor_what)
    return check(None, f"the checkpoint '{ckpt}'", token_space(processor), processor_what)


def check_model(config, processor, model_what: str, processor_what: str) -> bool:
    """An exported model's config (``token_space``) against the processor loaded beside it."""
    return check(getattr(config, KEY, None), f"model {model_what} (config.json)", token_space(processor), processor_what)


def check_training_inputs(recipe, processor, resume_from=None) -> None:
    """``train``: the token documents (and held-out ones) and, on resume, the checkpoint were made
    with the recipe's processor."""
    what = f"processor '{recipe.data.processor}' (data.processor)"
    check_token_documents(recipe.data.tokens, processor, what, "token documents (data.tokens)")
    if recipe.data.val_tokens:
        check_token_documents(recipe.data.val_tokens, processor, what, "held-out token documents (data.val_tokens)")
    if resume_from is not None:
        check_checkpoint(resume_from, processor, what)
