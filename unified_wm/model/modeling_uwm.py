"""unified_wm: one decoder-only transformer over text, action and video tokens.

Read top to bottom:

1. ``UnifiedWMConfig``     hyper-parameters plus the stream layout (which ids open which segment).
2. ``stream_layout``       per-token chunk / document / text / position ids, derived from the ids
                           alone, so training, ``generate()`` and cached decoding agree.
3. ``RMSNorm``, ``rope``   LLaMA-style building blocks.
4. ``Attention``           grouped-query attention; the score/mask work is delegated to
                           ``unified_wm.model.attention.attend`` (dense or Mixture of Contexts).
5. ``MLP`` (SwiGLU), ``Block``.
6. ``UnifiedWMForCausalLM``  embeddings, blocks, LM head, per-modality losses, KV cache,
                           and ``generate()`` constrained by the stream's grammar.
``generate()`` enforces the stream's grammar with ``StreamGrammar`` (``grammar.py``): at a frame
position only video codes can be sampled, at an action position only actions, and so on.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.logits_process import LogitsProcessorList
from transformers.modeling_outputs import CausalLMOutputWithPast

# relative: an exported folder carries these files and loads without the package (remote_code.py)
from .attention import CONFIG_KEYS, AttentionSettings, StreamMeta, attend
from .cache import UWMCache, layer_decode_state, new_decode_states, stream_state
from .grammar import StreamGrammar

MODALITIES = ("special", "text", "action", "video")
# rotary positions: "1d" rotates every token by its position in the document (LLaMA);
# "3d" splits the rotary pairs into four axes: position in the document, frame index, and the
# row and column of a video code in its frame (see ``rope_frequencies``).
ROPE_MODES = ("1d", "3d")
# the previous frame as an input: a code is predicted with the embeddings of the codes one frame
# earlier at its cell ("cell"), at its cell and the four cells beside it ("cross"), or at the 3x3
# cells around it ("square"), read from the ids already fed; offsets are (row, column)
PREV_FRAME_INPUTS = {
    "none": (),
    "cell": ((0, 0),),
    "cross": ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0)),
    "square": tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)),
}
# the keys of the config's `attention` dict (the recipe's `attention:` section): attention_core.CONFIG_KEYS
ATTENTION_KEYS = CONFIG_KEYS
LEGACY_ATTENTION_KEYS = {"attn_backend": "backend", "moc_top_k": "top_k", "moc_n_sink": "n_sink",
                         "moc_drop_off": "drop_off", "moc_drop_in": "drop_in"}


# ----------------------------------------------------------------------------- 1. config
class UnifiedWMConfig(PretrainedConfig):
    model_type = "unified_wm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rope_mode: str = "1d",
        attention_bias: bool = False,
        prev_frame_input: str = "none",
        video_grid: tuple[int, int] | None = None,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        # attention (dense or Mixture of Contexts): the recipe's `attention:` section, key for key
        # (backend, top_k, n_sink, drop_off, drop_in; the defaults are AttentionSettings'); see attention.py
        attention: dict | None = None,
        # stream layout: ids are set by the processor (see UnifiedProcessor.model_layout)
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        text_open_id: int = 3,
        text_close_id: int = 4,
        act_open_id: int = 5,
        act_close_id: int = 6,
        frame_id: int = 7,
        text_range: tuple[int, int] = (16, 16),
        action_range: tuple[int, int] = (16, 16),
        video_range: tuple[int, int] = (16, 16),
        tokens_per_frame: int = 64,
        tokens_per_action: int = 1,
        max_chunk_len: int = 64,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_mode = rope_mode
        self.attention_bias = attention_bias
        self.prev_frame_input = prev_frame_input
        if video_grid is None:  # square grids (every processor so far): derived from tokens_per_frame
            side = int(round(tokens_per_frame ** 0.5))
            video_grid = (side, tokens_per_frame // max(side, 1))
        self.video_grid = [int(x) for x in video_grid]
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        att = dict(attention or {})
        for old, new in LEGACY_ATTENTION_KEYS.items():  # config.json files written before `attention`
            if old in kwargs:
                att.setdefault(new, kwargs.pop(old))
        unknown = sorted(set(att) - set(ATTENTION_KEYS))
        if unknown:
            raise ValueError(f"attention: unknown key '{unknown[0]}'; valid keys: {', '.join(ATTENTION_KEYS)}")
        self.attention = {k: att.get(k, AttentionSettings.__dataclass_fields__[k].default) for k in ATTENTION_KEYS}
        self.text_open_id = text_open_id
        self.text_close_id = text_close_id
        self.act_open_id = act_open_id
        self.act_close_id = act_close_id
        self.frame_id = frame_id
        self.text_range = list(text_range)
        self.action_range = list(action_range)
        self.video_range = list(video_range)
        self.tokens_per_frame = tokens_per_frame
        self.tokens_per_action = tokens_per_action
        self.max_chunk_len = max_chunk_len
        if rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode: unknown value '{rope_mode}'; valid values: {', '.join(ROPE_MODES)}")
        if prev_frame_input not in PREV_FRAME_INPUTS:
            raise ValueError(f"prev_frame_input: unknown value '{prev_frame_input}'; valid values: {', '.join(PREV_FRAME_INPUTS)}")
        if rope_mode == "3d" and self.head_dim // 2 < 4:
            raise ValueError(f"rope_mode '3d' needs head_dim >= 8 (4 rotary pairs), got head_dim {self.head_dim}")
        if self.video_grid[0] * self.video_grid[1] != tokens_per_frame:
            raise ValueError(f"video_grid {self.video_grid} does not hold tokens_per_frame={tokens_per_frame} codes")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )

    def attention_settings(self) -> AttentionSettings:
        s = AttentionSettings(**self.attention)
        s.validate()
        return s


# ----------------------------------------------------------------------------- 2. stream layout
def _last_index(flag: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the latest position <= it where ``flag`` holds (-1 if none)."""
    return torch.where(flag, pos, torch.full_like(pos, -1)).cummax(dim=1).values


