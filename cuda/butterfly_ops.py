"""Python side of the compiled butterfly op (`torch.ops.monarch_seam.butterfly_*`).

    from cuda.butterfly_ops import butterfly_multiply, kernel_available
    y = butterfly_multiply(twiddle, x, increasing_stride=True)
        # twiddle (nstacks, nblocks, log_n, n/2, 2, 2), x (batch, nstacks, n) -> (batch, nstacks, n)

Same math as `layers.butterfly.butterfly_multiply_ref` (see the pair indexing in the twiddle
layout: factor idx of block b has stride 2**idx while the direction is increasing, else
2**(log_n-1-idx); the direction flips after each block). CPU: float32/float64; CUDA: float32
(float64 too). Differentiable in twiddle and x.

Self-check (cuda/selfcheck.py): before `butterfly_multiply` first computes on a (device, dtype) it runs
`_probe_cases` through the compiled op and `butterfly_multiply_ref`, output and both gradients, and raises
`selfcheck.SelfCheckFailed` (a NotImplementedError) for that (device, dtype) on a mismatch.
"""
import math

import torch

from cuda import build, monarch_ops, selfcheck

_registered = False


def _fwd_fake(twiddle, x, increasing_stride):
    return torch.empty_like(x)


def _bwd_fake(grad, twiddle, x, increasing_stride):
    return torch.empty_like(twiddle), torch.empty_like(x)


def _setup(ctx, inputs, output):
    twiddle, x, inc = inputs
    ctx.increasing_stride = inc
    ctx.save_for_backward(twiddle, x)


def _backward(ctx, grad):
    twiddle, x = ctx.saved_tensors
    dtw, dx = torch.ops.monarch_seam.butterfly_bwd(grad, twiddle, x, ctx.increasing_stride)
    return dtw, dx, None


def _register():
    global _registered
    if _registered:
        return
    monarch_ops._register()  # loads the extension (schemas live in cuda/monarch.cpp)
    torch.library.register_fake("monarch_seam::butterfly_fwd")(_fwd_fake)
    torch.library.register_fake("monarch_seam::butterfly_bwd")(_bwd_fake)
    torch.library.register_autograd("monarch_seam::butterfly_fwd", _backward, setup_context=_setup)
    _registered = True


def kernel_available(device=None):
    """(ok, error_text): whether the compiled op can run on `device` (default CPU). Builds once."""
    try:
        _register()
    except Exception as e:
        return False, str(e)
    return monarch_ops.kernel_available(device)  # same extension: its CUDA check is the butterfly's too


def _kernel_multiply(twiddle, x, increasing_stride):
    """The compiled op, without checks: the path the self-check probes and every call then takes."""
    return torch.ops.monarch_seam.butterfly_fwd(twiddle, x, bool(increasing_stride))


def _probe_cases(device, dtype):
    """Probe of the self-check: (nstacks, nblocks, log_n, increasing_stride, batch). Sizes are powers of two
    (the layer pads), so the cases are: one 2x2 factor; 3 stacks x 2 blocks, decreasing first, an odd batch
    (the stacks of a rectangular Butterfly layer); n = 1024, whose 512 pairs per factor exceed the CUDA
    kernel's 256 threads per row, so each thread handles several."""
    from layers.butterfly import butterfly_multiply_ref
    spec = [("one 2x2 factor, n=2", (1, 1, 1, True, 3)),
            ("3 stacks x 2 blocks, n=16, decreasing", (3, 2, 4, False, 37)),
            ("n=1024 (more pairs than threads)", (1, 1, 10, True, 4))]
    gen = selfcheck.generator(4321)
    cases = []
    for name, (nstacks, nblocks, log_n, inc, batch) in spec:
        n = 1 << log_n
        tw = torch.randn(nstacks, nblocks, log_n, n // 2, 2, 2, dtype=torch.float64, generator=gen) / math.sqrt(2)
        x = torch.randn(batch, nstacks, n, dtype=torch.float64, generator=gen)
        g = torch.randn(batch, nstacks, n, dtype=torch.float64, generator=gen)
        cases.append(selfcheck.Case(name, lambda t, xx, inc=inc: _kernel_multiply(t, xx, inc),
                                    lambda t, xx, inc=inc: butterfly_multiply_ref(t, xx, inc),
                                    [tw.to(device), x.to(device)], g.to(device)))
    return cases


selfcheck.register("butterfly_multiply", _probe_cases)


def butterfly_multiply(twiddle, x, increasing_stride=True):
    """twiddle (nstacks, nblocks, log_n, n/2, 2, 2), x (batch, nstacks, n) -> (batch, nstacks, n).
    Raises NotImplementedError for what has no kernel, and selfcheck.SelfCheckFailed (a NotImplementedError)
    where the kernel failed its self-check on this device and dtype."""
    if twiddle.dim() != 6 or twiddle.shape[-2:] != (2, 2):
        raise ValueError(f"butterfly_multiply: twiddle must be (nstacks, nblocks, log_n, n/2, 2, 2), "
                         f"got {tuple(twiddle.shape)}")
    nstacks, _, log_n, half = twiddle.shape[:4]
    n = 1 << log_n
    if half != n // 2 or x.dim() != 3 or x.shape[1] != nstacks or x.shape[2] != n:
        raise ValueError(f"butterfly_multiply: x must be (batch, {nstacks}, {n}) for twiddle "
                         f"{tuple(twiddle.shape)}, got x {tuple(x.shape)}")
    if x.dtype != twiddle.dtype or x.device != twiddle.device:
        raise ValueError("butterfly_multiply: x and twiddle must share dtype and device")
    if x.is_complex():
        raise ValueError("butterfly_multiply: complex twiddles are not supported by the kernel; use impl='ref'")
    # Plain global flags first, so that torch.compile only sees the op call once things are loaded.
    if not _registered:
        _register()
    if x.is_cuda and n * x.element_size() > 48 * 1024:  # the CUDA kernel keeps a row in shared memory
        raise NotImplementedError(f"butterfly CUDA kernel supports n*itemsize <= 48 KiB, got n={n}")
    if x.device.type == "cuda":
        if not build.cuda_loaded():
            ok, err = build.load_cuda()
            if not ok:  # NotImplementedError: the layers' documented signal to fall back to the reference
                raise NotImplementedError(f"monarch_seam CUDA kernels unavailable: {err}")
    elif x.device.type != "cpu":
        raise NotImplementedError(f"no monarch_seam kernel for device {x.device.type!r}")
    selfcheck.ensure("butterfly_multiply", x.device, x.dtype)
    return _kernel_multiply(twiddle, x, increasing_stride)
