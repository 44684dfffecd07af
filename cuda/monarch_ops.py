"""Python side of the compiled Monarch op (`torch.ops.monarch_seam.*`).

    from cuda.monarch_ops import monarch_multiply, kernel_available
    ok, err = kernel_available()                 # builds the CPU extension once (cached on disk)
    out = monarch_multiply(x, w1, w2)            # x (..., K*P), w1 (K, Q, P), w2 (L, S, R) -> (..., L*S)

Same math as `layers.monarch.monarch_multiply_ref`. Ops (schemas in cuda/monarch.cpp):
  monarch_fwd(x, w1, w2) -> out                  x (B, K*P), out (B, L*S)
  monarch_fwd_h(x, w1, w2) -> (out, h)           h: the stage-1 activations (B*K*Q,) in a
                                                 device-specific layout, saved for backward
  monarch_bwd(grad, x, w1, w2, h?) -> (dx, dw1, dw2)   h=None recomputes stage 1
  cpu_route(dir, [B, K, P, Q, L, S, R], dtype) -> str   the CPU route taken for a shape (below)
Fake (meta) kernels and autograd formulas are registered here, so the ops work under
`torch.compile(fullgraph=True)` and pass `torch.library.opcheck`.

How a CPU call picks its path, from the shape (cuda/monarch.cpp, "routes" and "route choice"): three compiled
routes compute the same product: `engine` (the hand-written packed-GEMM engine, permutations read in place),
`aten` (the two-bmm algorithm of the reference, through ATen) and `blas` (the BLAS torch ships, MKL or
OpenBLAS, for the block products, by row tiles in L2). Products of under 4 MFLOP take `aten`. For larger ones,
the first call of a shape key (direction: `fwd` without autograd, `fwd_h` with it; the factor shapes, dtype,
thread count and the token count rounded up to a power of two) times all three (on synthetic inputs of the
shape, interleaved rounds, best of each) and keeps the fastest (`aten` unless another route beats it by 5%);
the decisions are cached in `cpu_routes.txt` beside the build (MONARCH_SEAM_TUNE_FILE: elsewhere), so later
processes on the same CPU do not measure again.
`monarch_multiply` asks for that decision first (`cpu_path`, one dict lookup after the first call of a key;
with autograd on, the decision covers the backward's route too; a call whose shapes, dtypes, grad mode and thread
count took the reference before goes there after one lookup, `_ref_calls`) and calls
`layers.monarch.monarch_multiply_ref` itself instead of the op where
  - every direction keeps the `aten` route (without autograd the forward, with it the forward and the backward):
    no compiled route beats the reference's own algorithm there by more than its noise, and the reference runs
    without the op's call and autograd-function overheads; or
  - the product is under 256 MFLOP and the reference, timed against the op as a whole call (forward, or forward
    and backward with autograd; on synthetic inputs, interleaved rounds, about 0.1 s, once per route key and
    cached in the same file as a `call_` line), was not beaten by 5%: at small token counts the op's overhead
    (~5 us a call, ~50 us a training step) can outweigh its route's gain, by an amount that differs between CPUs.
So the product is never slower than the reference by more than the timing noise, whatever the shape and CPU;
where it calls the reference the result is the reference's, bit for bit. Otherwise it calls the op, each
direction on its own route (one direction may be `aten`: e.g. 3072->768 at nblocks 4 on an Intel Xeon, whose
forward gains little over the two-bmm algorithm and whose backward gains ~40% on the `blas` route).
Under torch.compile the graph always calls the op (a decision cannot be a constant of a graph whose batch size
may be symbolic); the op's own route choice then applies per call, its `aten` route being the reference's
algorithm.
MONARCH_SEAM_CPU_ROUTE=engine|aten|blas forces one route of the op for every call, the reference branch
included (e.g. for bit-identical runs across machines, since routes sum in different orders).

Self-check (cuda/selfcheck.py): before `monarch_multiply` first computes on a (device, dtype) it runs
`_probe_cases` (square, rectangular, non-divisible and larger-than-a-tile factors, few and many rows)
through the compiled path and the reference, output and all gradients; on a mismatch it raises
`selfcheck.SelfCheckFailed` (a NotImplementedError) for that (device, dtype).
"""
import math
import os
import warnings