def stream_layout(input_ids: torch.Tensor, cfg: UnifiedWMConfig) -> tuple[StreamMeta, torch.Tensor]:
    """Chunk, document, text and position ids of every token, and its modality.

    Rules (one place, used by the processor too): a chunk starts at ``<bos>``, ``<text>``,
    ``<act>``, ``<frame>`` and after every ``max_chunk_len`` video codes of a frame (tiles);
    ``</text>``, ``</act>``, ``<eos>`` close the chunk they are in. A document starts at
    ``<bos>``. Padding has chunk and document -1. Returns (StreamMeta, modality [B, N])
    with modality indices into ``MODALITIES``.
    """
    meta, modality, _, _ = stream_layout_continue(input_ids, cfg, None)
    return meta, modality


def stream_layout_continue(input_ids: torch.Tensor, cfg: UnifiedWMConfig, state: dict | None, offsets=None):
    """:func:`stream_layout` of ``input_ids`` as the continuation of a prefix summarised by
    ``state`` (None: no prefix). Every rule is a running count or a "latest index where"
    scan, so the prefix enters only through ``state`` (per row: tokens so far ``n``, chunk
    starts and ``<bos>`` seen, latest ``<frame>``, ``<text>``, ``</text>`` and ``<bos>``
    indices, frames seen). Returns (meta, modality, state after ``input_ids``, rotary
    coordinates ``(q, k)`` [B, N, 4]); decoding with a cache uses it to lay out only the new
    tokens, so a step does not cost O(length of the video).

    Rotary coordinates (used by ``rope_mode: 3d``; "1d" reads only the first): position in the
    document, frame index in the document (frames begun so far: text before the first frame
    is at 0, frame 0 and the action after it at 1, ...), and row and column of a video code in
    its frame (0 for other tokens). A key sits at its own coordinates; a query sits at those of
    the code it predicts when that is known from the grammar (``<frame>`` predicts code 0, code
    j predicts code j+1 of the same frame), else at its own. So "the same cell one frame ago"
    is the offset (0*, 1, 0, 0) for every code whatever text or actions lie between frames.

    The third coordinate tensor, ``prev`` [B, N, K] (K: the offsets of ``prev_frame_input``),
    holds for a position that predicts a code the index (among all ids fed) of the code at each
    offset of that cell in the previous frame of the same document, and -1 where there is none
    (first frame, off the grid, other positions). ``offsets`` ((row, column) pairs) replaces the
    config's ``prev_frame_input`` offsets (the training loss's changed-code weight reads (0, 0)).
    """
    ids = input_ids
    B, N = ids.shape
    dev = ids.device
    if state is None:
        none = torch.full((B,), -1, dtype=torch.long, device=dev)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        state = {"n": 0, "starts": zero, "bos": zero, "frame": none, "open": none, "close": none, "last_bos": none,
                 "frames": zero, "frames_at_bos": zero, "prev_frame": none}
    n0 = state["n"]
    pos = torch.arange(n0, n0 + N, device=dev).expand(B, N)

    def latest(flag: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        return torch.maximum(_last_index(flag, pos), before[:, None])

    is_pad = ids == cfg.pad_token_id
    is_bos = ids == cfg.bos_token_id
    is_frame = ids == cfg.frame_id
    v_lo, v_hi = cfg.video_range
    is_video = (ids >= v_lo) & (ids < v_hi)
    last_frame = latest(is_frame, state["frame"])
    code_idx = pos - last_frame - 1  # index of a video code inside its frame
    tile_start = is_video & (code_idx > 0) & (code_idx % cfg.max_chunk_len == 0)
    starts = is_bos | (ids == cfg.text_open_id) | (ids == cfg.act_open_id) | is_frame | tile_start
    if n0 == 0 and N:
        starts = starts.clone()
        starts[:, 0] = True
    starts_seen = state["starts"][:, None] + starts.long().cumsum(1)
    bos_seen = state["bos"][:, None] + is_bos.long().cumsum(1)
    chunk = starts_seen - 1
    doc = (bos_seen - 1).clamp(min=0)
    last_open = latest(ids == cfg.text_open_id, state["open"])
    last_close = latest(ids == cfg.text_close_id, state["close"])
    is_text = ((last_open > last_close) | (ids == cfg.text_close_id)) & ~is_pad
    last_bos = latest(is_bos, state["last_bos"])
    pos_in_doc = pos - last_bos.clamp(min=0)
    t_lo, t_hi = cfg.text_range
    a_lo, a_hi = cfg.action_range
    if cfg.attention.get("mandatory_actions"):  # action segments join text as mandatory keys
        is_text = is_text | (ids == cfg.act_open_id) | (ids == cfg.act_close_id) | ((ids >= a_lo) & (ids < a_hi))
    modality = torch.zeros_like(ids)
    modality[(ids >= t_lo) & (ids < t_hi)] = 1
    modality[(ids >= a_lo) & (ids < a_hi)] = 2
    modality[is_video] = 3
    neg = torch.full_like(ids, -1)
    meta = StreamMeta(
        chunk_ids=torch.where(is_pad, neg, chunk),
        doc_ids=torch.where(is_pad, neg, doc),
        is_text=is_text,
        pos_in_doc=torch.where(is_pad, torch.zeros_like(ids), pos_in_doc),
        positions=pos.contiguous(),
    )
    # rotary coordinates (see the docstring)
    frames_seen = state["frames"][:, None] + is_frame.long().cumsum(1)
    at_bos = torch.where(is_bos, frames_seen, torch.full_like(frames_seen, -1)).cummax(dim=1).values
    frames_at_bos = torch.maximum(at_bos, state["frames_at_bos"][:, None])
    t_idx = frames_seen - frames_at_bos
    gw = cfg.video_grid[1]
    k_row = torch.where(is_video, code_idx // gw, torch.zeros_like(ids))
    k_col = torch.where(is_video, code_idx % gw, torch.zeros_like(ids))
    predicts_code = is_frame | (is_video & (code_idx < cfg.tokens_per_frame - 1))
    nxt = code_idx + 1
    q_row = torch.where(predicts_code, nxt // gw, k_row)
    q_col = torch.where(predicts_code, nxt % gw, k_col)
    keep = ~is_pad[..., None]
    k_coords = torch.stack([meta.pos_in_doc, t_idx, k_row, k_col], -1) * keep
    q_coords = torch.stack([meta.pos_in_doc, t_idx, q_row, q_col], -1) * keep
    # the previous frame's start for every position: at a <frame>, the latest <frame> before it
    frame_before = torch.cat([state["frame"][:, None], last_frame[:, :-1]], 1)
    prev_frame = torch.maximum(torch.where(is_frame, frame_before, torch.full_like(ids, -1)).cummax(dim=1).values,
                               state["prev_frame"][:, None])
    if offsets is None:
        offsets = PREV_FRAME_INPUTS[getattr(cfg, "prev_frame_input", "none")]
    if offsets:
        has_prev = predicts_code & (prev_frame >= 0) & (prev_frame > last_bos)
        gh = cfg.video_grid[0]
        d = torch.tensor(offsets, dtype=torch.long, device=dev)  # [K, 2] (row, column) offsets
        r, c = q_row[..., None] + d[:, 0], q_col[..., None] + d[:, 1]
        ok = has_prev[..., None] & (r >= 0) & (r < gh) & (c >= 0) & (c < gw)
        prev = torch.where(ok, prev_frame[..., None] + 1 + r * gw + c, -1)
    else:
        prev = torch.full((B, N, 0), -1, dtype=torch.long, device=dev)
    if N:
        state = {"n": n0 + N, "starts": starts_seen[:, -1], "bos": bos_seen[:, -1],
                 "frame": last_frame[:, -1], "open": last_open[:, -1],
                 "close": last_close[:, -1], "last_bos": last_bos[:, -1],
                 "frames": frames_seen[:, -1], "frames_at_bos": frames_at_bos[:, -1],
                 "prev_frame": prev_frame[:, -1]}
    return meta, modality, state, (q_coords, k_coords, prev)


def _cat_meta(a: StreamMeta, b: StreamMeta) -> StreamMeta:
    return StreamMeta(*(torch.cat([x, y], 1) for x, y in zip(
        (a.chunk_ids, a.doc_ids, a.is_text, a.pos_in_doc, a.positions),
        (b.chunk_ids, b.doc_ids, b.is_text, b.pos_in_doc, b.positions))))


# ----------------------------------------------------------------------------- 3. blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[B, 1, N, head_dim]`` for rotary embeddings at integer ``positions`` [B, N]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv  # [B, N, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_frequencies(cfg: UnifiedWMConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_mode: 3d``: the frequency of each rotary pair and the axis it turns with.

    A quarter of the pairs (at least one) each for the frame index, the row and the column;
    the rest for the position in the document, with LLaMA's geometric frequencies. Grid axes
    run from pi (neighbouring cells are opposite, so one cell is told from the next) down to
    pi / (2 * side), so no two cells of a row or column alias; the frame axis likewise from
    pi / 2 over 64 frames. Returns (inv_freq [D/2] float, axis [D/2] long).
    """
    return _rope_frequencies(cfg.head_dim, float(cfg.rope_theta), tuple(cfg.video_grid), str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=32)  # built once per shape and device, not on every forward pass
def _rope_frequencies(head_dim: int, rope_theta: float, grid: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = head_dim // 2
    q = max(1, n // 4)
    n_pos = n - 3 * q

    def geometric(hi: float, span: float, m: int) -> torch.Tensor:
        return hi * span ** (-torch.arange(m, dtype=torch.float32) / max(m - 1, 1))

    pos = 1.0 / (rope_theta ** (torch.arange(n_pos, dtype=torch.float32) / n_pos))
    gh, gw = grid
    inv = torch.cat([pos, geometric(math.pi / 2, 64.0, q), geometric(math.pi, 2.0 * gh, q), geometric(math.pi, 2.0 * gw, q)])
    axis = torch.cat([torch.full((n_pos,), 0), torch.full((q,), 1), torch.full((q,), 2), torch.full((q,), 3)])
    return inv.to(device), axis.to(device)


def rope_for(coords: torch.Tensor, cfg: UnifiedWMConfig, dtype: torch.dtype):
    """cos/sin ``[B, 1, N, head_dim]`` at rotary coordinates ``coords`` [B, N, 4] (see
    :func:`stream_layout_continue`). "1d" reads the position in the document alone."""
    if cfg.rope_mode == "1d":
        return rope_cos_sin(coords[..., 0], cfg.head_dim, cfg.rope_theta, dtype)
    inv, axis = rope_frequencies(cfg, coords.device)
    freqs = coords.float()[..., axis] * inv  # [B, N, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_pair(q_coords: torch.Tensor, k_coords: torch.Tensor, cfg: UnifiedWMConfig, dtype: torch.dtype):
    """(query, key) cos/sin: the same in "1d"; in "3d" a query sits at the cell it predicts."""
    rope_q = rope_for(q_coords, cfg, dtype)
    return rope_q, rope_q if cfg.rope_mode == "1d" else rope_for(k_coords, cfg, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------- 4. attention
class Attention(nn.Module):
    def __init__(self, cfg: UnifiedWMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # attention_bias (as Qwen2's): a query and key part that does not depend on the token, so a
        # purely positional pattern ("the same cell one frame back") is there to learn from step one
        bias = bool(getattr(cfg, "attention_bias", False))
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.settings = cfg.attention_settings()

    def forward(self, x, rope, q_meta: StreamMeta, k_meta: StreamMeta, cache: Cache | None, stats: dict | None):
        """``rope``: (cos, sin) of the queries, then of the keys (the same pair in "1d")."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.n_kv, self.head_dim).transpose(1, 2)
        (cos_q, sin_q), (cos_k, sin_k) = rope
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos_k, sin_k)
        state = None
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            state = layer_decode_state(cache, self.layer_idx)
        ulysses = self.__dict__.get("ulysses")  # sequence parallelism (unified_wm.parallel.enable)
        if ulysses is not None and cache is None:
            y = ulysses(q, k, v, q_meta, k_meta, self.settings, self.training, stats)
        else:
            y = attend(q, k, v, q_meta, k_meta, self.settings, training=self.training, state=state, stats=stats)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))


