"""Tests for layers/monarch.py against independent references.

The reference dense matrix is built here from explicit permutation matrices and torch.block_diag
(P2 @ BD(w2) @ P1 @ BD(w1)), never from the code under test.
"""

import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import layers.monarch as monarch
from layers.monarch import MonarchLinear, monarch_multiply, monarch_multiply_ref

D = torch.float64


# ---------------------------------------------------------------------------------------------------
# Independent reference: explicit permutation matrices
# ---------------------------------------------------------------------------------------------------
def middle_perm(k, q, l, r):
    """(l*r, k*q) 0/1 matrix: intermediate index i (read as the (r, l) grid, i = rr*l + ll) goes to
    position ll*r + rr of the (l, r) grid."""
    n = k * q
    P = torch.zeros(n, n, dtype=D)
    for rr in range(r):
        for ll in range(l):
            P[ll * r + rr, rr * l + ll] = 1.0
    return P


def output_perm(l, s):
    """(l*s, l*s) 0/1 matrix: block output ll*s + ss goes to position ss*l + ll."""
    P = torch.zeros(l * s, l * s, dtype=D)
    for ll in range(l):
        for ss in range(s):
            P[ss * l + ll, ll * s + ss] = 1.0
    return P


def dense_reference(w1, w2):
    """Dense (l*s, k*p) matrix P2 @ blockdiag(w2) @ P1 @ blockdiag(w1), in float64."""
    w1, w2 = w1.detach().to(D), w2.detach().to(D)
    k, q, p = w1.shape
    l, s, r = w2.shape
    bd1 = torch.block_diag(*w1)
    bd2 = torch.block_diag(*w2)
    return output_perm(l, s) @ bd2 @ middle_perm(k, q, l, r) @ bd1


def layer_dense_reference(m):
    return dense_reference(m.blkdiag1, m.blkdiag2)[: m.out_features, : m.in_features]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------
# monarch_multiply_ref
# ---------------------------------------------------------------------------------------------------
def test_ref_hand_computed_case():
    # w1 (k=2, q=2, p=1), w2 (l=2, s=1, r=2). Intermediate h = [a0 x0, a1 x0, b0 x1, b1 x1] read as an
    # (r=2, l=2) grid: group l=0 gets (a0 x0, b0 x1), group l=1 gets (a1 x0, b1 x1).
    a0, a1, b0, b1 = 2.0, 3.0, 5.0, 7.0
    c0, c1, d0, d1 = 11.0, 13.0, 17.0, 19.0
    w1 = torch.tensor([[[a0], [a1]], [[b0], [b1]]], dtype=D)
    w2 = torch.tensor([[[c0, c1]], [[d0, d1]]], dtype=D)
    x = torch.tensor([0.5, -1.5], dtype=D)
    expected = torch.tensor([c0 * a0 * 0.5 + c1 * b0 * -1.5, d0 * a1 * 0.5 + d1 * b1 * -1.5], dtype=D)
    torch.testing.assert_close(monarch_multiply_ref(x, w1, w2), expected, rtol=0, atol=1e-12)


def test_ref_output_transpose_hand_case():
    # k=l=1 leaves only the output transpose (s, l) trivial; use l=2, s=2 with identity-like blocks:
    # w1 = identity (k=1, q=4, p=4), w2 blocks act on (r=2): output index ss*2 + ll.
    w1 = torch.eye(4, dtype=D)[None]
    w2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=D)  # (l=2, s=2, r=2)
    x = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=D)
    # h read as (r, l): group ll=0 = (x0, x2), ll=1 = (x1, x3); block outputs o[ll, ss]; out[ss*2+ll].
    expected = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=D)
    torch.testing.assert_close(monarch_multiply_ref(x, w1, w2), expected)
    w2[1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D)  # swap within group 1 -> swaps x1 and x3
    expected = torch.tensor([10.0, 40.0, 30.0, 20.0], dtype=D)
    torch.testing.assert_close(monarch_multiply_ref(x, w1, w2), expected)


@pytest.mark.parametrize(
    "k,q,p,l,s,r",
    [(4, 4, 4, 4, 4, 4), (3, 4, 5, 2, 7, 6), (2, 6, 3, 4, 5, 3), (1, 6, 6, 3, 2, 2), (5, 2, 3, 2, 4, 5)],
)
def test_ref_matches_permutation_construction(k, q, p, l, s, r):
    w1 = torch.randn(k, q, p, dtype=D)
    w2 = torch.randn(l, s, r, dtype=D)
    x = torch.randn(2, 3, k * p, dtype=D)  # leading batch dims
    expected = x @ dense_reference(w1, w2).T
    torch.testing.assert_close(monarch_multiply_ref(x, w1, w2), expected)
    torch.testing.assert_close(monarch_multiply_ref(x[0, 0], w1, w2), expected[0, 0])  # no batch dim
    assert monarch_multiply_ref(x[:0], w1, w2).shape == (0, 3, l * s)  # empty batch