import torch

from cuda import build, selfcheck
from layers.monarch import _monarch_product, monarch_multiply_ref

_registered = False


def _fwd_fake(x, w1, w2):
    return x.new_empty((x.shape[0], w2.shape[0] * w2.shape[1]))


def _fwd_h_fake(x, w1, w2):
    return _fwd_fake(x, w1, w2), x.new_empty((x.shape[0] * w1.shape[0] * w1.shape[1],))


def _bwd_fake(grad, x, w1, w2, h):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _setup_fwd(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2)


def _backward_fwd(ctx, grad):
    x, w1, w2 = ctx.saved_tensors
    return tuple(torch.ops.monarch_seam.monarch_bwd(grad, x, w1, w2, None))


def _setup_fwd_h(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2, output[1])


def _backward_fwd_h(ctx, grad, grad_h):
    # h is an internal buffer that monarch_multiply never returns, so grad_h carries nothing.
    x, w1, w2, h = ctx.saved_tensors
    return tuple(torch.ops.monarch_seam.monarch_bwd(grad, x, w1, w2, h))


def tune_file_path():
    """The CPU route file: MONARCH_SEAM_TUNE_FILE, else cpu_routes.txt in the CPU extension's build folder."""
    return os.environ.get("MONARCH_SEAM_TUNE_FILE") or os.path.join(build.cpu_build_dir(), "cpu_routes.txt")


def _register():
    """Load the extension and register the Python-side pieces once. Raises on failure."""
    global _registered
    if _registered:
        return
    ok, err = build.load_cpu()
    if not ok:
        raise RuntimeError(f"monarch_seam extension unavailable: {err}")
    # The CPU op's per-shape route decisions (see "route choice" in cuda/monarch.cpp) live beside the build
    # (MONARCH_SEAM_TUNE_FILE: elsewhere). A file from another CPU or with a damaged line is ignored, once,
    # loudly, and rewritten with what this process measures.
    path = tune_file_path()
    torch.ops.monarch_seam._set_tune_file(path)
    problem = torch.ops.monarch_seam._load_tune_file()
    if problem:
        warnings.warn(f"monarch_seam: ignoring the CPU route cache {path}: {problem}; routes are measured "
                      "again and the file is rewritten", RuntimeWarning, stacklevel=3)
    global _forced_route
    forced = os.environ.get("MONARCH_SEAM_CPU_ROUTE", "auto")
    _forced_route = None if forced in ("", "auto") else forced  # (an invalid name: the op's first call raises)
    lib = "monarch_seam::"
    torch.library.register_fake(lib + "monarch_fwd")(_fwd_fake)
    torch.library.register_fake(lib + "monarch_fwd_h")(_fwd_h_fake)
    torch.library.register_fake(lib + "monarch_bwd")(_bwd_fake)
    torch.library.register_autograd(lib + "monarch_fwd", _backward_fwd, setup_context=_setup_fwd)
    torch.library.register_autograd(lib + "monarch_fwd_h", _backward_fwd_h,
                                    setup_context=_setup_fwd_h)
    _registered = True


def kernel_available(device=None):
    """(ok, error_text): whether the compiled op can run on `device` (default CPU). Builds once."""
    try:
        _register()
    except Exception as e:
        return False, str(e)
    if device is not None and torch.device(device).type == "cuda":
        return build.load_cuda()
    return True, ""


def _check(x, w1, w2):
    if not (isinstance(x, torch.Tensor) and isinstance(w1, torch.Tensor) and isinstance(w2, torch.Tensor)):
        raise ValueError("monarch_multiply: x, w1, w2 must be tensors")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"monarch_multiply: w1 must be (K, Q, P) and w2 (L, S, R); got w1 "
                         f"{tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if x.dim() < 1 or x.shape[-1] != k * p:
        raise ValueError(f"monarch_multiply: x.shape[-1] must be K*P={k * p}, got x {tuple(x.shape)}")
    if k * q != l * r:
        raise ValueError(f"monarch_multiply: need K*Q == L*R, got w1 {tuple(w1.shape)} and w2 "
                         f"{tuple(w2.shape)}")
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"monarch_multiply: x, w1, w2 dtypes differ ({x.dtype}, {w1.dtype}, {w2.dtype})")
    # (is_cpu first: building three torch.device objects costs more than a small product's dispatch)
    if not (x.is_cpu and w1.is_cpu and w2.is_cpu) and not (x.device == w1.device == w2.device):
        raise ValueError("monarch_multiply: x, w1, w2 must be on one device")


