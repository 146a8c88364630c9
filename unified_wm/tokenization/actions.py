"""Action tokens: named discrete action sets and binned continuous actions.

Discrete sets have names a user types in a prompt ("left", "fire", "stay"). Continuous
action vectors are quantised per dimension into bins (uniform or mu-law) with an inverse.
The processor places every known action name once in the shared id space.
"""
from __future__ import annotations

import numpy as np

# Built-in discrete action sets. Atari's full set (18) uses the names gymnasium reports,
# lower-cased; a game's reduced set is a subset of it.
ACTION_SETS: dict[str, list[str]] = {
    "pan5": ["stay", "left", "right", "up", "down"],
    "atari18": [
        "noop", "fire", "up", "right", "left", "down", "upright", "upleft", "downright", "downleft",
        "upfire", "rightfire", "leftfire", "downfire", "uprightfire", "upleftfire", "downrightfire", "downleftfire",
    ],
}

# Synonyms a user may type; they map to a canonical name of some set.
ALIASES = {"none": "stay", "idle": "stay", "wait": "stay"}


def action_vocabulary(sets: list[str]) -> list[str]:
    """Union of the named sets' action names, in a stable order, each name once."""
    names: list[str] = []
    for s in sets:
        if s not in ACTION_SETS:
            raise ValueError(f"unknown action set '{s}'; known sets: {sorted(ACTION_SETS)}")
        for a in ACTION_SETS[s]:
            if a not in names:
                names.append(a)
    return names


def parse_actions(text: str | list[str], vocabulary: list[str]) -> list[str]:
    """Parse "right,right,stay" (or a list) into canonical names; unknown names are an error."""
    items = text if isinstance(text, list) else [t for t in text.replace(" ", ",").split(",") if t]
    out = []
    for raw in items:
        a = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if a not in vocabulary:
            raise ValueError(f"unknown action name '{raw}'; valid actions: {', '.join(vocabulary)}")
        out.append(a)
    return out


class ContinuousActionBinner:
    """Quantise continuous actions in [low, high] per dimension into ``bins`` bins.

    ``mode='mu_law'`` spends more bins near zero (companding, as in audio codecs).
    """

    def __init__(self, low: list[float], high: list[float], bins: int = 256, mode: str = "uniform", mu: float = 255.0):
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        if mode not in ("uniform", "mu_law"):
            raise ValueError(f"mode must be 'uniform' or 'mu_law', got '{mode}'")
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        if self.low.shape != self.high.shape or np.any(self.high <= self.low):
            raise ValueError(f"need low < high per dimension, got low={low} high={high}")
        self.bins, self.mode, self.mu = bins, mode, mu

    @property
    def dims(self) -> int:
        return int(self.low.shape[0])

    def _to_unit(self, x: np.ndarray) -> np.ndarray:  # [-1, 1]
        u = 2 * (np.clip(x, self.low, self.high) - self.low) / (self.high - self.low) - 1
        if self.mode == "mu_law":
            u = np.sign(u) * np.log1p(self.mu * np.abs(u)) / np.log1p(self.mu)
        return u

    def _from_unit(self, u: np.ndarray) -> np.ndarray:
        if self.mode == "mu_law":
            u = np.sign(u) * np.expm1(np.abs(u) * np.log1p(self.mu)) / self.mu
        return (u + 1) / 2 * (self.high - self.low) + self.low

    def encode(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dims:
            raise ValueError(f"action vectors must have {self.dims} dimensions, got shape {x.shape}")
        u = self._to_unit(x)
        return np.clip(np.round((u + 1) / 2 * (self.bins - 1)), 0, self.bins - 1).astype(np.int64)

    def decode(self, b) -> np.ndarray:
        b = np.asarray(b)
        if np.any(b < 0) or np.any(b >= self.bins):
            raise ValueError(f"bin indices must lie in [0, {self.bins}), got {b.min()}..{b.max()}")
        return self._from_unit(b / (self.bins - 1) * 2 - 1)
