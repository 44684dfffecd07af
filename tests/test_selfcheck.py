"""The compiled ops verify themselves (cuda/selfcheck.py): with the real CPU op the probe passes and the kernel is
used; with a deliberately wrong op patched in (wrong output above 64 rows, a wrong weight gradient, a crash, a
wrong butterfly for n = 1024) impl='auto' warns once naming the case and the error and returns the reference,
impl='kernel' raises; MONARCH_SEAM_SKIP_SELFCHECK=1 turns the probe off. On a GPU the real CUDA ops must pass.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import layers.butterfly as bfly
import layers.monarch as mon
from cuda import selfcheck


@pytest.fixture(scope="module")
def ops():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH, the extension cannot be built")
    from cuda import butterfly_ops, monarch_ops
    for mod in (monarch_ops, butterfly_ops):
        ok, err = mod.kernel_available()
        assert ok, f"CPU extension failed to build: {err}"
    return monarch_ops, butterfly_ops


def _reset(monkeypatch):
    monkeypatch.delenv("MONARCH_SEAM_SKIP_SELFCHECK", raising=False)
    monkeypatch.setattr(selfcheck, "_results", {})
    from cuda import monarch_ops
    monkeypatch.setattr(monarch_ops, "_ref_calls", {})  # calls known to take the reference skip the self-check
    for layer in (mon, bfly):
        monkeypatch.setattr(layer, "_kernel_state", None)
        monkeypatch.setattr(layer, "_warned_fallback", False)


@pytest.fixture
def fresh(ops, monkeypatch):
    """No cached probe results, no fallback warned yet, the probe on (whatever the environment says)."""
    _reset(monkeypatch)
    # these tests' products are tiny, where the CPU dispatch may call the reference itself (its timed verdict):
    # the op's path instead, so that what is tested is the op behind the self-check
    monkeypatch.setattr(ops[0], "cpu_path", lambda x, w1, w2: "aten")
    return ops


def recording(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in rec]


def monarch_inputs(rows=70, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 24, generator=g, dtype=dtype)
    w1 = torch.randn(4, 6, 6, generator=g, dtype=dtype)
    w2 = torch.randn(4, 24, 6, generator=g, dtype=dtype)
    return x, w1, w2


def spy(monkeypatch, module, fn=None):
    """Replace module._kernel_multiply by ``fn`` (default: the real one), counting calls."""
    real = module._kernel_multiply
    calls = []

    def call(*a):
        calls.append(a[0].shape)
        return (fn or real)(*a)
    monkeypatch.setattr(module, "_kernel_multiply", call)
    return calls, real


def test_real_monarch_op_passes_and_is_used(fresh, monkeypatch):
    monarch_ops, _ = fresh
    calls, _ = spy(monkeypatch, monarch_ops)
    x, w1, w2 = monarch_inputs()
    out, warned = recording(mon.monarch_multiply, x, w1, w2, impl="auto")
    assert warned == []
    assert selfcheck.results() == {("monarch_multiply", "cpu", torch.float32): ""}
    assert calls[-1] == x.shape and len(calls) > 1  # the probe's cases, then the call itself, on the kernel
    torch.testing.assert_close(out, mon.monarch_multiply_ref(x, w1, w2), rtol=1e-5, atol=1e-5)
    n = len(calls)
    mon.monarch_multiply(x.double(), w1.double(), w2.double(), impl="kernel")  # float64: its own probe
    assert selfcheck.results()[("monarch_multiply", "cpu", torch.float64)] == "" and len(calls) > n + 1
    n = len(calls)
    mon.monarch_multiply(x, w1, w2, impl="kernel")  # float32 again: cached, no probe
    assert len(calls) == n + 1


def test_real_butterfly_op_passes_and_is_used(fresh, monkeypatch):
    _, butterfly_ops = fresh
    calls, _ = spy(monkeypatch, butterfly_ops)
    layer = bfly.Butterfly(12, 40, nblocks=2)
    x = torch.randn(5, 12)
    out, warned = recording(layer, x)
    assert warned == [] and selfcheck.results() == {("butterfly_multiply", "cpu", torch.float32): ""}
    assert len(calls) > 1
    layer.impl = "ref"
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


class _WrongWeightGrad(torch.autograd.Function):
    """The real forward; the gradient of w1 1% too large (the kind of bug only a gradient check sees)."""
    real = None

    @staticmethod
    def forward(ctx, x, w1, w2):
        ctx.save_for_backward(x, w1, w2)
        return _WrongWeightGrad.real(x, w1, w2)

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            xs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            dx, dw1, dw2 = torch.autograd.grad(_WrongWeightGrad.real(*xs), xs, g)
        return dx, dw1 * 1.01, dw2


def _crash(*a):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


WRONG = {
    # the packed-GEMM path (>= 64 rows) writes the output columns in the wrong order
    "output above 64 rows": (lambda real: lambda x, w1, w2: real(x, w1, w2).flip(-1)
                             if x.reshape(-1, x.shape[-1]).shape[0] >= 64 else real(x, w1, w2),
                             "rectangular 24->96, 70 rows", "out"),
    "weight gradient": (lambda real: setattr(_WrongWeightGrad, "real", real) or _WrongWeightGrad.apply,
                        "square 32->32, 8 rows", "grad of input 1"),
    "crash": (lambda real: _crash, "square 32->32, 8 rows", "illegal memory access"),
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_wrong_monarch_op_is_caught(fresh, monkeypatch, kind):
    monarch_ops, _ = fresh
    make, case, what = WRONG[kind]
    calls, real = spy(monkeypatch, monarch_ops)
    monkeypatch.setattr(monarch_ops, "_kernel_multiply", make(real))
    x, w1, w2 = monarch_inputs(rows=5)  # the call itself takes the small path: only the probe sees the bug
    ref = mon.monarch_multiply_ref(x, w1, w2)
    out, warned = recording(mon.monarch_multiply, x, w1, w2, impl="auto")
    assert torch.equal(out, ref)
    assert len(warned) == 1, warned
    assert "self-check failed on cpu float32" in warned[0] and case in warned[0] and what in warned[0], warned[0]
    # a layer in training gets the reference (output and gradients), silently from now on
    layer = mon.MonarchLinear(24, 96, nblocks=4)
    xs = torch.randn(70, 24, requires_grad=True)
    y, warned = recording(layer, xs)
    assert warned == []
    want = mon.monarch_multiply_ref(xs, layer.blkdiag1, layer.blkdiag2) + layer.bias
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.sum().backward()
    assert layer.blkdiag1.grad is not None
    with pytest.raises(selfcheck.SelfCheckFailed, match=f"self-check failed.*{case}"):
        mon.monarch_multiply(x, w1, w2, impl="kernel")
    with pytest.raises(RuntimeError, match="self-check failed"):  # SelfCheckFailed is a RuntimeError too
        mon.MonarchLinear(24, 96, nblocks=4, impl="kernel")(xs)


def test_crashing_op_is_not_timed_before_its_self_check(ops, monkeypatch, tmp_path):
    """The real dispatch (which may time the op against the reference for a small product) runs only after the
    self-check: a crashing op is caught by the probe, warned once, and the reference answers."""
    monarch_ops, _ = ops
    _reset(monkeypatch)
    monkeypatch.setattr(monarch_ops, "_route_memo", {})
    monkeypatch.setattr(monarch_ops, "_kernel_multiply", _crash)
    torch.ops.monarch_seam._set_tune_file(str(tmp_path / "routes.txt"))  # nothing decided yet
    try:
        x, w1, w2 = monarch_inputs(rows=5)
        out, warned = recording(mon.monarch_multiply, x, w1, w2, impl="auto")
    finally:
        torch.ops.monarch_seam._set_tune_file(monarch_ops.tune_file_path())
    assert torch.equal(out, mon.monarch_multiply_ref(x, w1, w2))
    assert len(warned) == 1 and "self-check failed" in warned[0] and "illegal memory access" in warned[0], warned


def test_wrong_butterfly_op_is_caught(fresh, monkeypatch):
    _, butterfly_ops = fresh
    _, real = spy(monkeypatch, butterfly_ops)

    def wrong(tw, x, inc):  # correct up to 512 pairs per factor, wrong beyond (a thread-count bug)
        y = real(tw, x, inc)
        return y * 1.001 if x.shape[-1] >= 1024 else y
    monkeypatch.setattr(butterfly_ops, "_kernel_multiply", wrong)
    layer = bfly.Butterfly(12, 40, nblocks=2)
    x = torch.randn(5, 12)
    out, warned = recording(layer, x)
    assert len(warned) == 1 and "n=1024" in warned[0] and "self-check failed" in warned[0], warned
    layer.impl = "ref"
    assert torch.equal(out, layer(x))
    layer.impl = "kernel"
    with pytest.raises(selfcheck.SelfCheckFailed, match="n=1024"):
        layer(x)


def test_probe_is_per_dtype(fresh, monkeypatch):
    """A kernel wrong only in bfloat16 keeps float32 and is refused for bfloat16."""
    monarch_ops, _ = fresh
    calls, real = spy(monkeypatch, monarch_ops)
    monkeypatch.setattr(monarch_ops, "_kernel_multiply",
                        lambda x, w1, w2: real(x, w1, w2) * (1.05 if x.dtype == torch.bfloat16 else 1.0))
    x, w1, w2 = monarch_inputs()
    mon.monarch_multiply(x, w1, w2, impl="kernel")
    with pytest.raises(selfcheck.SelfCheckFailed, match="cpu bfloat16"):
        mon.monarch_multiply(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), impl="kernel")
    res = selfcheck.results()
    assert res[("monarch_multiply", "cpu", torch.float32)] == ""
    assert "out: max abs error" in res[("monarch_multiply", "cpu", torch.bfloat16)]


def test_skip_env_turns_the_probe_off(fresh, monkeypatch):
    monarch_ops, _ = fresh
    _, real = spy(monkeypatch, monarch_ops)
    monkeypatch.setattr(monarch_ops, "_kernel_multiply", lambda *a: real(*a) + 1.0)
    monkeypatch.setenv("MONARCH_SEAM_SKIP_SELFCHECK", "1")
    x, w1, w2 = monarch_inputs()
    out, warned = recording(mon.monarch_multiply, x, w1, w2, impl="auto")
    assert warned == []  # the (wrong) kernel is used as is: raw launches for benchmarks
    torch.testing.assert_close(out, mon.monarch_multiply_ref(x, w1, w2) + 1.0, rtol=1e-5, atol=1e-5)


def test_probe_leaves_rng_and_grad_mode_alone(fresh):
    monarch_ops, _ = fresh
    x, w1, w2 = monarch_inputs()
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = monarch_ops.monarch_multiply(x, w1, w2)  # probes float32 under no_grad + autocast
    assert not y.requires_grad and torch.equal(torch.rand(3), want)
    assert selfcheck.results()[("monarch_multiply", "cpu", torch.float32)] == ""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_ops_pass_their_self_check(fresh, monkeypatch, dtype):
    monarch_ops, butterfly_ops = fresh
    for mod in (monarch_ops, butterfly_ops):
        ok, err = mod.kernel_available("cuda")
        assert ok, err
    assert selfcheck.probe("monarch_multiply", "cuda", dtype) == ""
    if dtype == torch.float32:
        assert selfcheck.probe("butterfly_multiply", "cuda", dtype) == ""
    calls, _ = spy(monkeypatch, monarch_ops)
    layer = mon.MonarchLinear(256, 1024, nblocks=4, device="cuda", impl="auto")
    x = torch.randn(4096, 256, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y, warned = recording(layer, x)
    assert warned == [] and calls and y.dtype == dtype


ROUTES_SCRIPT = """
import json, torch
from cuda import monarch_ops, selfcheck
assert monarch_ops.kernel_available()[0]
res = {str(dt): selfcheck.probe("monarch_multiply", "cpu", dt) for dt in (torch.float32, torch.float64)}
res["route"] = torch.ops.monarch_seam.cpu_route("fwd_h", [160, 2, 40, 40, 2, 136, 40], torch.float32)
print(json.dumps(res))
"""


@pytest.mark.parametrize("route", ["engine", "aten", "blas"])
def test_every_cpu_route_passes_the_probe(ops, route):
    """The CPU op picks one of three routes per shape; forced onto one route, every probe case runs on it."""
    env = dict(os.environ, MONARCH_SEAM_CPU_ROUTE=route, OMP_NUM_THREADS="1")
    env.pop("MONARCH_SEAM_SKIP_SELFCHECK", None)
    r = subprocess.run([sys.executable, "-c", ROUTES_SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"torch.float32": "", "torch.float64": "", "route": route}
