"""Discrete video tokenizer: a convolutional autoencoder with an FSQ or VQ bottleneck.

By default (``temporal: 1``) each frame is encoded on its own: every frame becomes ``h * w``
code indices, which is what the ``<frame> v0 ... v(hw-1)`` segment of the stream expects.
``temporal: t > 1`` turns on a causal temporal compression: a clip of T frames is cut into
the first frame alone, then groups of t frames (1, t, t, ..., the last group padded by
repeating the last frame), and each group becomes one ``h * w`` code grid, so a clip costs
``1 + ceil((T - 1) / t)`` grids instead of T. The t frames of a group enter the encoder
stacked on the channel axis (the first frame's group is that frame repeated t times); a
group's codes depend only on its own frames, never on later ones. The unified processor
takes only ``temporal: 1`` tokenizers (its stream has one ``<frame>`` segment per frame).
The pieces, top to bottom:

* :class:`VideoTokenizerConfig` - the typed config, loaded from ``tokenizers/video_*.yaml``
  with :func:`unified_wm.utils.load_config` (unknown keys are errors).
* :class:`FSQ` - finite scalar quantization (Mentzer et al. 2023): bounded ``tanh``, round
  with a straight-through estimator; the code index is the mixed-radix number of the levels.
* :class:`EMAVectorQuantizer` - VQ with an EMA codebook, dead-code restarts, commitment loss.
* :class:`VideoTokenizer` - encoder, quantizer, decoder; ``encode`` / ``decode`` /
  ``save_pretrained`` / ``from_pretrained``.
Training, evaluation and the ``uwm tokenizer train-video`` / ``eval-video`` commands:
``video_train.py``. Frame metrics (PSNR, SSIM, code usage): ``unified_wm.eval.metrics``.

Pixels enter the network as float in [-1, 1]; ``encode`` accepts uint8 ``[T, H, W, 3]``
(numpy or torch) or a float tensor already in [-1, 1] laid out ``[T, 3, H, W]``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unified_wm.utils import from_dict, to_dict, write_json

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------- config


@dataclass
class FSQConfig:
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])

    def validate(self) -> None:
        if not self.levels or any(int(l) < 2 for l in self.levels):
            raise ValueError(f"quantizer.fsq.levels = {self.levels}; expected a non-empty list of integers >= 2")


@dataclass
class VQConfig:
    codebook_size: int = 1024
    dim: int = 16
    decay: float = 0.99
    commitment: float = 0.25
    # a code whose EMA cluster size falls below this is re-seeded from a random encoder output
    dead_code_threshold: float = 0.05
    eps: float = 1e-5

    def validate(self) -> None:
        if self.codebook_size < 2:
            raise ValueError(f"quantizer.vq.codebook_size = {self.codebook_size}; expected >= 2")
        if self.dim < 1:
            raise ValueError(f"quantizer.vq.dim = {self.dim}; expected >= 1")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"quantizer.vq.decay = {self.decay}; expected 0 < decay < 1")


@dataclass
class QuantizerConfig:
    kind: Literal["fsq", "vq"] = "fsq"
    fsq: FSQConfig = field(default_factory=FSQConfig)
    vq: VQConfig = field(default_factory=VQConfig)

    def validate(self) -> None:
        self.fsq.validate()
        self.vq.validate()


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    loss: Literal["l1", "mse", "l1+mse"] = "l1+mse"
    grad_loss_weight: float = 0.0  # L1 on horizontal/vertical image differences (edges)
    # pixels that differ from the static background (the per-pixel median of the training
    # frames) weigh 1 + foreground_weight in the reconstruction loss: small moving objects on a
    # flat background (Pong's ball and paddles) are otherwise a rounding error of the mean
    foreground_weight: float = 0.0
    # pixels inside an object's box (from each episode's state: the procedural world writes
    # them) weigh 1 + object_weight: with a moving camera there is no static background, and
    # small objects otherwise come back in the background's colours (BENCHMARKS.md)
    object_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    keep_checkpoints: int = 2
    max_frames: int = 200_000  # cap on the number of training frames held in memory
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    # exponential moving average of the weights; 0 = off. With it on, the saved model (the
    # final one and each checkpoint's model.safetensors) holds the averaged weights, and the
    # raw ones travel in train_state.pt for --resume.
    ema_decay: float = 0.0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} = {getattr(self, name)}; expected >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr = {self.lr}; expected > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio = {self.min_lr_ratio}; expected a share of train.lr in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip = {self.grad_clip}; expected >= 0 (0: no clipping)")
        if self.grad_loss_weight < 0:
            raise ValueError(f"train.grad_loss_weight = {self.grad_loss_weight}; a loss weight must be >= 0")
        if self.foreground_weight < 0:
            raise ValueError(f"train.foreground_weight = {self.foreground_weight}; a loss weight must be >= 0")
        if self.object_weight < 0:
            raise ValueError(f"train.object_weight = {self.object_weight}; a loss weight must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay = {self.ema_decay}; expected 0 (off) or a decay in (0, 1), e.g. 0.999")


@dataclass
class VideoTokenizerConfig:
    """Frame autoencoder: ``image_size`` square frames -> ``(image_size/downsample)**2`` codes."""

    image_size: int = 64
    downsample: int = 8  # 4, 8 or 16: total spatial reduction, frame side / token grid side
    # space-to-depth stem (PixelUnshuffle) before the convs; 1 = none. The remaining factor
    # downsample / patch_size is done by stride-2 conv stages (their count = log2 of it).
    patch_size: int = 1
    # width at each resolution, finest first: len = log2(downsample / patch_size) + 1
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    res_blocks: int = 1  # residual blocks per resolution
    # residual blocks per resolution in the decoder; null = res_blocks. The decoder draws the
    # detail the codes only hint at, so it is where extra depth pays.
    decoder_res_blocks: int | None = None
    # self-attention blocks (each followed by a residual block) on the code grid, at the end of
    # the encoder and the start of the decoder: every code sees the whole frame. 0 = none.
    mid_attention: int = 0
    attention_heads: int = 4
    # causal temporal compression: 1 = off (one code grid per frame); t > 1 = the first frame
    # alone, then one code grid per group of t frames
    temporal: int = 1
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def num_stages(self) -> int:
        return int(round(math.log2(self.downsample // self.patch_size)))

    def validate(self) -> None:
        if self.downsample not in (2, 4, 8, 16, 32):
            raise ValueError(f"downsample = {self.downsample}; expected a power of two (4, 8 or 16)")
        if self.patch_size not in (1, 2, 4, 8) or self.patch_size > self.downsample:
            raise ValueError(f"patch_size = {self.patch_size}; expected 1, 2, 4 or 8 and at most downsample = {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size = {self.image_size} is not divisible by downsample = {self.downsample}")
        if len(self.channels) != self.num_stages + 1:
            raise ValueError(
                f"channels = {self.channels} has {len(self.channels)} entries; downsample = {self.downsample} "
                f"and patch_size = {self.patch_size} "
                f"need {self.num_stages + 1} (one width per resolution, finest first)"
            )
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels = {self.channels}; expected positive widths")
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks = {self.res_blocks}; expected >= 0")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 0:
            raise ValueError(f"decoder_res_blocks = {self.decoder_res_blocks}; expected >= 0, or null for res_blocks")
        if self.mid_attention < 0:
            raise ValueError(f"mid_attention = {self.mid_attention}; expected >= 0 blocks")
        if self.mid_attention and (self.attention_heads < 1 or self.channels[-1] % self.attention_heads):
            raise ValueError(f"attention_heads = {self.attention_heads}; expected a divisor of the coarsest width {self.channels[-1]}")
        if not 1 <= self.temporal <= 16:
            raise ValueError(f"temporal = {self.temporal}; expected 1 (off) up to 16 frames per code grid")
        self.quantizer.validate()
        self.train.validate()


# ----------------------------------------------------------------------------- quantizers


def _round_ste(z: torch.Tensor) -> torch.Tensor:
    return z + (z.round() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantization over the last dimension (one level count per channel)."""

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        super().__init__()
        lv = torch.tensor([int(l) for l in levels], dtype=torch.long)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), lv[:-1]]), 0)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.eps = eps
        self.dim = len(levels)
        self.codebook_size = int(torch.prod(lv).item())

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        lv = self.levels.to(z.dtype)
        half_l = (lv - 1) * (1 - self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [..., dim] -> (quantized in [-1, 1] with straight-through grads, indices [...], aux loss 0)."""
        q = _round_ste(self.bound(z))
        half_width = (self.levels // 2).to(z.dtype)
        zhat = q / half_width
        return zhat, self.codes_to_indices(zhat), z.new_zeros(())

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        half_width = self.levels // 2
        digits = torch.round(zhat * half_width + half_width).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.long().unsqueeze(-1) // self.basis) % self.levels
        half_width = self.levels // 2
        return (digits - half_width).float() / half_width.float()


class EMAVectorQuantizer(nn.Module):
    """VQ with an EMA-updated codebook, dead-code restarts and a commitment loss."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.codebook_size = cfg.codebook_size
        embed = torch.randn(cfg.codebook_size, cfg.dim) * 0.1
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = z.shape[:-1]
        flat = z.reshape(-1, self.dim).float()
        if self.training and not bool(self.initialized):
            # data-dependent init: seed the codebook with encoder outputs of the first batch
            pick = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
            self.embed.copy_(flat.detach()[pick])
            self.embed_avg.copy_(self.embed)
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
        idx = self._nearest(flat.detach())
        if self.training:
            self._ema_update(flat.detach(), idx)
        q = self.embed[idx]
        commit = self.cfg.commitment * F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        return q.view(*shape, self.dim).to(z.dtype), idx.view(shape), commit

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        c = self.cfg
        onehot = F.one_hot(idx, self.codebook_size).type(flat.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ flat
        self.cluster_size.mul_(c.decay).add_(counts, alpha=1 - c.decay)
        self.embed_avg.mul_(c.decay).add_(sums, alpha=1 - c.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + c.eps) / (n + self.codebook_size * c.eps) * n
        self.embed.copy_(self.embed_avg / size.unsqueeze(1))
        dead = self.cluster_size < c.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
            self.embed[dead] = flat[pick]
            self.embed_avg[dead] = flat[pick]
            self.cluster_size[dead] = 1.0

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed[indices.long()]


# ----------------------------------------------------------------------------- network


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.n1 = nn.GroupNorm(_groups(c), c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.n2 = nn.GroupNorm(_groups(c), c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return x + h


class AttnBlock(nn.Module):
    """Pre-norm multi-head self-attention over all positions of a feature map, residual."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(c), c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


def _mid_blocks(cfg: "VideoTokenizerConfig") -> list[nn.Module]:
    c = cfg.channels[-1]
    out: list[nn.Module] = []
    for _ in range(cfg.mid_attention):
        out += [AttnBlock(c, cfg.attention_heads), ResBlock(c)]
    return out


class Encoder(nn.Module):
    def __init__(self, cfg: VideoTokenizerConfig, latent_dim: int):
        super().__init__()
        ch = cfg.channels
        p = cfg.patch_size
        self.stem = nn.PixelUnshuffle(p) if p > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(3 * cfg.temporal * p * p, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(cfg.num_stages):
            layers += [ResBlock(ch[i]) for _ in range(cfg.res_blocks)]
            layers.append(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1))
        layers += [ResBlock(ch[-1]) for _ in range(cfg.res_blocks)]
        layers += _mid_blocks(cfg)
        self.body = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(_groups(ch[-1]), ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm(self.body(self.conv_in(self.stem(x))))))


class Decoder(nn.Module):
    def __init__(self, cfg: VideoTokenizerConfig, latent_dim: int):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(latent_dim, ch[-1], 3, padding=1)
        nb = cfg.res_blocks if cfg.decoder_res_blocks is None else cfg.decoder_res_blocks
        layers: list[nn.Module] = _mid_blocks(cfg) + [ResBlock(ch[-1]) for _ in range(nb)]
        for i in reversed(range(cfg.num_stages)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i + 1], ch[i], 3, padding=1)]
            layers += [ResBlock(ch[i]) for _ in range(nb)]
        self.body = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(_groups(ch[0]), ch[0])
        p = cfg.patch_size
        self.conv_out = nn.Conv2d(ch[0], 3 * cfg.temporal * p * p, 3, padding=1)
        self.unstem = nn.PixelShuffle(p) if p > 1 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.unstem(self.conv_out(F.silu(self.norm(self.body(self.conv_in(z))))))


def _to_float_frames(frames, image_size: int) -> torch.Tensor:
    """uint8 [T,H,W,3] (numpy/torch) -> float [T,3,H,W] in [-1,1]; float [T,3,H,W] passes through."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames: numpy input must be uint8 [T,H,W,3], got dtype {frames.dtype} (shape {frames.shape})")
        frames = np.ascontiguousarray(frames)
        if not frames.flags.writeable:  # a read-only view (np.frombuffer, broadcast_to): torch wants its own copy
            frames = frames.copy()
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames: expected a numpy uint8 array or a torch tensor, got {type(frames).__name__}")
    if frames.dtype == torch.uint8:
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames: uint8 input must be [T,H,W,3], got shape {tuple(frames.shape)}")
        x = frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    elif frames.is_floating_point():
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames: float input must be [T,3,H,W] in [-1,1], got shape {tuple(frames.shape)}")
        x = frames.float()
        if x.numel():
            if not bool(torch.isfinite(x).all()):
                raise ValueError("frames: float input holds NaN or inf values")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(
                    f"frames: float input must lie in [-1, 1] (layout [T,3,H,W]), got values in [{lo:g}, {hi:g}]; "
                    f"pass 0..255 pixels as uint8 [T,H,W,3] instead"
                )
    else:
        raise ValueError(f"frames: expected uint8 [T,H,W,3] or float [T,3,H,W] in [-1,1], got dtype {frames.dtype}")
    if x.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"frames are {x.shape[-2]}x{x.shape[-1]}, this tokenizer expects {image_size}x{image_size} "
            f"(use unified_wm.tokenization.video_train.resize_frames first)"
        )
    return x


def num_groups(num_frames: int, temporal: int) -> int:
    """Code grids for a clip of ``num_frames`` frames: the first frame alone, then groups of ``temporal``."""
    if num_frames <= 0:
        return 0
    return 1 + -(-(num_frames - 1) // temporal)


def group_frames(x: torch.Tensor, temporal: int) -> torch.Tensor:
    """Float frames [T,3,H,W] -> encoder inputs [G,3*temporal,H,W] (causal groups, see the module doc)."""
    if temporal == 1:
        return x
    T = x.shape[0]
    if T == 0:
        return x.new_zeros((0, 3 * temporal, *x.shape[2:]))
    G = num_groups(T, temporal)
    idx = torch.zeros(G, temporal, dtype=torch.long)
    if G > 1:
        rest = torch.arange(1, 1 + (G - 1) * temporal).clamp(max=T - 1)  # pad by repeating the last frame
        idx[1:] = rest.view(G - 1, temporal)
    return x[idx.flatten()].reshape(G, temporal * 3, *x.shape[2:])


def ungroup_frames(y: torch.Tensor, temporal: int, num_frames: int | None = None) -> torch.Tensor:
    """Decoder outputs [G,3*temporal,H,W] -> frames [T,3,H,W]; the first group is averaged into frame 0."""
    if temporal == 1:
        return y if num_frames is None else y[:num_frames]
    G = y.shape[0]
    if G == 0:
        return y.new_zeros((0, 3, *y.shape[2:]))
    f = y.reshape(G, temporal, 3, *y.shape[2:])
    out = torch.cat([f[:1].mean(1), f[1:].flatten(0, 1)])
    return out if num_frames is None else out[:num_frames]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class VideoTokenizer(nn.Module):
    """Per-frame discrete autoencoder: ``encode`` frames to codes, ``decode`` codes to frames."""

    def __init__(self, config: VideoTokenizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        q = config.quantizer
        if q.kind == "fsq":
            self.quantizer: nn.Module = FSQ(q.fsq.levels)
        else:
            self.quantizer = EMAVectorQuantizer(q.vq)
        latent = self.quantizer.dim
        self.encoder = Encoder(config, latent)
        self.decoder = Decoder(config, latent)

    # -- properties
    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        s = self.config.image_size // self.config.downsample
        return (s, s)

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def temporal(self) -> int:
        """Frames per code grid after the first frame (1 = no temporal compression)."""
        return self.config.temporal

    # -- forward pieces
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,3*temporal,H,W] in [-1,1] (grouped frames) -> (quantized latent [B,D,h,w], indices [B,h,w], aux loss)."""
        z = self.encoder(x).permute(0, 2, 3, 1)
        zq, idx, aux = self.quantizer(z)
        return zq.permute(0, 3, 1, 2), idx, aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,3*temporal,H,W] in [-1,1] -> (reconstruction [B,3*temporal,H,W], indices [B,h,w], aux loss)."""
        zq, idx, aux = self.quantize(x)
        return self.decoder(zq), idx, aux

    def decode_latent(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.indices_to_codes(idx)  # [B,h,w,D]
        return self.decoder(codes.permute(0, 3, 1, 2).float())

    @torch.no_grad()
    def encode(self, frames, batch_size: int = 64) -> torch.Tensor:
        """uint8 [T,H,W,3] (or float [T,3,H,W] in [-1,1]) -> LongTensor [T,h,w] of code indices.

        With ``temporal: t > 1`` the frames are one clip and the result is
        ``[1 + ceil((T-1)/t), h, w]`` (see :func:`num_groups`).
        """
        x = group_frames(_to_float_frames(frames, self.image_size), self.temporal)
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [self.quantize(x[i : i + batch_size].to(dev))[1].cpu() for i in range(0, len(x), batch_size)]
        self.train(was)
        return torch.cat(out).long() if out else torch.zeros(0, *self.grid, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes, batch_size: int = 64, num_frames: int | None = None) -> np.ndarray:
        """LongTensor [T,h,w] (or [h,w]) of code indices -> uint8 [T,H,W,3].

        With ``temporal: t > 1``: G code grids -> ``1 + (G-1)*t`` frames, or the first
        ``num_frames`` of them (the clip length given to ``encode``).
        """
        codes = torch.as_tensor(codes)
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"codes: expected shape [T,{self.grid[0]},{self.grid[1]}], got {tuple(codes.shape)}")
        if codes.is_floating_point():
            raise ValueError(f"codes: expected integer indices, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes: indices must lie in [0, {self.codebook_size}), got range [{int(codes.min())}, {int(codes.max())}]"
            )
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [self.decode_latent(codes[i : i + batch_size].to(dev)).cpu() for i in range(0, len(codes), batch_size)]
        self.train(was)
        s = self.image_size
        if not out:
            return np.zeros((0, s, s, 3), np.uint8)
        return _to_uint8(ungroup_frames(torch.cat(out), self.temporal, num_frames))

    @torch.no_grad()
    def reconstruct(self, frames, batch_size: int = 64) -> np.ndarray:
        """uint8 [T,H,W,3] -> uint8 [T,H,W,3] through the codes."""
        return self.decode(self.encode(frames, batch_size), batch_size, num_frames=len(frames))

    # -- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        from unified_wm.utils import atomic_path

        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "kind": "unified_wm.video_tokenizer"})
        meta = {
            "tokenizer_type": "video",
            "format_version": FORMAT_VERSION,
            "codebook_size": self.codebook_size,
            "grid": list(self.grid),
            "tokens_per_frame": self.tokens_per_frame,
            "temporal": self.temporal,
            "image_size": self.image_size,
            "config": to_dict(self.config),
        }
        write_json(d / CONFIG_NAME, meta)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "VideoTokenizer":
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"video tokenizer folder '{d}' does not exist (expected a folder written by save_pretrained)")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"video tokenizer folder '{d}' has no '{name}' (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
        meta = json.loads((d / CONFIG_NAME).read_text())
        if meta.get("tokenizer_type") != "video" or "config" not in meta:
            raise ValueError(f"'{d / CONFIG_NAME}' is not a video tokenizer config (tokenizer_type={meta.get('tokenizer_type')!r})")
        cfg = from_dict(VideoTokenizerConfig, meta["config"], source=str(d / CONFIG_NAME))
        model = cls(cfg)
        state = load_file(str(d / WEIGHTS_NAME), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"'{d / WEIGHTS_NAME}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.eval()
        return model


__all__ = [
    "VideoTokenizerConfig", "FSQConfig", "VQConfig", "QuantizerConfig", "TrainConfig",
    "FSQ", "EMAVectorQuantizer", "VideoTokenizer", "num_groups", "group_frames", "ungroup_frames",
]
