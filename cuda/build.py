"""Lazy, cached build of the monarch_seam C++/CUDA extensions.

Two separate `torch.utils.cpp_extension.load` targets:
  * `monarch_seam_cpu`  <- cuda/monarch.cpp (op schemas + CPU Monarch) + cuda/butterfly_cpu.cpp
    (fused CPU butterfly); never needs nvcc
    (monarch.cpp and the CUDA sources include cuda/monarch_plan.h, the CUDA op's GEMM plan)
  * `monarch_seam_cuda` <- cuda/monarch_cuda.cu + cuda/butterfly_cuda.cu (CUDA kernels),
    built only when a CUDA toolkit is found and torch has CUDA.
Each goes into `$MONARCH_SEAM_EXT_DIR/<hash>` or `~/.cache/monarch_seam_ext/<hash>`, where the
hash covers the sources, the torch version and the flags, so an edited source rebuilds.

    from cuda.build import load_cpu, load_cuda, kernel_available
    ok, err = kernel_available()            # builds (once per process) and loads the CPU ops

Environment: MONARCH_SEAM_EXT_DIR (cache root), CUDA_HOME / CUDA_PATH (toolkit),
TORCH_CUDA_ARCH_LIST (defaults to "8.0;9.0" when no GPU is visible),
MONARCH_SEAM_FORCE_BUILD_FAIL=1 (pretend the build fails; used by the fallback test),
MONARCH_SEAM_VERBOSE=1 (show compiler output).
"""
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CPU_SOURCES = [HERE / "monarch.cpp", HERE / "butterfly_cpu.cpp"]
CUDA_SOURCES = [HERE / "monarch_cuda.cu", HERE / "butterfly_cuda.cu"]
HEADERS = [HERE / "monarch_plan.h", HERE / "cpu_isa.h"]  # included by the sources; part of every build hash
CPU_CFLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
DEFAULT_ARCHS = "8.0;9.0"
STANDARD_CUDA = "/usr/local/cuda"

_lock = threading.Lock()
_state = {}  # target name -> (ok: bool, error text)


def find_cuda_home():
    """Return a CUDA toolkit root containing include/cuda_runtime.h, or None.

    Order: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then the real path of `nvcc` on PATH, then
    the target of the exec line of an `nvcc` wrapper script (torch's own guess takes the parent
    of the wrapper's folder, which is wrong when the wrapper lives outside the toolkit)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), STANDARD_CUDA]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        cands.append(str(real.parent.parent))
        try:
            head = real.read_bytes()[:4096]
            if head.startswith(b"#!"):
                for word in head.decode(errors="replace").split():
                    if word.endswith("/bin/nvcc"):
                        cands.append(str(Path(word).resolve().parent.parent))
        except OSError:
            pass
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file() and (Path(c) / "bin" / "nvcc").exists():
            return str(Path(c).resolve())
    return None


def _hash(sources, flags):
    h = hashlib.sha256()
    for s in list(sources) + HEADERS:
        h.update(s.name.encode())
        h.update(s.read_bytes())
    h.update(torch.__version__.encode())
    h.update(repr(flags).encode())
    return h.hexdigest()[:16]


def _build_dir(name, sources, flags):
    root = os.environ.get("MONARCH_SEAM_EXT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "monarch_seam_ext")
    d = Path(root) / f"{name}-{_hash(sources, flags)}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _import_cpp_extension():
    # On import torch guesses CUDA_HOME from `nvcc` on PATH and logs a warning when no GPU is visible;
    # that guess is wrong for a wrapper script, and load_cuda() sets the right one, so mute it.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _load(name, sources, **kw):
    cpp_extension = _import_cpp_extension()
    verbose = os.environ.get("MONARCH_SEAM_VERBOSE", "0") == "1"
    build_dir = _build_dir(name, sources, kw)
    # copies: cpp_extension.load appends its own flags to the lists it is given, which would change the
    # module's flag lists, hence the hash, hence cpu_build_dir() (where the route file lives) after a build
    kw = {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}
    cpp_extension.load(name=name, sources=[str(s) for s in sources], build_directory=build_dir,
                       is_python_module=False, verbose=verbose, **kw)


def _once(name, fn):
    with _lock:
        if name not in _state:
            if os.environ.get("MONARCH_SEAM_FORCE_BUILD_FAIL", "0") == "1":
                _state[name] = (False, "build disabled by MONARCH_SEAM_FORCE_BUILD_FAIL=1")
            else:
                try:
                    fn()
                    _state[name] = (True, "")
                except Exception as e:  # compiler errors arrive as RuntimeError/OSError/...
                    _state[name] = (False, f"{type(e).__name__}: {e}")
        return _state[name]


def cpu_build_dir():
    """The CPU extension's build folder (per source hash); the CPU route decisions are kept there."""
    return _build_dir("monarch_seam_cpu", CPU_SOURCES, dict(extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS))


def load_cpu():
    """Build/load the CPU extension (op schemas + CPU kernels). Returns (ok, error_text)."""
    return _once("monarch_seam_cpu", lambda: _load(
        "monarch_seam_cpu", CPU_SOURCES, extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS))


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' archs; else DEFAULT_ARCHS."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return DEFAULT_ARCHS


def load_cuda():
    """Build/load the CUDA kernels (needs the CPU extension for the schemas). (ok, error_text)."""
    ok, err = load_cpu()
    if not ok:
        return ok, err

    def build():
        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")
        home = find_cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc "
                               "and include/cuda_runtime.h)")
        cpp_extension = _import_cpp_extension()
        archs = cuda_arch_list()
        old = (os.environ.get("CUDA_HOME"), os.environ.get("TORCH_CUDA_ARCH_LIST"),
               cpp_extension.CUDA_HOME)
        os.environ["CUDA_HOME"] = home
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cpp_extension.CUDA_HOME = home  # torch caches its (possibly wrong) guess at import
        try:
            _load("monarch_seam_cuda", CUDA_SOURCES, extra_cflags=CUDA_CFLAGS,
                  extra_cuda_cflags=NVCC_FLAGS + [f"-DMS_ARCHS={archs.replace(';', '_').replace('.', '')}"])
        finally:
            for key, val in zip(("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"), old[:2]):
                if val is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val
            cpp_extension.CUDA_HOME = old[2]
    return _once("monarch_seam_cuda", build)


def cuda_loaded():
    """True once load_cuda() has succeeded in this process (cheap; no build)."""
    return _state.get("monarch_seam_cuda", (False, ""))[0]


def kernel_available(device=None):
    """(True, '') when the ops are usable on `device` ('cpu' default, or 'cuda'), else
    (False, error text). Builds on first call."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return load_cuda()
    return load_cpu()
