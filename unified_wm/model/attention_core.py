"""What every attention backend shares: the stream layout of a row (:class:`StreamMeta`), the
settings (:class:`AttentionSettings`), the backend names, the registry the backends are called
through (:data:`ATTENTION_FUNCTIONS`), and the checks that a GPU backend can run here. The
semantics of every backend are written once, in ``attention.py``."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("dense", "reference", "gather", "triton", "flex", "flash", "moc")
MOC_BACKENDS = ("reference", "gather", "triton", "flex", "flash", "moc")
BIG = torch.iinfo(torch.int64).max // 4

# name -> fn(q, k, v, q_meta, k_meta, settings, training, stats) -> output [B, Hq, Nq, D]; each
# backend module registers itself (``@register_attention("name")``) and ``attention.attend`` calls
# through here (``moc`` is not a function: it resolves per device to ``triton`` or ``gather``).
AttentionFunction = Callable[..., torch.Tensor]
ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {}


def register_attention(name: str) -> Callable[[AttentionFunction], AttentionFunction]:
    """Decorator: make ``fn`` the attention backend ``name`` (a new name, or a replacement of a
    built-in one); ``AttentionSettings(backend=name)`` then runs it. ``moc`` is reserved."""
    if not isinstance(name, str) or not name or name == "moc":
        raise ValueError(f"an attention backend needs a name other than 'moc', got {name!r}")

    def deco(fn: AttentionFunction) -> AttentionFunction:
        ATTENTION_FUNCTIONS[name] = fn
        return fn

    return deco


@dataclass
class StreamMeta:
    """Per-token layout of a (possibly packed) stream row; all tensors ``[B, N]``.

    chunk_ids   routing chunk of each token, increasing along the row, unique across
                documents of one row; -1 for padding.
    doc_ids     document of each token (packed rows hold several); -1 for padding.
    is_text     token belongs to a text segment, or with ``mandatory_actions`` an action
                segment (a mandatory link for MoC).
    pos_in_doc  0-based position inside its document (attention sinks are pos_in_doc < n_sink).
    positions   absolute index in the row (causality also holds across a KV cache).
    """

    chunk_ids: torch.Tensor
    doc_ids: torch.Tensor
    is_text: torch.Tensor
    pos_in_doc: torch.Tensor
    positions: torch.Tensor

    def slice(self, start: int, end: int | None = None) -> "StreamMeta":
        return StreamMeta(*(t[:, start:end] for t in (self.chunk_ids, self.doc_ids, self.is_text, self.pos_in_doc, self.positions)))


# The settings a recipe's `attention:` section and a model's config.json carry (the recipe's
# dataclass and the config's `attention` dict are made from this tuple and AttentionSettings'
# defaults); the others are runtime knobs of the backends.
CONFIG_KEYS = ("backend", "top_k", "n_sink", "drop_off", "drop_in", "dense_text_queries", "mandatory_actions")


@dataclass
class AttentionSettings:
    """Which backend and, for Mixture of Contexts, its routing knobs.

    top_k           chunks routed per query and head (mandatory links come on top).
    n_sink          first ``n_sink`` tokens of each document are always attended.
    drop_off        training only: probability of dropping each selected chunk.
    drop_in         training only: probability of keeping each of ``top_k`` random extra chunks.
    own_chunk_in_k  MoBA convention: the own chunk uses one of the ``top_k`` slots.
    dense_text_queries  a text query reads every earlier key of its document (no routing):
                    captions and event text read the whole clip; text is a few percent of
                    the tokens, so sparsity barely moves.
    mandatory_actions  action segments (``<act> a </act>``) are mandatory keys, as text is: every
                    query reads every earlier action of its document, and action chunks leave
                    the routed candidates (``top_k`` buys frames). Applied where the stream's
                    metadata is built (``is_text`` then marks both); a few tokens per frame.
    gather_tile     query rows per (key chunk) tile in the ``gather`` backend.
    gather_block    most queries per block in the ``gather`` backend; blocks also shrink so
                    that one holds at most 65536 (query row, key chunk) pairs (workspace bound).
    """

    backend: str = "dense"
    top_k: int = 4
    n_sink: int = 1
    drop_off: float = 0.0
    drop_in: float = 0.0
    own_chunk_in_k: bool = False
    dense_text_queries: bool = False
    mandatory_actions: bool = False
    gather_tile: int = 128
    gather_block: int = 1024

    def validate(self) -> None:
        if self.backend not in BACKENDS and self.backend not in ATTENTION_FUNCTIONS:
            known = list(dict.fromkeys([*BACKENDS, *ATTENTION_FUNCTIONS]))
            raise ValueError(f"attention backend '{self.backend}' is unknown; expected one of {known}")
        for name in ("top_k", "gather_tile", "gather_block"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"attention setting '{name}' must be a positive integer, got {val!r}")
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"attention setting 'n_sink' must be an integer >= 0, got {self.n_sink!r}")
        for name in ("drop_off", "drop_in"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= float(val) < 1.0:
                raise ValueError(f"attention setting '{name}' must be a number in [0, 1), got {val!r}")
        for name in ("own_chunk_in_k", "dense_text_queries", "mandatory_actions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"attention setting '{name}' must be true or false, got {getattr(self, name)!r}")
        if self.backend == "flash":
            require_flash(None)
        if self.backend == "triton":
            require_triton(None)


def require_flash(device: torch.device | None) -> None:
    """Raise a ValueError naming the setting when flash-attn or CUDA is missing."""
    why = None
    if importlib.util.find_spec("flash_attn") is None:
        why = "the flash-attn package is not installed (pip install '.[gpu]')"
    elif not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        why = "no CUDA GPU holds the tensors"
    if why:
        raise ValueError(
            f"attention backend 'flash' needs flash-attn and a CUDA GPU (recipe key attention.backend); {why}. "
            "Set attention backend to 'gather' (CPU) or 'flex'/'moc' instead."
        )


def require_triton(device: torch.device | None) -> None:
    """Raise a ValueError naming the setting when the Triton kernels cannot run here."""
    from .attention_triton import unavailable_reason

    why = unavailable_reason(None if device is None else device.type)
    if why:
        raise ValueError(
            f"attention backend 'triton' (recipe key attention.backend) cannot run on this machine: {why}. "
            "Set attention backend to 'moc' (Triton on CUDA, the compiled kernel on CPU) or 'gather' (CPU)."
        )
