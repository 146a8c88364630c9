"""The compiled CPU kernel of Mixture-of-Contexts attention (``moc_cpu.cpp`` beside this file):
built on first use by torch's C++ extension loader, cached per CPU and source, and optional
(without a compiler every caller falls back to pure torch, with the same results)."""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: the loader's own lock alone
    fcntl = None

# ``gather`` on CPU first tries its compiled kernel (``moc_cpu.cpp`` next to this file,
# built by torch's C++ extension loader on first use and cached); it falls back to the
# pure-torch tile loop below when no compiler is available, when the head dim is not a
# multiple of 16, or when this flag (or the environment variable UWM_MOC_CPU_KERNEL=0)
# turns it off.
GATHER_KERNEL_CPU = os.environ.get("UWM_MOC_CPU_KERNEL", "1") != "0"
# Queries per segment of the compiled kernel's work lists (cache / TLB locality).
KERNEL_SEGMENT = 1024
_CPU_EXT = None


def _extensions_dir():
    try:  # not there when an exported folder's copy of this file runs without the package
        from unified_wm.utils import extensions_dir
    except ImportError:
        return None
    return extensions_dir()


@contextmanager
def build_lock(build: Path | None):
    """Hold an OS lock on ``build`` while torch's extension loader runs there.

    The loader's own lock is a file (``lock``) that a waiting process polls until it is gone,
    so a build killed half-way left it behind and every later call waited for ever. The OS
    releases this lock when its holder dies: whoever holds it is the only one of our processes
    in the loader, so a ``lock`` file it finds was left by a dead one and is removed."""
    if build is None or fcntl is None:
        yield
        return
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "uwm_build.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build / "lock"
            if stale.exists():
                warnings.warn(f"removed '{stale}', left by a build that was stopped half-way")
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cpu_kernel():
    """The compiled CPU kernel module, or None (built once per machine, then cached)."""
    global _CPU_EXT
    if _CPU_EXT is None:
        _CPU_EXT = False
        if GATHER_KERNEL_CPU:
            try:
                from torch.utils.cpp_extension import load

                # -march=native code must not be reused on another CPU: the name carries
                # a hash of the CPU's feature flags (and the source, via torch's versioning)
                flags = ""
                try:
                    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))), "")
                except OSError:
                    pass
                # and of the source's path: ninja rebuilds a folder whose build file names another
                # checkout's source, so two checkouts sharing one folder would rebuild in turn.
                src = Path(__file__).resolve().with_name("moc_cpu.cpp")
                if not src.is_file():  # an exported folder loaded without the package: the torch tiles
                    return None
                tag = hashlib.sha1(f"{platform.machine()} {flags} {src}".encode()).hexdigest()[:10]
                name = f"uwm_moc_cpu_{tag}"
                root = _extensions_dir()  # the folder training uses too, so rollout/eval reuse its build
                build = Path(root) / name if root is not None else None
                kw = {}
                if build is not None:
                    build.mkdir(parents=True, exist_ok=True)
                    kw["build_directory"] = str(build)
                else:
                    try:  # only for the note below (a private torch helper: never fatal)
                        from torch.utils.cpp_extension import _get_build_directory

                        build = Path(_get_build_directory(name, verbose=False))
                    except Exception:
                        pass
                if build is None or not any(p.stat().st_mtime >= src.stat().st_mtime for p in build.glob("*.so")):
                    print(f"[uwm] building the MoC CPU attention kernel in {build or 'torch_extensions'} "
                          "(first use of this source on this machine, ~20 s)", file=sys.stderr, flush=True)
                with build_lock(build):
                    _CPU_EXT = load(name=name, sources=[str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                    extra_ldflags=["-fopenmp"], verbose=False, **kw)
            except Exception as e:  # no compiler, no headers, an unsupported CPU...
                warnings.warn(f"the MoC CPU kernel could not be built ({type(e).__name__}: {str(e)[:300]}); "
                              "the gather backend uses its pure-torch tiles instead (slower, same results)")
    return _CPU_EXT or None
