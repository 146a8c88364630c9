"""Training checkpoints that only ever appear complete, and the RNG state that makes resume exact.

Layout (``<output_dir>/checkpoints``): each save goes to ``tmp-step<N>`` (DeepSpeed files + every
rank's RNG state), is verified and fsynced, gets ``complete.json`` (the step, world size, ZeRO
stage, and the size and sha256 of every file), and only then is renamed to ``step<N>`` and named
in ``latest``. A crash mid-write leaves only a ``tmp-`` folder, which resume ignores and the next
save removes; rotation keeps the newest ``keep_checkpoints`` complete ones and never the one
``latest`` names. ``--resume latest`` takes the newest checkpoint that verifies, saying which it
skipped and why. Training, export and the eval read checkpoints through this module only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unified_wm.distributed import all_reduce_sum, barrier
from unified_wm.utils import ConfigError, write_json


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG state of this process, as JSON-able lists."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [py[0], list(py[1]), py[2]], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
          "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


# ----------------------------------------------------------------------------- checkpoints
TMP_PREFIX = "tmp-"  # a save in progress (or interrupted): never resumed from, removed by the next save
DONE_MARKER = "complete.json"  # written after every rank's files are on disk; rename + 'latest' follow


def _step_of(p: Path) -> int | None:
    name = p.name
    if name.startswith("step") and name[4:].isdigit():
        return int(name[4:])
    return None


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (``stepN`` with ``complete.json``), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = [(_step_of(p), p) for p in d.iterdir() if p.is_dir() and _step_of(p) is not None and (p / DONE_MARKER).is_file()]
    return sorted(out, key=lambda x: x[0])


def read_latest(ckpt_dir: str | Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(d: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``d`` (relative names), as ``complete.json`` records them."""
    return {str(f.relative_to(d)): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(d.rglob("*")) if f.is_file() and f.name != DONE_MARKER}


def check_checkpoint(p: Path) -> list[str]:
    """What is wrong with checkpoint folder ``p`` (empty list: it verifies): ``complete.json`` must
    be readable and every file it lists present with its recorded size and sha256. Checkpoints
    saved before sizes and hashes were recorded (a list of names) are checked for presence only."""
    marker = p / DONE_MARKER
    if not marker.is_file():
        return [f"no {DONE_MARKER} (its save was interrupted)"]
    try:
        info = json.loads(marker.read_text())
        files = info.get("files", [])  # older saves: a list of names, or nothing
        if not isinstance(files, (dict, list)):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return [f"'{marker}' is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for name in files:
        f = p / name
        rec = files[name] if isinstance(files, dict) else None
        if not f.is_file():
            problems.append(f"'{f}' is missing")
        elif rec is not None and f.stat().st_size != rec.get("size"):
            problems.append(f"'{f}' has {f.stat().st_size} bytes, {rec.get('size')} were saved (truncated or changed)")
        elif rec is not None and _sha256(f) != rec.get("sha256"):
            problems.append(f"'{f}' does not match its sha256 recorded at save (corrupted)")
    return problems


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def resolve_resume(resume: str, ckpt_dir: str | Path, flag: str = "--resume") -> Path:
    """The complete, verified checkpoint folder that ``--resume`` means.

    ``latest``: the run's ``checkpoints/latest`` if it verifies (:func:`check_checkpoint`), else
    the newest one that does; each one skipped is printed with the reason. A checkpoints folder:
    the same rule inside it. A ``stepN`` folder: itself, if it verifies (else an error naming the file)."""
    if resume == "latest":
        base = Path(ckpt_dir)
    else:
        p = Path(resume)
        if not p.exists():
            raise FileNotFoundError(f"{flag} '{p}': no such checkpoint")
        if _step_of(p) is not None or p.name.startswith(TMP_PREFIX):
            if not (p / DONE_MARKER).is_file():
                raise FileNotFoundError(f"{flag} '{p}': checkpoint is incomplete (no {DONE_MARKER}: its save was interrupted)")
            problems = check_checkpoint(p)
            if problems:
                raise ConfigError(f"{flag} '{p}': checkpoint does not verify: {'; '.join(problems)}")
            return p
        base = p
    done = complete_checkpoints(base)
    if not done:
        raise FileNotFoundError(f"{flag} {resume}: no complete checkpoint in '{base}'")
    tag = read_latest(base)
    order = [p for _, p in done if p.name == tag] + [p for _, p in reversed(done) if p.name != tag]
    skipped = []
    for p in order:
        problems = check_checkpoint(p)
        if not problems:
            return p
        skipped.append(f"{p.name}: {'; '.join(problems)}")
        _say(f"resume: skipping checkpoint '{p}': {'; '.join(problems)}")
    raise ConfigError(f"{flag} {resume}: no checkpoint in '{base}' verifies ({' | '.join(skipped)})")


def checkpoint_zero_stage(p: Path) -> int | None:
    """The ZeRO stage a checkpoint was saved under (from its ``complete.json``), if recorded."""
    try:
        stage = json.loads((Path(p) / DONE_MARKER).read_text()).get("zero_stage")
    except (OSError, ValueError, AttributeError):
        return None
    return int(stage) if isinstance(stage, int) else None


def _fsync_tree(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(p: Path) -> None:
    """Delete a folder so that no half-deleted copy can look like a checkpoint: rename, then remove."""
    trash = p.with_name(f".deleting-{p.name}-{os.getpid()}")
    os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


def verify_checkpoint_files(d: Path, world: int, zero_stage: int) -> list[str]:
    """What is missing from a DeepSpeed save of ``world`` ranks (empty list: all there)."""
    problems = []
    names = {p.name for p in d.iterdir()} if d.is_dir() else set()
    if not any(n.endswith("model_states.pt") for n in names):
        problems.append("no *model_states.pt")
    if zero_stage >= 1:
        n_opt = sum(n.endswith("optim_states.pt") for n in names)
        if n_opt != world:
            problems.append(f"{n_opt} *optim_states.pt files for {world} ranks")
    for r in range(world):
        if f"rng_rank{r}.json" not in names:
            problems.append(f"no rng_rank{r}.json")
    return problems


def save_checkpoint(engine, ckpt_dir: Path, step: int, *, rank: int, world: int, zero_stage: int, keep: int,
                    info: dict | None = None) -> Path:
    """Save step ``step`` so that it only ever appears complete (see the module docstring).
    ``info``: more fields for ``complete.json`` (the processor's token space, unified_wm.fingerprint)."""
    tmp = ckpt_dir / f"{TMP_PREFIX}step{step}"
    final = ckpt_dir / f"step{step}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            _remove_dir(tmp)
    barrier(world)
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"step": step}, save_latest=False)
    write_json(tmp / f"rng_rank{rank}.json", rng_state())
    barrier(world)
    problems: list[str] = []
    if rank == 0:
        problems = verify_checkpoint_files(tmp, world, zero_stage)
        if not problems:
            commit_checkpoint(tmp, {"step": step, "world_size": world, "zero_stage": zero_stage, **(info or {})}, keep)
    failed = all_reduce_sum(torch.tensor([1.0 if problems else 0.0]), world, engine.device)
    if failed.item():
        raise RuntimeError(f"checkpoint of step {step} in '{tmp}' is incomplete ({'; '.join(problems) or 'see rank 0'}); "
                           f"the previous checkpoint stays in 'latest'")
    return final