def test_ref_shape_errors():
    w1 = torch.randn(2, 3, 4)
    w2 = torch.randn(3, 5, 2)
    with pytest.raises(ValueError, match="last dimension"):
        monarch_multiply_ref(torch.randn(7), w1, w2)
    with pytest.raises(ValueError, match="k\\*q"):
        monarch_multiply_ref(torch.randn(8), w1, torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="w1 must be 3-D"):
        monarch_multiply_ref(torch.randn(8), w1[0], w2)
    with pytest.raises(ValueError, match="w2 must be 3-D"):
        monarch_multiply_ref(torch.randn(8), w1, w2[0])
    with pytest.raises(ValueError, match="impl"):
        monarch_multiply(torch.randn(8), w1, w2, impl="triton")


# ---------------------------------------------------------------------------------------------------
# MonarchLinear forward / to_dense
# ---------------------------------------------------------------------------------------------------
SIZES = [
    (16, 16, 4),  # square
    (64, 64, 16),
    (768, 3072, 4),  # expanding (ViT MLP fc1)
    (96, 24, 4),  # shrinking
    (10, 7, 1),
    (10, 7, 2),
    (10, 7, 3),
    (10, 7, 4),  # non-divisible both sides
    (100, 37, 16),
    (37, 100, 3),
    (5, 9, 5),  # nblocks == in_features
]


