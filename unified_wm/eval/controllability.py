"""Action controllability, as MineWorld scores it: an inverse-dynamics probe reads the action back.

A small CNN (:class:`InverseDynamicsProbe`) takes two consecutive frames (both RGB frames and
their difference, 9 channels) and predicts the action taken between them. It is trained
here, on the CPU, in seconds, on REAL transitions of the suite's ``train_data`` episodes
(normally the model's own training episodes: the probe is a measuring tool and never sees a
generated frame while it learns; when ``train_data`` is empty it learns from the held-out
episodes that the suite does not evaluate on, i.e. those after the first ``n_episodes``).
The held-out episodes the suite evaluates are never used to train it.

Then it is scored (accuracy and macro-F1) on

* ``real``            held-out real transitions (frame t, frame t+1, logged action t): how well
                      the probe itself works -- the reference the model is read against;
* ``tokenizer_real``  the same real transitions through the video tokenizer (encode/decode):
                      the ceiling for generated frames, which always come out of its decoder;
* ``model``           the model's own transitions, rolled out from real context frames under
                      given actions (the logged ones, or uniformly drawn ones): if the model
                      follows its actions, the probe recovers them;
* ``frozen``          a frozen-frame baseline: the "next frame" is the context frame repeated,
                      labelled with the same actions as ``model`` (a model that ignores its
                      actions and freezes scores this).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn


class InverseDynamicsProbe(nn.Module):
    """Two frames -> action logits. Input uint8 [N, 2, H, W, 3]; ~12k parameters at width 16.

    The frames are average-pooled by ``downsample`` first (2: 64x64 -> 32x32), which makes it
    several times faster and, on little data, more accurate than full resolution.
    """

    def __init__(self, n_actions: int, width: int = 16, downsample: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.AvgPool2d(downsample) if downsample > 1 else nn.Identity(),
            nn.Conv2d(9, width, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, n_actions),
        )

    @staticmethod
    def features(pairs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pairs)).float().div_(255.0)  # N,2,H,W,3
        a, b = x[:, 0].permute(0, 3, 1, 2), x[:, 1].permute(0, 3, 1, 2)
        return torch.cat([a, b, (b - a) * 4.0], dim=1)

    def forward(self, pairs: np.ndarray) -> torch.Tensor:
        return self.net(self.features(pairs))


def transitions(episodes, max_transitions: int | None = None):
    """Real (frame t, frame t+1) pairs and action names from episode dicts."""
    pairs, labels = [], []
    for ep in episodes:
        f = ep["frames"]
        for t, a in enumerate(list(ep["actions"])[: len(f) - 1]):
            pairs.append(np.stack([f[t], f[t + 1]]))
            labels.append(str(a))
            if max_transitions and len(pairs) >= max_transitions:
                return np.stack(pairs), labels
    if not pairs:
        return np.zeros((0, 2, 1, 1, 3), np.uint8), labels
    return np.stack(pairs), labels


class ProbeResult:
    def __init__(self, probe: InverseDynamicsProbe, classes: list[str], info: dict):
        self.probe, self.classes, self.info = probe, classes, info

    @torch.no_grad()
    def predict(self, pairs: np.ndarray, batch: int = 256) -> list[str]:
        self.probe.eval()
        out = []
        for i in range(0, len(pairs), batch):
            out += self.probe(pairs[i:i + batch]).argmax(-1).tolist()
        return [self.classes[k] for k in out]


def train_probe(pairs: np.ndarray, labels: list[str], *, epochs: int = 6, batch_size: int = 64, lr: float = 3e-3,
                seed: int = 0, time_limit_s: float | None = None, min_steps: int = 400, downsample: int = 2) -> ProbeResult:
    """Train the inverse-dynamics probe on real transitions (deterministic in ``seed``).

    Classes are the action names present in ``labels``; the loss is class-balanced, so that
    a rare action (e.g. ``down`` under a policy that mostly stays) still counts. Training stops
    after ``epochs`` (raised so that there are at least ``min_steps`` optimizer steps on small
    data), or after ``time_limit_s`` seconds when one is given: then how far it got depends on
    the machine's speed and load, and ``info["stopped_by_time_limit"]`` says so.
    """
    if len(pairs) < 8:
        raise ValueError(f"the controllability probe needs at least 8 real transitions to learn from, got {len(pairs)}")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"the controllability probe needs transitions with at least 2 different actions, got only {classes}")
    idx = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([idx[a] for a in labels])
    counts = torch.bincount(y, minlength=len(classes)).float()
    weight = counts.sum() / (len(classes) * counts.clamp(min=1))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = InverseDynamicsProbe(len(classes), downsample=downsample)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = (len(pairs) + batch_size - 1) // batch_size
    epochs = max(epochs, -(-min_steps // per_epoch))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    t0, step, last = time.time(), 0, float("nan")
    done_epochs = 0
    probe.train()
    for _ in range(epochs):
        perm = torch.randperm(len(pairs), generator=g).numpy()
        for i in range(0, len(perm), batch_size):
            sel = perm[i:i + batch_size]
            loss = loss_fn(probe(pairs[sel]), y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            last = float(loss.detach())
            if time_limit_s is not None and time.time() - t0 > time_limit_s:
                break
        else:
            done_epochs += 1
            continue
        break
    probe.eval()
    info = {"train_transitions": int(len(pairs)), "classes": classes, "epochs": done_epochs, "steps": step,
            "planned_steps": steps, "stopped_by_time_limit": step < steps,
            "final_loss": last, "train_seconds": time.time() - t0}
    if step < steps:
        warnings.warn(f"the controllability probe stopped after {step} of {steps} steps at controllability.time_limit_s "
                      f"= {time_limit_s} s: its figures depend on this machine's speed and load (null: no limit)")
    return ProbeResult(probe, classes, info)


def scores(truth: list[str], pred: list[str]) -> dict:
    """Accuracy and macro-F1 (over the classes that occur in truth or prediction, as sklearn does)."""
    if not truth:
        return {"accuracy": None, "macro_f1": None, "n": 0}
    t, p = np.array(truth), np.array(pred)
    f1s = []
    for c in sorted(set(truth) | set(pred)):
        tp = float(((t == c) & (p == c)).sum())
        fp = float(((t != c) & (p == c)).sum())
        fn = float(((t == c) & (p != c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((t == p).mean()), "macro_f1": float(np.mean(f1s)), "n": int(len(t))}
