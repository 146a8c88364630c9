"""Process-group helpers shared by training, benchmarks and the launchers."""
from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from unified_wm.utils import extensions_dir

if TYPE_CHECKING:
    import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int]:
    """Rank and world size; a plain process becomes a world of one for DeepSpeed."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    ext_dir = extensions_dir()
    if ext_dir is not None:
        # DeepSpeed JIT-builds a C++ op at init (CPU: shared-memory comm) into this folder
        os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir
        remove_stale_build_lock(os.path.join(ext_dir, "deepspeed_shm_comm"))
    import deepspeed
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    release_shm_buffer(rank, world)
    return rank, world


STALE_BUILD_LOCK_S = 900


def remove_stale_build_lock(build_dir: str, max_age_s: float = STALE_BUILD_LOCK_S) -> bool:
    """Remove torch's extension-build lock file in ``build_dir`` when it is older than any build
    takes. The loader's lock is a file that later processes wait on until it is gone: a build
    killed half-way (Ctrl-C in a run's first seconds) left it, and every later run waited for
    ever at start-up. Returns whether one was removed."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return False
    if age < max_age_s:
        return False
    try:
        os.unlink(lock)
    except OSError:
        return False
    print(f"[uwm] removed '{lock}', left {age / 60:.0f} min ago by a build that was stopped half-way", flush=True)
    return True


def shm_buffer_path(rank: int) -> str:
    """The shared-memory file DeepSpeed's CPU all-reduce op makes for ``rank`` of this job
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: user id, master address and port, rank)."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"


def release_shm_buffer(rank: int, world: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed never removes these files (about 69 MB per rank on CPU): each run left its
    buffers in ``/dev/shm``, which is memory, until a machine that runs many jobs ran out of
    it. The mappings outlive the name, so after a barrier (every rank has opened every other
    rank's buffer during ``init_distributed``) the name can go, and a run that crashes or is
    killed leaves nothing behind either."""
    barrier(world)
    try:
        os.unlink(shm_buffer_path(rank))
    except FileNotFoundError:
        pass


def all_reduce_sum(x: torch.Tensor, world: int, device) -> torch.Tensor:
    """Sum a small tensor over ranks (on the engine's device, so NCCL works too); a copy on CPU."""
    if world <= 1:
        return x.clone()
    import torch.distributed as dist

    y = x.to(device)
    dist.all_reduce(y)
    return y.cpu()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