def expected_shapes(i, o, nb):
    ib, ob = -(-i // nb), -(-o // nb)
    return ((nb, ib, ib), (nb, ob, ib)) if ib < ob else ((nb, ob, ib), (nb, ob, ob))


@pytest.mark.parametrize("i,o,nb", SIZES)
def test_forward_equals_dense(i, o, nb):
    m = MonarchLinear(i, o, nblocks=nb, dtype=D, impl="ref")
    assert (tuple(m.blkdiag1.shape), tuple(m.blkdiag2.shape)) == expected_shapes(i, o, nb)
    W = layer_dense_reference(m)
    torch.testing.assert_close(m.to_dense().detach(), W, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, i, dtype=D)
    torch.testing.assert_close(m(x), x @ W.T + m.bias, rtol=1e-10, atol=1e-12)
    # Without bias, and with no batch dim.
    m.bias = None
    torch.testing.assert_close(m(x[0, 0]), x[0, 0] @ W.T, rtol=1e-10, atol=1e-12)


def test_param_names_and_counts():
    m = MonarchLinear(768, 3072, nblocks=4)
    assert [n for n, _ in m.named_parameters()] == ["blkdiag1", "blkdiag2", "bias"]
    assert sum(p.numel() for p in m.parameters()) == 4 * 192 * 192 + 4 * 768 * 192 + 3072
    assert "nblocks=4" in repr(m) and "in_features=768" in repr(m)


def test_init_bounds_like_nn_linear():
    m = MonarchLinear(300, 200, nblocks=4)  # blkdiag1 (4, 50, 75), blkdiag2 (4, 50, 50)
    assert m.blkdiag1.abs().max() <= 1 / 75**0.5 and m.blkdiag1.abs().max() > 0.9 / 75**0.5
    assert m.blkdiag2.abs().max() <= 1 / 50**0.5 and m.blkdiag2.abs().max() > 0.9 / 50**0.5
    assert m.bias.abs().max() <= 1 / 300**0.5


def test_flops_hand_checked():
    # in=10, out=7, nblocks=4: ib=3, ob=2 -> blkdiag1 (4,2,3)=24 MACs, blkdiag2 (4,2,2)=16 MACs per token.
    m = MonarchLinear(10, 7, nblocks=4)
    assert m.flops(5) == 5 * (2 * (24 + 16) + 7)
    assert m.dense_flops(5) == 5 * (2 * 10 * 7 + 7)
    m2 = MonarchLinear(16, 16, nblocks=4, bias=False)  # 2 * 4*4*4 * 2 = 256 = 2/4 of 2*16*16
    assert m2.flops(1) == 256 and m2.dense_flops(1) == 512


# ---------------------------------------------------------------------------------------------------
# Projection (from_dense)
# ---------------------------------------------------------------------------------------------------
PROJ_SIZES = [(16, 16, 4), (16, 16, 2), (64, 64, 8), (24, 96, 4), (96, 24, 4), (10, 7, 4), (100, 37, 16),
              (37, 100, 3), (12, 12, 1), (5, 9, 5)]


@pytest.mark.parametrize("i,o,nb", PROJ_SIZES)
def test_projection_recovers_monarch_exactly(i, o, nb):
    m = MonarchLinear(i, o, nblocks=nb, dtype=D, impl="ref")
    with torch.no_grad():  # make the hidden (padded) rows of the factors nonzero too
        m.blkdiag1.normal_()
        m.blkdiag2.normal_()
    W = layer_dense_reference(m)
    p = MonarchLinear.from_dense(W, nblocks=nb, impl="ref")
    assert p.bias is None and p.blkdiag1.dtype == D
    assert rel(layer_dense_reference(p), W) < 1e-5


def _frob_err(m, W):
    return (layer_dense_reference(m) - W).norm().item()


@pytest.mark.parametrize("i,o,nb", [(16, 16, 4), (24, 96, 4), (96, 24, 4), (10, 7, 4), (37, 100, 3)])
def test_projection_is_optimal_on_random_dense(i, o, nb):
    W = torch.randn(o, i, dtype=D)
    p = MonarchLinear.from_dense(W, nblocks=nb, impl="ref")
    err = _frob_err(p, W)
    assert err < W.norm().item()
    # Never worse than random Monarch matrices (scaled optimally, to make them a fair competitor).
    for _ in range(5):
        rnd = MonarchLinear(i, o, nblocks=nb, dtype=D, impl="ref")
        R = layer_dense_reference(rnd)
        scale = (R * W).sum() / (R * R).sum()
        assert err <= (scale * R - W).norm().item()
    # Local optimum: no small perturbation of the factors reduces the error...
    for eps in (1e-2, 1e-4):
        for _ in range(5):
            q = MonarchLinear.from_dense(W, nblocks=nb, impl="ref")
            with torch.no_grad():
                q.blkdiag1.add_(eps * torch.randn_like(q.blkdiag1))
                q.blkdiag2.add_(eps * torch.randn_like(q.blkdiag2))
            assert _frob_err(q, W) >= err - 1e-12
    # ...and the gradient of the error w.r.t. the factors vanishes (first-order optimality).
    w1 = p.blkdiag1.detach().clone().requires_grad_()
    w2 = p.blkdiag2.detach().clone().requires_grad_()
    loss = ((dense_reference_autograd(w1, w2)[:o, :i] - W) ** 2).sum()
    g1, g2 = torch.autograd.grad(loss, (w1, w2))
    assert g1.abs().max() < 1e-9 and g2.abs().max() < 1e-9


def dense_reference_autograd(w1, w2):
    k, q, p = w1.shape
    l, s, r = w2.shape
    return output_perm(l, s) @ torch.block_diag(*w2) @ middle_perm(k, q, l, r) @ torch.block_diag(*w1)


def test_projection_sqrt_case_is_rank_one_blocks():
    # n = 16, nblocks = 4 gives q = l = 4: each (output group, input block) sub-matrix is rank one, so the
    # projection of a dense matrix must match the block-wise rank-1 SVD computed here directly.
    W = torch.randn(16, 16, dtype=D)
    p = MonarchLinear.from_dense(W, nblocks=4, impl="ref")
    M = layer_dense_reference(p)
    for ll in range(4):
        for kk in range(4):
            rows = [ss * 4 + ll for ss in range(4)]
            cols = [kk * 4 + pp for pp in range(4)]
            block = W[rows][:, cols]
            U, S, Vh = torch.linalg.svd(block)
            torch.testing.assert_close(M[rows][:, cols], S[0] * torch.outer(U[:, 0], Vh[0]))


def test_from_dense_carries_bias_and_matches_linear():
    lin = nn.Linear(48, 32).double()
    m = MonarchLinear(48, 32, nblocks=4, dtype=D, impl="ref")
    with torch.no_grad():
        lin.weight.copy_(layer_dense_reference(m))  # a Monarch weight: the projection is exact
    p = MonarchLinear.from_dense(lin, nblocks=4, impl="ref")
    assert torch.equal(p.bias, lin.bias) and p.bias.data_ptr() != lin.bias.data_ptr()
    x = torch.randn(5, 48, dtype=D)
    torch.testing.assert_close(p(x), lin(x), rtol=1e-10, atol=1e-10)
    assert MonarchLinear.from_dense(lin, nblocks=4, bias=False).bias is None
    b = torch.randn(32, dtype=D)
    assert torch.equal(MonarchLinear.from_dense(lin.weight, nblocks=4, bias=b).bias, b)
    assert MonarchLinear.from_dense(lin.weight, nblocks=4).bias is None
    lin_nb = nn.Linear(48, 32, bias=False)
    assert MonarchLinear.from_dense(lin_nb, nblocks=4).bias is None


def test_from_dense_float32_and_grad_free():
    W = torch.randn(32, 32, requires_grad=True)
    p = MonarchLinear.from_dense(W, nblocks=4)
    assert p.blkdiag1.dtype == torch.float32 and p.blkdiag1.requires_grad and p.blkdiag1.grad_fn is None


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((0, 8), {}, "in_features"),
        ((8, -1), {}, "out_features"),
        ((8.0, 8), {}, "in_features"),
        ((8, 8), {"nblocks": 0}, "nblocks"),
        ((8, 8), {"nblocks": 9}, "nblocks=9"),
        ((8, 3), {"nblocks": 4}, "nblocks=4"),
        ((8, 8), {"impl": "cuda"}, "impl"),
    ],
)
def test_constructor_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MonarchLinear(*args, **kwargs)