def begin_checkpoint(ckpt_dir: Path, step: int) -> Path:
    """An empty ``tmp-step<N>`` folder to write step ``step``'s files into (an older one is removed)."""
    tmp = Path(ckpt_dir) / f"{TMP_PREFIX}step{step}"
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        _remove_dir(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: Path, info: dict, keep: int) -> Path:
    """Make the fully written ``tmp-step<N>`` folder a checkpoint: fsync it, write ``complete.json``
    (``info`` plus the size and sha256 of every file), rename it to ``step<N>``, name it in
    ``latest`` and rotate (:func:`rotate_checkpoints`). Returns the ``step<N>`` folder."""
    tmp = Path(tmp)
    ckpt_dir, final = tmp.parent, tmp.parent / tmp.name[len(TMP_PREFIX):]
    _fsync_tree(tmp)
    write_json(tmp / DONE_MARKER, {**info, "time": time.time(), "files": file_records(tmp)})
    if final.exists():  # a re-run of the same step (resumed from an older checkpoint)
        _remove_dir(final)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpt_dir / "latest")
    rotate_checkpoints(ckpt_dir, keep)
    return final


def rotate_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all) and the one ``latest`` names;
    remove interrupted saves (``tmp-*``) and leftovers of earlier removals. Call between saves."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    done = complete_checkpoints(ckpt_dir)
    if keep > 0:
        for _, p in done[:-keep]:
            if p.name != latest:
                _remove_dir(p)
    for p in list(ckpt_dir.iterdir()):
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            _remove_dir(p)
        elif p.is_dir() and p.name.startswith(".deleting-"):
            shutil.rmtree(p, ignore_errors=True)


def read_rng_file(path: Path) -> dict:
    """An ``rng_rank*.json`` of a checkpoint, checked; a corrupted one is a ValueError naming it."""
    try:
        st = json.loads(Path(path).read_text())
        py, npst, tst = st["python"], st["numpy"], st["torch"]
        if not (len(py) == 3 and len(npst) == 5 and isinstance(tst, list) and tst):
            raise ValueError("wrong shape")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"RNG state file '{path}' is corrupted ({type(e).__name__}: {e}); "
                         f"resume from another checkpoint (--resume .../stepN)") from None
    return st


def load_for_resume(engine, ckpt: Path, rank: int) -> int:
    """Load model, optimizer, scheduler and this rank's RNG state; return the step to continue from."""
    load_path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None or client is None or "step" not in client:
        raise FileNotFoundError(f"checkpoint '{ckpt}' could not be loaded by DeepSpeed (files missing or another ZeRO layout)")
    rng_file = ckpt / f"rng_rank{rank}.json"
    if rng_file.is_file():
        set_rng_state(read_rng_file(rng_file))
    else:
        print(f"warning: '{rng_file}' is missing (saved with fewer ranks?); RNG state of rank {rank} is not restored",
              file=sys.stderr, flush=True)
    return int(client["step"])