def _kernel_multiply(x, w1, w2):
    """The compiled product, without checks: the path the self-check probes and every call then takes."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    need_grad = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad)
    if need_grad:
        out = torch.ops.monarch_seam.monarch_fwd_h(x2, w1, w2)[0]
    else:
        out = torch.ops.monarch_seam.monarch_fwd(x2, w1, w2)
    return out.reshape(*lead, w2.shape[0] * w2.shape[1])


def _probe_cases(device, dtype):
    """Probe of the self-check: (name, (k, q, p, l, s, r), leading batch shape). MonarchLinear's shapes for
    32->32, 24->96 and 37->100 with nblocks 4, 4, 3, and 80->272 with nblocks 2 (160 rows > a 128-row tile,
    s = 136 > a 128-column tile). On the CPU the op picks a route per shape: the three small cases are under its
    4 MFLOP threshold (ATen two-bmm route), the large one (4.5 MFLOP) above it, where the route it measures
    fastest is the one checked; MONARCH_SEAM_CPU_ROUTE=engine|aten|blas puts every case on one route (the tests
    probe each). On CUDA every GEMM of the plan runs, on WMMA tiles for fp16/bf16."""
    spec = [("square 32->32, 8 rows", (4, 8, 8, 4, 8, 8), (8,)),
            ("rectangular 24->96, 70 rows", (4, 6, 6, 4, 24, 6), (70,)),
            ("non-divisible 37->100, 5 rows in (5, 1) batch", (3, 13, 13, 3, 34, 13), (5, 1)),
            ("larger than a tile 80->272, 160 rows", (2, 40, 40, 2, 136, 40), (160,))]
    gen = selfcheck.generator(1234)
    cases = []
    for name, (k, q, p, l, s, r), lead in spec:
        w1 = torch.randn(k, q, p, dtype=torch.float64, generator=gen) / math.sqrt(p)
        w2 = torch.randn(l, s, r, dtype=torch.float64, generator=gen) / math.sqrt(r)
        x = torch.randn(*lead, k * p, dtype=torch.float64, generator=gen)
        g = torch.randn(*lead, l * s, dtype=torch.float64, generator=gen)
        cases.append(selfcheck.Case(name, lambda *a: _kernel_multiply(*a), monarch_multiply_ref,
                                    [t.to(device) for t in (x, w1, w2)], g.to(device)))
    return cases


selfcheck.register("monarch_multiply", _probe_cases)


# ---------------------------------------------------------------- dispatch by shape (CPU)
# (grad mode, dtype, rows, w1 shape, w2 shape, threads) -> the route the compiled op takes there, as decided
# (measured once per key of the op's route choice, cached in cpu_routes.txt; see _cpu_decide in monarch.cpp).
# "ref" where the reference itself is the faster path: monarch_multiply then calls the reference.
_route_memo = {}
# CPU calls that took the reference after their checks and self-check passed, by (x, w1, w2 shapes and dtypes, grad
# mode, threads): a later call with the same key goes to the reference at once. The full path costs only ~3.5 us
# of Python, but measured on an Intel Xeon (64 tokens, 1024->1024 nblocks 4, autograd) the reference product
# after it took ~40 us longer than the bare reference (5-8%), and after this lookup ~3-17 us.
_ref_calls = {}
_forced_route = None  # MONARCH_SEAM_CPU_ROUTE: every call takes the op on this route (read once, as in the C++ side)
_TUNE_FLOPS = 4e6  # products under this take the op's aten route without measuring (kTuneFlops in monarch.cpp)
# Products under this many forward FLOPs are also timed as whole calls, the op against the reference: there the
# op's call and autograd-function overhead (~5 us without autograd, ~50 us for a training step, measured on the
# 2-core test machines) is not surely below the gain of its route, which the C++ side measures without it (at
# 8 tokens, 1024->1024 nblocks 4, the op's forward was 0.95x the reference on its fastest route; at 64 tokens
# anywhere from 0.93x to 1.65x by CPU). From 256 MFLOP, 5% of a call is ~80 us or more: the route decides.
_VERDICT_FLOPS = 256e6
_VERDICT_MARGIN = 0.05  # the op must beat the reference by this (within it: timing noise; the reference wins)


def _measure_verdict(need_grad, dtype, rows, w1_shape, w2_shape):
    """"op" or "ref": which whole call is faster for this shape, the op on its decided routes or the reference,
    timed on synthetic inputs as the caller would run it (forward, or forward and backward with autograd), in
    interleaved rounds (op, ref, op, ref, ...; a burst of load slows a round of both), the best of each, about
    0.1 s in all; the reference unless the op is faster by _VERDICT_MARGIN."""
    import time
    (k, q, p), (l, s, r) = w1_shape, w2_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k * p, dtype=dtype, generator=gen)
    w1 = torch.randn(k, q, p, dtype=dtype, generator=gen) / math.sqrt(p)
    w2 = torch.randn(l, s, r, dtype=dtype, generator=gen) / math.sqrt(r)
    grad = torch.randn(rows, l * s, dtype=dtype, generator=gen)
    leaves = [t.requires_grad_(need_grad) for t in (x, w1, w2)]

    def run(fn):
        # (autocast off: the caller's dtype is the one decided for; autocast would run the reference's bmm lower)
        with torch.set_grad_enabled(need_grad), torch.autocast("cpu", enabled=False):
            y = fn(*leaves)
            if need_grad:
                torch.autograd.grad(y, leaves, grad)

    paths = (_kernel_multiply, _monarch_product)
    t0 = time.perf_counter()
    for fn in paths:
        run(fn)  # warm-up: first-touch allocations, thread pool
    pair = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(2e-3 / pair))  # per timing: ~1 ms of each path, well above the clock's resolution
    rounds = max(5, min(20, int(0.1 / (pair * calls))))
    best = [math.inf, math.inf]
    for _ in range(rounds):
        for i, fn in enumerate(paths):
            t0 = time.perf_counter()
            for _ in range(calls):
                run(fn)
            best[i] = min(best[i], (time.perf_counter() - t0) / calls)
    return "op" if best[0] * (1 + _VERDICT_MARGIN) < best[1] else "ref"


def _decide(need_grad, dtype, rows, w1_shape, w2_shape):
    (k, q, p), (l, s, r) = w1_shape, w2_shape
    flops = 2.0 * rows * (k * q * p + l * s * r)
    if _forced_route:
        return _forced_route + ("+" + _forced_route if need_grad else "")
    if dtype not in (torch.float32, torch.float64):
        return "aten"  # the op computes in float32 inside; the reference would run in the low precision
    direction, dims = ("fwd_h" if need_grad else "fwd"), [rows, k, p, q, l, s, r]
    if flops < _TUNE_FLOPS:
        route = "aten"  # the op's route at this size (routes are not timed here); the verdict below decides
    else:
        # "fwd_h" answers "fwd+bwd"; where every direction keeps the two-bmm route, the op would run the
        # reference's algorithm plus its own overhead: the reference
        route = torch.ops.monarch_seam._cpu_decide(direction, dims, dtype)
        if route in ("aten", "aten+aten"):
            return "ref"
    if flops >= _VERDICT_FLOPS:
        return route
    verdict = torch.ops.monarch_seam._cpu_verdict(direction, dims, dtype)
    if not verdict:
        verdict = _measure_verdict(need_grad, dtype, rows, w1_shape, w2_shape)
        torch.ops.monarch_seam._set_cpu_verdict(direction, dims, dtype, verdict)
    return "ref" if verdict == "ref" else route


def cpu_path(x, w1, w2):
    """Which CPU path ``monarch_multiply(x, w1, w2)`` takes in the current grad mode: "ref" (the reference,
    ``layers.monarch.monarch_multiply_ref``, itself) or the compiled op's route: without autograd "engine",
    "aten" or "blas"; with autograd the forward's and the backward's, "fwd+bwd" (e.g. "aten+blas"); "aten" for
    products under 4 MFLOP that the op wins and for dtypes other than float32/float64.
    Decides (measures the routes, and under 256 MFLOP the op against the reference) if this shape key has not
    been seen on this CPU; see the module docstring. While
    torch.compile traces it is "op": the compiled op, which picks its route per call at run time."""
    if torch.compiler.is_compiling():
        # in a compiled graph the op itself (whose route is decided per call at run time): a route decision
        # cannot be a constant of a graph whose batch size may be symbolic (dynamic shapes)
        return "op"
    if not _registered:
        _register()
    need_grad = (x.requires_grad or w1.requires_grad or w2.requires_grad) and torch.is_grad_enabled()
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    key = (need_grad, x.dtype, rows, w1.shape, w2.shape, torch.get_num_threads())
    route = _route_memo.get(key)
    if route is None:
        if len(_route_memo) > 4096:  # e.g. inference over many sequence lengths: keep it bounded
            _route_memo.clear()
        route = _route_memo[key] = _decide(*key[:5])
    return route


def _ref_key(x, w1, w2):
    need_grad = (x.requires_grad or w1.requires_grad or w2.requires_grad) and torch.is_grad_enabled()
    return (x.shape, w1.shape, w2.shape, x.dtype, w1.dtype, w2.dtype, need_grad, torch.get_num_threads())


def monarch_multiply(x, w1, w2):
    """Monarch product with the compiled op. x (..., K*P), w1 (K, Q, P), w2 (L, S, R),
    K*Q == L*R -> (..., L*S). Differentiable in x, w1, w2. On the CPU the path is picked per call from the
    shape (see ``cpu_path`` and the module docstring): where no compiled route beats the reference's two-bmm
    algorithm by 5% (measured once per shape key, for the backward too when autograd is on), and under 256 MFLOP
    where the whole op call does not beat the reference by 5%, this calls ``layers.monarch.monarch_multiply_ref``
    itself, so the result is the reference's, bit for bit, at its speed. Raises NotImplementedError for a device it has no kernel
    for, and selfcheck.SelfCheckFailed (a NotImplementedError) where the kernel failed its self-check."""
    if (_ref_calls and isinstance(x, torch.Tensor) and isinstance(w1, torch.Tensor) and isinstance(w2, torch.Tensor)
            and x.is_cpu and w1.is_cpu and w2.is_cpu and not torch.compiler.is_compiling()
            and _ref_key(x, w1, w2) in _ref_calls):
        return _monarch_product(x, w1, w2)  # as below, for a key that got there before
    _check(x, w1, w2)
    # Plain global flags first, so that torch.compile only sees the op call once things are loaded.
    if not _registered:
        _register()
    if x.is_cpu:
        # the self-check first: the path decision may time the op (the verdict), which must not run untested
        selfcheck.ensure("monarch_multiply", x.device, x.dtype)
        if cpu_path(x, w1, w2) == "ref":  # never while torch.compile traces (cpu_path is "op" there)
            if len(_ref_calls) > 4096:  # bounded, as _route_memo
                _ref_calls.clear()
            _ref_calls[_ref_key(x, w1, w2)] = True
            return _monarch_product(x, w1, w2)  # monarch_multiply_ref, its checks made above
    elif x.is_cuda:
        if not build.cuda_loaded():
            ok, err = build.load_cuda()
            if not ok:  # NotImplementedError: the layers' documented signal to fall back to the reference
                raise NotImplementedError(f"monarch_seam CUDA kernels unavailable: {err}")
        selfcheck.ensure("monarch_multiply", x.device, x.dtype)
    else:
        raise NotImplementedError(f"no monarch_seam kernel for device {x.device.type!r}")
    return _kernel_multiply(x, w1, w2)