# ----------------------------------------------------------------------------- 5. MLP, block
class MLP(nn.Module):
    def __init__(self, cfg: UnifiedWMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        tiled = self.__dict__.get("tiled_forward")  # tiled MLP, attached by unified_wm.parallel.enable
        if tiled is not None:
            return tiled(self, x)
        return self.plain_forward(x)

    def plain_forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: UnifiedWMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, q_meta, k_meta, cache, stats):
        x = x + self.self_attn(self.input_layernorm(x), rope, q_meta, k_meta, cache, stats)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- 6. the model
@dataclass
class UnifiedWMOutput(CausalLMOutputWithPast):
    """Causal-LM output plus the mean loss of each modality (``{"video": tensor, ...}``)."""

    modality_losses: dict | None = None
    routing_stats: dict | None = None  # {"layer0": {...}, ...} from unified_wm.model.attention (MoC only)
    token_ce: torch.Tensor | None = None  # long-sequence training only: CE of the token each position predicts


class UnifiedWMPreTrainedModel(PreTrainedModel):
    config_class = UnifiedWMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    # activation checkpointing: model.gradient_checkpointing_enable() (or transformers'
    # activation_checkpointing_enable) recomputes each Block in the backward (non-reentrant)
    supports_gradient_checkpointing = True
    gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class UnifiedWMForCausalLM(UnifiedWMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: UnifiedWMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # prev_frame_input: the embeddings of the previous frame's codes around the cell a position
        # predicts, concatenated and projected into the residual stream (see ``embed``)
        n_prev = len(PREV_FRAME_INPUTS[config.prev_frame_input])
        self.prev_frame_proj = nn.Linear(n_prev * config.hidden_size, config.hidden_size, bias=False) if n_prev else None
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def embed(self, all_ids: torch.Tensor, prev: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The input of positions ``lo:hi`` of ``all_ids`` (every id fed so far): the token's
        embedding, plus with ``prev_frame_input`` the projected embeddings of the previous
        frame's codes that ``prev`` [B, hi - lo, K] points at (``stream_layout_continue``)."""
        x = self.embed_tokens(all_ids[:, lo:hi])
        if self.prev_frame_proj is None:
            return x
        v_lo, v_hi = self.config.video_range
        codes = all_ids.gather(1, prev.clamp(min=0).flatten(1)).view_as(prev)
        ok = (prev >= 0) & (codes >= v_lo) & (codes < v_hi)
        e = self.embed_tokens(codes) * ok[..., None].to(x.dtype)  # [B, n, K, H]
        return x + self.prev_frame_proj(e.flatten(2))

    def run_layers(self, x, rope, q_meta, k_meta, cache=None, stats: dict | None = None) -> torch.Tensor:
        """The blocks and the final norm over hidden states ``x`` (with activation checkpointing
        when it is on and no cache is used); ``stats`` collects routing statistics per layer."""
        for i, layer in enumerate(self.layers):
            st = None if stats is None else stats.setdefault(f"layer{i}", {})
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                # routing statistics are counted in the forward only, not again in the recompute
                def run(h, layer=layer, st=[st]):
                    out, st[0] = layer(h, rope, q_meta, k_meta, None, st[0]), None
                    return out

                x = self._gradient_checkpointing_func(run, x)
            else:
                x = layer(x, rope, q_meta, k_meta, cache, st)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        loss_weights: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_routing_stats: bool = False,
        **kwargs,
    ) -> UnifiedWMOutput:
        """``labels`` are the input ids with -100 where no loss is taken (shifted inside).

        ``loss_weights`` [B, N] (optional) weights each label position (e.g. per task);
        ``attention_mask`` is accepted for API compatibility; padding is read from ``pad_token_id``.
        With a cache, ``input_ids`` holds only the new tokens; the layout is derived from
        all ids seen so far, which the cache remembers.
        """
        long = self.__dict__.get("uwm_long")  # sequence parallelism / tiled compute, attached by unified_wm.parallel.enable
        if long is not None and cache is None and not use_cache:
            return long.forward(self, input_ids, labels, loss_weights, return_routing_stats)
        if use_cache and cache is None:
            cache = UWMCache(self.config)
        if cache is not None:
            mem = stream_state(cache)
            prev = mem.ids
            if prev is not None and cache.get_seq_length() == 0:
                prev = None  # a reused, emptied cache
            all_ids = input_ids if prev is None else torch.cat([prev, input_ids], dim=1)
            mem.ids = all_ids
            if mem.attn_states is None or prev is None:
                mem.attn_states = new_decode_states(self.config)
            # the layout of the cached ids, continued over the new ones (O(new tokens))
            lay = mem.layout
            if prev is not None and lay is not None and lay[2]["n"] == prev.shape[1]:
                meta_new, mod_new, st, coords = stream_layout_continue(input_ids, self.config, lay[2])
                k_meta, modality_all = _cat_meta(lay[0], meta_new), torch.cat([lay[1], mod_new], 1)
            else:
                k_meta, modality_all, st, coords = stream_layout_continue(all_ids, self.config, None)
            mem.layout = (k_meta, modality_all, st)
        else:
            all_ids = input_ids
            k_meta, modality_all, _, coords = stream_layout_continue(all_ids, self.config, None)
        n_new, n_all = input_ids.shape[1], all_ids.shape[1]
        q_meta = k_meta.slice(n_all - n_new)
        q_coords, k_coords, prev = (c[:, -n_new:] for c in coords)
        x = self.embed(all_ids, prev, n_all - n_new, n_all)
        rope = rope_pair(q_coords, k_coords, self.config, x.dtype)
        stats: dict | None = {} if return_routing_stats else None
        x = self.run_layers(x, rope, q_meta, k_meta, cache, stats)
        if isinstance(logits_to_keep, torch.Tensor) and labels is None:
            x = x[:, logits_to_keep]  # logits at these positions only (transformers' convention)
        elif logits_to_keep and labels is None:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x).float()

        loss, mod_losses = None, None
        if labels is not None:
            loss, mod_losses = self.loss_by_modality(logits, labels, modality_all[:, -n_new:], loss_weights)
        return UnifiedWMOutput(
            loss=loss, logits=logits, cache=cache,
            modality_losses=mod_losses, routing_stats=stats,
        )

    @staticmethod
    def ce_sums(ce: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, n_groups: int) -> list[tuple[float, int]]:
        """(sum, count) of the per-token losses ``ce`` over the ``valid`` tokens of each group
        (a modality, a task): what per-modality and per-task figures are averaged from."""
        out = []
        for i in range(n_groups):
            sel = valid & (groups == i)
            out.append((float(ce[sel].sum()), int(sel.sum())))
        return out

    @staticmethod
    def loss_by_modality(logits, labels, modality, loss_weights=None):
        """Weighted mean next-token loss, and the unweighted mean per modality of the target."""
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        target_mod = modality[:, 1:].reshape(-1)
        valid = shift_labels != -100
        ce = F.cross_entropy(shift_logits, shift_labels.clamp(min=0), reduction="none")
        w = valid.float()
        if loss_weights is not None:
            w = w * loss_weights[:, 1:].reshape(-1).float()
        loss = (ce * w).sum() / w.sum().clamp(min=1e-8)
        mod_losses = {}
        for i, name in enumerate(MODALITIES):
            m = valid & (target_mod == i)
            if m.any():
                mod_losses[name] = ce[m].mean().detach()
        return loss, mod_losses

    # -- generation -----------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, cache=None, **kwargs):
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "use_cache": kwargs.get("use_cache", True)}

    @torch.no_grad()
    def generate(self, inputs=None, *, constrain_grammar: bool = True, logits_processor=None, **kwargs):
        """``GenerationMixin.generate`` with the stream grammar enforced by default."""
        procs = LogitsProcessorList(logits_processor or [])
        if constrain_grammar:
            procs.append(StreamGrammar(self.config))
        if kwargs.get("use_cache", True) and kwargs.get("cache") is None:
            kwargs["cache"] = UWMCache(self.config)
        return super().generate(inputs, logits_processor=procs, **kwargs)


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("unified_wm", UnifiedWMConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(UnifiedWMConfig, UnifiedWMForCausalLM)
    except ValueError:
        pass


register()  # importing the model registers it (``import unified_wm`` alone stays light)