def test_from_dense_and_forward_errors():
    with pytest.raises(ValueError, match="2-D"):
        MonarchLinear.from_dense(torch.randn(8), nblocks=2)
    with pytest.raises(ValueError, match="2-D"):
        MonarchLinear.from_dense(torch.randn(2, 8, 8), nblocks=2)
    with pytest.raises(ValueError, match="floating point"):
        MonarchLinear.from_dense(torch.ones(8, 8, dtype=torch.long), nblocks=2)
    with pytest.raises(ValueError, match="nblocks=9"):
        MonarchLinear.from_dense(torch.randn(8, 8), nblocks=9)
    with pytest.raises(ValueError, match="bias must have shape"):
        MonarchLinear.from_dense(torch.randn(8, 8), nblocks=2, bias=torch.randn(7))
    with pytest.raises(ValueError, match="tensor or nn.Linear"):
        MonarchLinear.from_dense([[1.0]], nblocks=1)
    with pytest.raises(ValueError, match="in_features=8"):
        MonarchLinear(8, 8, nblocks=2, impl="ref")(torch.randn(3, 7))


# ---------------------------------------------------------------------------------------------------
# Autograd and autocast
# ---------------------------------------------------------------------------------------------------
def test_gradcheck_ref_and_layer():
    w1 = torch.randn(3, 4, 2, dtype=D, requires_grad=True)
    w2 = torch.randn(2, 5, 6, dtype=D, requires_grad=True)
    x = torch.randn(2, 6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(monarch_multiply_ref, (x, w1, w2))
    m = MonarchLinear(7, 5, nblocks=2, dtype=D, impl="ref")  # padded input and output
    x = torch.randn(3, 7, dtype=D, requires_grad=True)

    def f(x, a, b, c):
        return torch.func.functional_call(m, {"blkdiag1": a, "blkdiag2": b, "bias": c}, (x,))

    params = [t.detach().clone().requires_grad_() for t in (m.blkdiag1, m.blkdiag2, m.bias)]
    assert torch.autograd.gradcheck(f, (x, *params))


def test_autocast_bf16_cpu():
    m = MonarchLinear(64, 48, nblocks=4, impl="ref")
    x = torch.randn(4, 64)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_lin = nn.Linear(64, 48)(x)
    assert y.dtype == torch.bfloat16 == y_lin.dtype
    assert m.blkdiag1.dtype == torch.float32  # parameters untouched
    assert rel(y.float(), y32) < 2e-2
    y.float().sum().backward()  # gradients flow to the float32 parameters
    assert m.blkdiag1.grad.dtype == torch.float32 and m.bias.grad is not None


# ---------------------------------------------------------------------------------------------------
# Kernel dispatch
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def kernel_slot(monkeypatch):
    """Fresh dispatch state; returns a function installing a fake (or None = missing) kernel module."""
    monkeypatch.setattr(monarch, "_kernel_state", None)
    monkeypatch.setattr(monarch, "_warned_fallback", False)

    def install(module):
        monkeypatch.setitem(sys.modules, "cuda.monarch_ops", module)

    return install


def _inputs():
    return torch.randn(3, 12), torch.randn(4, 3, 3), torch.randn(4, 3, 3)


def _call_recording(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [w for w in rec if "monarch" in str(w.message)]


def test_auto_missing_kernel_falls_back_and_warns_once(kernel_slot):
    kernel_slot(None)  # `import cuda.monarch_ops` now raises ImportError
    x, w1, w2 = _inputs()
    ref = monarch_multiply_ref(x, w1, w2)
    out, warned = _call_recording(monarch_multiply, x, w1, w2, impl="auto")
    assert torch.equal(out, ref) and len(warned) == 1 and "impl='ref'" in str(warned[0].message)
    out, warned = _call_recording(monarch_multiply, x, w1, w2, impl="auto")
    assert torch.equal(out, ref) and warned == []
    m = MonarchLinear(12, 12, nblocks=4)  # the layer's default impl='auto' also stays quiet now
    out, warned = _call_recording(m, x)
    assert warned == [] and torch.equal(out, monarch_multiply_ref(x, m.blkdiag1, m.blkdiag2) + m.bias)
    with pytest.raises(RuntimeError, match="impl='kernel'"):
        monarch_multiply(x, w1, w2, impl="kernel")


def test_broken_kernel_reports_first_lines(kernel_slot):
    fake = types.ModuleType("cuda.monarch_ops")
    fake.kernel_available = lambda: (False, "nvcc not found\nline two\nline three\nline four\nline five")
    fake.monarch_multiply = lambda *a: pytest.fail("unavailable kernel must not be called")
    kernel_slot(fake)
    x, w1, w2 = _inputs()
    out, warned = _call_recording(monarch_multiply, x, w1, w2)
    msg = str(warned[0].message)
    assert torch.equal(out, monarch_multiply_ref(x, w1, w2))
    assert "nvcc not found" in msg and "line three" in msg and "line five" not in msg
    with pytest.raises(RuntimeError, match="nvcc not found"):
        monarch_multiply(x, w1, w2, impl="kernel")


def test_kernel_import_raising_is_caught(kernel_slot, monkeypatch):
    kernel_slot(None)
    real_import = monarch.importlib.import_module

    def boom(name, *a, **k):
        if name == "cuda.monarch_ops":
            raise OSError("libcudart.so: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.setattr(monarch.importlib, "import_module", boom)
    x, w1, w2 = _inputs()
    out, warned = _call_recording(monarch_multiply, x, w1, w2)
    assert torch.equal(out, monarch_multiply_ref(x, w1, w2)) and "libcudart" in str(warned[0].message)


def test_available_kernel_is_used_and_ref_never_touches_it(kernel_slot):
    calls = []
    fake = types.ModuleType("cuda.monarch_ops")
    fake.kernel_available = lambda: (True, "")

    def kernel(x, w1, w2):
        calls.append(x.shape)
        return monarch_multiply_ref(x, w1, w2) + 1.0  # marker: distinguishable from the reference

    fake.monarch_multiply = kernel
    kernel_slot(fake)
    x, w1, w2 = _inputs()
    ref = monarch_multiply_ref(x, w1, w2)
    assert torch.equal(monarch_multiply(x, w1, w2, impl="ref"), ref) and calls == []
    assert torch.equal(monarch_multiply(x, w1, w2, impl="kernel"), ref + 1.0)
    out, warned = _call_recording(monarch_multiply, x, w1, w2, impl="auto")
    assert torch.equal(out, ref + 1.0) and warned == [] and len(calls) == 2


def test_auto_falls_back_on_not_implemented(kernel_slot):
    fake = types.ModuleType("cuda.monarch_ops")
    fake.kernel_available = lambda: (True, "")

    def kernel(x, w1, w2):
        raise NotImplementedError("monarch kernel: float64 not supported")

    fake.monarch_multiply = kernel
    kernel_slot(fake)
    x, w1, w2 = (t.double() for t in _inputs())
    out, warned = _call_recording(monarch_multiply, x, w1, w2, impl="auto")
    assert torch.equal(out, monarch_multiply_ref(x, w1, w2)) and "float64" in str(warned[0].message)
    with pytest.raises(NotImplementedError):
        monarch_multiply(x, w1, w2, impl="kernel")


def test_file_works_copied_alone(tmp_path):
    shutil.copy(Path(monarch.__file__), tmp_path / "monarch.py")
    code = (
        "import warnings, torch\n"
        "from monarch import MonarchLinear\n"
        "m = MonarchLinear(10, 7, nblocks=4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = m(torch.randn(2, 10)); m(torch.randn(2, 10))\n"
        "assert y.shape == (2, 7) and len(w) <= 1, (y.shape, [str(x.message) for x in w])\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
