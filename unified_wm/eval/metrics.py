"""Frame metrics, one definition for the whole toolkit: PSNR and SSIM of uint8 frames (what the video
tokenizer reports and what every eval table shows) and the code usage of a codebook."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _image_batches(a, b, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (numpy or torch, one image or a batch) as float64 batches of one shape."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    return a, b


def psnr(a, b, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB between two batches ([N,...], same shape); identical images give +inf."""
    a, b = _image_batches(a, b, "psnr")
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, data_range: float = 255.0, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): gaussian window, valid convolution, averaged over channels.

    ``a``, ``b``: uint8/float images [N,H,W,3] (channels last) or [H,W,3].
    """
    a, b = _image_batches(a, b, "ssim")
    x, y = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    c = x.shape[1]
    win = min(win_size, x.shape[-1], x.shape[-2])
    g = _gaussian_window(win, sigma)
    kh = g.view(1, 1, win, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, win).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def code_usage(indices: torch.Tensor, codebook_size: int) -> dict:
    """Share of codes used and codebook perplexity of a batch of indices."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    perplexity = float(torch.exp(-(nz * nz.log()).sum())) if len(nz) else 0.0
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage": used / codebook_size, "perplexity": perplexity}


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 frames in dB; identical frames are capped at 100 dB."""
    return min(100.0, float(psnr(a, b)))


def frame_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 RGB frames."""
    return float(ssim(a, b))
