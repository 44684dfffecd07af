"""Self-check of the compiled ops: the first time an op is used in a process on a (device, dtype), a probe of a
few small cases compares its output and every input gradient with the op's pure-PyTorch reference; an op that
disagrees (or crashes) is never used for that (device, dtype) in this process.

    from cuda import selfcheck
    selfcheck.register("monarch_multiply", monarch_probe)      # once, where the op is defined
    selfcheck.ensure("monarch_multiply", x.device, x.dtype)    # before each use; raises SelfCheckFailed

A probe is a function ``(device, dtype) -> [Case]``; each case holds the kernel function, the reference
function, float64 inputs (every one is differentiated) and an output gradient. Per case the comparison is the
flash-attention rule: with ``exact`` = the reference in float64, the kernel's max abs error against ``exact``
(output with and without autograd, and each gradient) must be at most 2x the error of the reference computed in
the probed dtype, plus ``FLOOR[dtype]`` times the quantity's max magnitude. A wrong index costs an O(1) error
on some elements and fails; a different summation order does not.

``SelfCheckFailed`` is a ``NotImplementedError``: the layers' ``impl='auto'`` falls back to the reference on it
(with their one warning, which names the case and the error) and ``impl='kernel'`` lets it propagate. Results
are cached per (op, device, dtype). ``MONARCH_SEAM_SKIP_SELFCHECK=1`` skips the probe (raw launches for
benchmarks). The probe runs outside autocast, with autograd on, on its own seeded generator (the caller's RNG
streams are untouched). Under ``torch.compile`` the check runs once at trace time (``assume_constant_result``).
"""
import os
import threading
from dataclasses import dataclass
from typing import Callable, List

import torch

# Per-dtype error floor, relative to the max magnitude of the quantity compared (see the module docstring).
FLOOR = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

_lock = threading.Lock()
_results = {}  # (op, device string, dtype) -> "" (passed or skipped) or the failure text
_probes = {}  # op name -> probe function (device, dtype) -> [Case]


class SelfCheckFailed(NotImplementedError):
    """The compiled op disagreed with its reference (or raised) on a probe case of this device and dtype."""


@dataclass
class Case:
    name: str                 # what the case covers, e.g. "rectangular, 70 rows (packed-GEMM path)"
    kernel: Callable          # kernel(*inputs) -> output, the compiled path under test (no self-check inside)
    ref: Callable             # ref(*inputs) -> output, the pure-PyTorch reference
    inputs: List[torch.Tensor]  # float64, on the probed device; all are differentiated
    grad: torch.Tensor        # float64 output gradient


def skipped():
    return os.environ.get("MONARCH_SEAM_SKIP_SELFCHECK", "0") == "1"


def _device_key(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _run(fn, inputs, grad, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, grad.to(out.dtype))
    return [out] + list(grads)


def _compare(case, dtype):
    """'' when the kernel passes this case, else 'quantity: error ... > bound ...'."""
    names = ["out"] + [f"grad of input {i}" for i in range(len(case.inputs))]
    exact = _run(case.ref, case.inputs, case.grad, torch.float64)
    base = exact if dtype == torch.float64 else _run(case.ref, case.inputs, case.grad, dtype)
    got = _run(case.kernel, case.inputs, case.grad, dtype)
    with torch.no_grad():  # the forward-only path of the op (no activations saved)
        got_nograd = case.kernel(*[t.to(dtype) for t in case.inputs])
    names.append("out (no grad)")
    exact, base, got = exact + exact[:1], base + base[:1], got + [got_nograd]
    for name, g, b, e in zip(names, got, base, exact):
        if g.shape != e.shape or g.dtype != dtype:
            return f"{name}: got {tuple(g.shape)} {g.dtype}, expected {tuple(e.shape)} {dtype}"
        err = (g.double() - e).abs().max().item() if e.numel() else 0.0
        bound = 2 * ((b.double() - e).abs().max().item() if e.numel() else 0.0)
        bound += FLOOR.get(dtype, 1e-2) * (e.abs().max().item() if e.numel() else 0.0)
        if not err <= bound:  # also catches NaN
            return f"{name}: max abs error {err:.3g} > bound {bound:.3g}"
    return ""


def register(op, cases):
    """Make ``cases`` (a function ``(device, dtype) -> [Case]``) the probe of ``op``."""
    _probes[op] = cases


def probe(op, device, dtype):
    """Run every case of ``op``'s probe on (device, dtype): '' if all pass, else the first failure (case and error)."""
    device = torch.device(device)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for case in _probes[op](device, dtype):
            try:
                err = _compare(case, dtype)
            except Exception as e:  # a crash of the kernel counts as a failure, with its message
                err = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if err:
                return (f"{op} self-check failed on {device} {str(dtype).replace('torch.', '')}, case "
                        f"'{case.name}': {err}")
    return ""


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing, a constant after
def _result(op, device, dtype):
    key = (op, device, dtype)
    err = _results.get(key)
    if err is None:
        with _lock:
            err = _results.get(key)
            if err is None:
                err = _results[key] = "" if skipped() else probe(op, device, dtype)
    return err


def ensure(op, device, dtype):
    """Raise ``SelfCheckFailed`` unless ``op`` passed its probe on (device, dtype); probes on first use."""
    err = _result(op, _device_key(device), dtype)
    if err:
        raise SelfCheckFailed(err)


def results():
    """{(op, device, dtype): '' or failure text} of this process (for reports and tests)."""
    return dict(_results)


def generator(seed):
    """A seeded CPU generator for probe inputs (created on the CPU, then moved, so every device sees the same)."""
    return torch.Generator().manual_seed(seed)
