"""Tests for layers/butterfly.py against independent references (torch.fft, cos formula, kron, hand cases,
dense factor products built here with plain loops)."""
import math
import warnings

import pytest
import torch

import layers.butterfly as bfly
from layers.butterfly import (Butterfly, FlatBlockButterflyLinear, butterfly_multiply, butterfly_multiply_ref, dct,
                              fft, hadamard, ifft)

SIZES = [2, 4, 8, 64, 1024]


def rel_err(a, b):
    a, b = a.to(torch.complex128), b.to(torch.complex128)
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------
# Independent dense construction of a butterfly product (loops over pairs, written from the layout spec)
# ---------------------------------------------------------------------------------------------------------
def factor_matrix(t, stride):
    """Dense (n, n) matrix of one factor; t is (n//2, 2, 2)."""
    n = 2 * t.shape[0]
    m = torch.zeros(n, n, dtype=t.dtype)
    for j in range(n // 2):
        i0 = (j // stride) * 2 * stride + j % stride
        i1 = i0 + stride
        m[i0, i0], m[i0, i1] = t[j, 0, 0], t[j, 0, 1]
        m[i1, i0], m[i1, i1] = t[j, 1, 0], t[j, 1, 1]
    return m


def stack_matrix(tw_stack, increasing):
    """tw_stack (nblocks, log_n, n//2, 2, 2) -> dense (n, n): later factors multiply on the left."""
    nblocks, log_n = tw_stack.shape[:2]
    n = 2 * tw_stack.shape[2]
    m = torch.eye(n, dtype=tw_stack.dtype)
    for b in range(nblocks):
        for idx in range(log_n):
            stride = 2 ** idx if increasing else 2 ** (log_n - 1 - idx)
            m = factor_matrix(tw_stack[b, idx], stride) @ m
        increasing = not increasing
    return m


def butterfly_dense(layer):
    """(out, in) from the layer's twiddles via stack_matrix: stacks concatenated, padding columns dropped."""
    tw = layer.twiddle.detach()
    rows = torch.cat([stack_matrix(tw[s], layer.increasing_stride) for s in range(tw.shape[0])], 0)
    return rows[: layer.out_size, : layer.in_size]


# ---------------------------------------------------------------------------------------------------------
# Fast transforms
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("normalized", [False, True])
def test_fft_ifft_match_torch_fft(n, normalized):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, dtype=torch.complex64, generator=g)
    norm = "ortho" if normalized else "backward"
    x64 = x.to(torch.complex128)
    assert rel_err(fft(n, normalized, impl="ref")(x), torch.fft.fft(x64, norm=norm)) < 1e-5
    assert rel_err(ifft(n, normalized, impl="ref")(x), torch.fft.ifft(x64, norm=norm)) < 1e-5
    # real input is accepted too (cast to complex)
    xr = torch.randn(3, n, generator=g)
    assert rel_err(fft(n, normalized, impl="ref")(xr), torch.fft.fft(xr.double(), norm=norm)) < 1e-5


@pytest.mark.parametrize("n", SIZES)
def test_dct_matches_formula(n):
    g = torch.Generator().manual_seed(n + 1)
    x = torch.randn(4, n, generator=g)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi / n * (m + 0.5) * k)  # X_k = sum_m x_m cos(pi/N (m + 1/2) k)
    y = dct(n, impl="ref")(x)
    assert y.dtype == torch.float32 and y.shape == (4, n)
    assert rel_err(y, x.double() @ c.T) < 1e-5


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matches_sylvester(n):
    g = torch.Generator().manual_seed(n + 2)
    x = torch.randn(4, n, generator=g)
    y = hadamard(n, impl="ref")(x)
    yn = hadamard(n, normalized=True, impl="ref")(x)
    assert y.dtype == torch.float32
    assert rel_err(y, x.double() @ sylvester(n).T) < 1e-5
    assert rel_err(yn, x.double() @ sylvester(n).T / math.sqrt(n)) < 1e-5


def test_transform_to_dense_and_flops():
    n = 8
    f = fft(n, dtype=torch.float64, impl="ref")
    km = torch.arange(n, dtype=torch.float64)[:, None] * torch.arange(n, dtype=torch.float64)[None, :]
    w = torch.polar(torch.ones_like(km), -2 * math.pi * km / n)
    assert rel_err(f.to_dense(), w) < 1e-12
    # 3 factors of 14n real ops each; no bias, permutation free
    assert f.flops(5) == 5 * 3 * 14 * 8
    d = dct(n, dtype=torch.float64, impl="ref")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    assert rel_err(d.to_dense(), torch.cos(math.pi / n * (m + 0.5) * k)) < 1e-12
    assert d.flops(1) == 3 * 14 * 8 + 3 * 8  # + Re(V * d): 2 mult + 1 add per entry
    assert hadamard(n).flops(2) == 2 * 3 * 3 * 8


# ---------------------------------------------------------------------------------------------------------
# Hand-computed n = 4 product
# ---------------------------------------------------------------------------------------------------------
def hand_twiddle():
    tw = torch.zeros(1, 1, 2, 2, 2, 2, dtype=torch.float64)
    tw[0, 0, 0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tw[0, 0, 0, 1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    tw[0, 0, 1, 0] = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    tw[0, 0, 1, 1] = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    return tw


def test_hand_computed_n4():
    tw = hand_twiddle()
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    # Increasing strides: factor 0 has stride 1 (pairs (0,1), (2,3)), factor 1 stride 2 (pairs (0,2), (1,3)).
    b_s1 = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float64)
    b_s2 = torch.tensor([[1, 0, 1, 0], [0, 2, 0, 0], [1, 0, -1, 0], [0, 0, 0, 3]], dtype=torch.float64)
    # x -> [5, 11, 4, 3] -> [5+4, 2*11, 5-4, 3*3]
    expected = torch.tensor([9.0, 22.0, 1.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(b_s2 @ b_s1 @ x[0, 0], expected)
    torch.testing.assert_close(butterfly_multiply_ref(tw, x, True)[0, 0], expected)
    # Decreasing: factor 0 now has stride 2: [1+2*3, 0*2+1*4, 3*1+4*3, 1*2+0*4] = [7, 4, 15, 2];
    # factor 1 stride 1: [7+4, 7-4, 2*15, 3*2] = [11, 3, 30, 6].
    torch.testing.assert_close(butterfly_multiply_ref(tw, x, False)[0, 0],
                               torch.tensor([11.0, 3.0, 30.0, 6.0], dtype=torch.float64))


def test_nblocks2_alternates_direction():
    torch.manual_seed(0)
    for increasing in (True, False):
        layer = Butterfly(4, 4, bias=False, nblocks=2, increasing_stride=increasing, dtype=torch.float64,
                          impl="ref")
        t = layer.twiddle.detach()[0]
        f = [factor_matrix(t[b, i], s) for b, i, s in
             ([(0, 0, 1), (0, 1, 2), (1, 0, 2), (1, 1, 1)] if increasing else
              [(0, 0, 2), (0, 1, 1), (1, 0, 1), (1, 1, 2)])]
        expected = f[3] @ f[2] @ f[1] @ f[0]  # strides 1,2 | 2,1 (increasing) or 2,1 | 1,2
        torch.testing.assert_close(layer.to_dense(), expected)


# ---------------------------------------------------------------------------------------------------------
# Butterfly module
# ---------------------------------------------------------------------------------------------------------
CASES = [  # (in, out, nblocks, increasing, complex)
    (8, 8, 1, True, False),
    (5, 13, 1, True, False),  # padding 5 -> 8 and 2 stacks
    (16, 3, 1, False, False),  # out < in: sliced
    (6, 20, 2, True, False),  # kaleidoscope, 3 stacks
    (7, 7, 2, False, True),  # complex
    (1, 3, 1, True, False),  # smallest size pads to 2
]


@pytest.mark.parametrize("in_size,out_size,nblocks,increasing,cplx", CASES)
def test_butterfly_forward_matches_dense(in_size, out_size, nblocks, increasing, cplx):
    torch.manual_seed(1)
    layer = Butterfly(in_size, out_size, complex=cplx, increasing_stride=increasing, nblocks=nblocks,
                      dtype=torch.float64, impl="ref")
    with torch.no_grad():
        layer.bias.normal_()
    dense = butterfly_dense(layer)
    torch.testing.assert_close(layer.to_dense().detach(), dense)
    x = torch.randn(2, 3, in_size, dtype=torch.float64)  # leading batch dims
    y = layer(x)
    assert y.shape == (2, 3, out_size)
    torch.testing.assert_close(y, x.to(dense.dtype) @ dense.T + layer.bias)


class FakeKernel:
    """Stand-in for cuda.butterfly_ops (the real one is compiled and tested by its own test file; building it
    here would cost ~30 s on a cold machine). Computes with the dense loop-built factors and records calls."""

    def __init__(self):
        self.calls = []

    def butterfly_multiply(self, twiddle, x, increasing_stride):
        self.calls.append((twiddle.dtype, x.is_contiguous(), increasing_stride))
        mats = [stack_matrix(twiddle[s].detach(), increasing_stride) for s in range(twiddle.shape[0])]
        return torch.stack([x[:, s] @ m.T for s, m in enumerate(mats)], 1)


def test_dispatch_uses_kernel_for_real_float32_only(monkeypatch):
    fake = FakeKernel()
    monkeypatch.setattr(bfly, "_kernel_state", (fake, ""))
    torch.manual_seed(2)
    layer = Butterfly(12, 40, nblocks=2, increasing_stride=False)  # 3 stacks fed as an expanded view
    x = torch.randn(5, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a working kernel never warns
        y_auto = layer(x)
    assert fake.calls == [(torch.float32, True, False)]
    layer.impl = "ref"
    torch.testing.assert_close(y_auto, layer(x), rtol=1e-5, atol=1e-5)
    assert len(fake.calls) == 1  # 'ref' never calls the kernel
    # complex and float64 layers never reach the kernel, whatever impl says
    Butterfly(4, 4, complex=True, impl="kernel")(torch.randn(2, 4))
    Butterfly(4, 4, dtype=torch.float64, impl="kernel")(torch.randn(2, 4, dtype=torch.float64))
    fft(8, impl="kernel")(torch.randn(8))
    assert len(fake.calls) == 1
    hadamard(8, impl="kernel")(torch.randn(8))  # real float32 transform: kernel
    assert len(fake.calls) == 2


def test_butterfly_inits():
    torch.manual_seed(3)
    eye = torch.eye(16, dtype=torch.float64)
    ident = Butterfly(16, 16, init="identity", nblocks=2, dtype=torch.float64)
    torch.testing.assert_close(ident.to_dense().detach(), eye)
    ortho = Butterfly(16, 16, init="ortho", nblocks=2, dtype=torch.float64).to_dense().detach()
    torch.testing.assert_close(ortho.T @ ortho, eye)
    u = Butterfly(16, 16, init="ortho", complex=True, dtype=torch.float64).to_dense().detach()
    torch.testing.assert_close(u.conj().T @ u, eye.to(u.dtype))
    assert u.dtype == torch.complex128
    # randn: E ||B||_F^2 = n (variance preserved); average over layers to keep the check stable
    n, ratios = 64, []
    for _ in range(20):
        d = Butterfly(n, n, init="randn", dtype=torch.float64).to_dense().detach()
        ratios.append((d.abs() ** 2).sum().item() / n)
    assert 0.75 < sum(ratios) / len(ratios) < 1.33


def test_butterfly_flops_and_params():
    layer = Butterfly(5, 13)  # n = 8, nstacks = 2, log_n = 3
    assert layer.twiddle.shape == (2, 1, 3, 4, 2, 2)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 3 * 4 * 4 + 13
    assert layer.flops(10) == 10 * (2 * 3 * (4 * 6) + 13)  # 4 pairs x (4 mult + 2 add) per factor
    c = Butterfly(5, 13, complex=True, bias=False, nblocks=2)
    assert c.flops(1) == 2 * 2 * 3 * (4 * 28)  # complex pair: 4*(4+2) + 2*2 real ops


def test_gradcheck_real_and_complex():
    torch.manual_seed(4)
    for dtype in (torch.float64, torch.complex128):
        tw = torch.randn(2, 2, 3, 4, 2, 2, dtype=dtype, requires_grad=True)
        x = torch.randn(3, 2, 8, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, v: butterfly_multiply_ref(t, v, False), (tw, x))
    layer = Butterfly(5, 11, complex=True, nblocks=2, dtype=torch.float64, impl="ref")
    x = torch.randn(2, 5, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v), (x,))
    # gradients w.r.t. the parameters flow as well
    layer(x).abs().sum().backward()
    assert layer.twiddle.grad is not None and layer.bias.grad is not None


def test_dispatch_fallback_and_errors(monkeypatch):
    monkeypatch.setattr(bfly, "_kernel_state", (None, "ImportError: no kernel here\nsecond line\nthird\nfourth"))
    monkeypatch.setattr(bfly, "_warned_fallback", False)
    tw = torch.randn(1, 1, 2, 2, 2, 2)
    x = torch.randn(3, 1, 4)
    ref = butterfly_multiply_ref(tw, x)
    with pytest.warns(RuntimeWarning, match="no kernel here"):
        torch.testing.assert_close(butterfly_multiply(tw, x, impl="auto"), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once per process only
        butterfly_multiply(tw, x, impl="auto")
    with pytest.raises(RuntimeError, match="impl='kernel'"):
        butterfly_multiply(tw, x, impl="kernel")
    # complex / float64 never reach the kernel: silent reference even with impl='kernel'
    monkeypatch.setattr(bfly, "_warned_fallback", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twc = torch.randn(1, 1, 2, 2, 2, 2, dtype=torch.complex64)
        butterfly_multiply(twc, x.to(torch.complex64), impl="kernel")
        butterfly_multiply(tw.double(), x.double(), impl="kernel")
    with pytest.raises(ValueError, match="impl"):
        butterfly_multiply(tw, x, impl="fast")


def test_butterfly_value_errors():
    with pytest.raises(ValueError, match="in_size"):
        Butterfly(0, 4)
    with pytest.raises(ValueError, match="out_size"):
        Butterfly(4, -1)
    with pytest.raises(ValueError, match="nblocks"):
        Butterfly(4, 4, nblocks=0)
    with pytest.raises(ValueError, match="init"):
        Butterfly(4, 4, init="xavier")
    with pytest.raises(ValueError, match="impl"):
        Butterfly(4, 4, impl="cuda")
    with pytest.raises(ValueError, match="complex"):
        Butterfly(4, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="dtype"):
        Butterfly(4, 4, complex=True, dtype=torch.float16)
    with pytest.raises(ValueError, match="in_size=4"):
        Butterfly(4, 4)(torch.randn(2, 5))
    x = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="twiddle"):
        butterfly_multiply_ref(torch.randn(1, 3, 4, 2, 2), x)
    with pytest.raises(ValueError, match="log_n"):
        butterfly_multiply_ref(torch.randn(1, 1, 2, 4, 2, 2), x)  # log_n=2 but n=8
    with pytest.raises(ValueError, match="x must have shape"):
        butterfly_multiply_ref(torch.randn(1, 1, 3, 4, 2, 2), torch.randn(2, 2, 8))
    for ctor in (fft, ifft, dct, hadamard):
        for bad in (0, 1, 6, 2.0):
            with pytest.raises(ValueError, match="n must be a power of 2"):
                ctor(bad)


# ---------------------------------------------------------------------------------------------------------
# Projection from dense (Butterfly.from_dense, butterfly_factorize)
# ---------------------------------------------------------------------------------------------------------
def random_butterfly(in_size, out_size, seed, **kw):
    """A Butterfly with random twiddles and bias (randn init, seeded), float64, reference product."""
    torch.manual_seed(seed)
    layer = Butterfly(in_size, out_size, dtype=torch.float64, impl="ref", **kw)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


PROJECTION_CASES = [  # (in, out, increasing, complex)
    (16, 16, True, False),  # square, power of 2
    (16, 16, False, False),  # decreasing strides
    (12, 12, True, False),  # padded 12 -> 16 (hidden columns and rows)
    (16, 40, True, False),  # rectangular: 3 stacks, the last one partly hidden
    (20, 8, False, False),  # out < n: most rows hidden
    (5, 37, True, True),  # complex, 5 stacks of 8
    (1, 3, True, False),  # smallest: n = 2
    (256, 64, True, False),  # log_n = 8: three levels of splits
]


@pytest.mark.parametrize("in_size,out_size,increasing,cplx", PROJECTION_CASES)
def test_from_dense_recovers_a_butterfly_layer(in_size, out_size, increasing, cplx):
    """The matrix of a random layer (built by the loop reference, hidden rows and columns random too) projected
    back gives the layer's outputs; float32 like a model's weights."""
    src = random_butterfly(in_size, out_size, 20, increasing_stride=increasing, complex=cplx)
    weight = butterfly_dense(src).to(torch.complex64 if cplx else torch.float32)
    proj = Butterfly.from_dense(weight, bias=src.bias.detach().to(weight.dtype), increasing_stride=increasing,
                                impl="ref")
    assert (proj.twiddle.dtype, proj.complex, proj.nblocks) == (weight.dtype, cplx, 1)
    assert not torch.allclose(proj.twiddle.to(src.twiddle.dtype), src.twiddle)  # other factors, same matrix
    x = torch.randn(7, in_size, dtype=torch.float64)
    assert (proj(x.float()) - src(x)).abs().max() < 1e-5


def test_from_dense_of_two_factors_is_the_optimum():
    """n = 4 has two factors: the one split is optimal, so the squared error is stationary at the projection and
    no nearby twiddles do better."""
    torch.manual_seed(21)
    w = torch.randn(4, 4, dtype=torch.float64)
    proj = Butterfly.from_dense(w, impl="ref")
    loss = (proj.to_dense() - w).pow(2).sum()
    loss.backward()
    assert proj.twiddle.grad.abs().max() < 1e-10
    base = proj.twiddle.detach().clone()
    for _ in range(20):
        with torch.no_grad():
            proj.twiddle.copy_(base + 1e-3 * torch.randn_like(base))
        assert (proj.to_dense() - w).pow(2).sum() > loss


def test_from_dense_projects_near_butterflies_near_and_random_matrices_better_than_a_baseline():
    torch.manual_seed(22)
    n_in, n_out = 48, 96
    b = butterfly_dense(random_butterfly(n_in, n_out, 23, bias=False))
    e = torch.randn(n_out, n_in, dtype=torch.float64)
    e *= b.norm() / e.norm()
    # a perturbed butterfly lands near the butterfly, closer as the perturbation shrinks (linearly)
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        target = b + eps * e
        got = Butterfly.from_dense(target, impl="ref").to_dense().detach()
        assert (got - b).norm() < (eps * e).norm()
        errs.append((got - target).norm().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02 * errs[0]
    # a random matrix: at least as close as a fresh butterfly scaled by least squares, and no closer than the best
    # fit of its first split (the rank-one fit of every sub-matrix, the optimum over a larger set)
    w = torch.randn(64, 64, dtype=torch.float64)
    err = (Butterfly.from_dense(w, impl="ref").to_dense() - w).norm()
    fresh = Butterfly(64, 64, dtype=torch.float64, impl="ref").to_dense().detach()
    scale = (fresh * w).sum() / (fresh * fresh).sum()
    assert err < 0.95 * (scale * fresh - w).norm()
    blocks = w.reshape(8, 8, 8, 8).permute(1, 2, 0, 3)  # index = 8 h + l; block (l', h) over (h', l)
    first_split = torch.linalg.svdvals(blocks)[..., 1:].pow(2).sum().sqrt()
    assert first_split <= err


def test_from_dense_several_blocks_and_options():
    src = random_butterfly(12, 40, 24, increasing_stride=False)
    w = butterfly_dense(src)
    x = torch.randn(5, 12, dtype=torch.float64)
    # nblocks=2 starting increasing: block 1 is decreasing and takes the fit, block 0 stays the identity
    two = Butterfly.from_dense(w, bias=src.bias, nblocks=2, increasing_stride=True, impl="ref")
    torch.testing.assert_close(two(x), src(x))
    # a kaleidoscope product is not recovered exactly (module docstring), but fits no worse than one block
    k = butterfly_dense(random_butterfly(12, 40, 25, nblocks=2))
    err2 = (Butterfly.from_dense(k, nblocks=2, impl="ref").to_dense() - k).norm()
    for inc in (True, False):
        assert err2 <= (Butterfly.from_dense(k, increasing_stride=inc, impl="ref").to_dense() - k).norm() + 1e-12
    # an nn.Linear brings its bias; bias=False drops it; complex=True projects a real weight onto complex twiddles
    lin = torch.nn.Linear(12, 40, dtype=torch.float64)
    assert torch.equal(Butterfly.from_dense(lin, impl="ref").bias, lin.bias)
    assert Butterfly.from_dense(lin, bias=False, impl="ref").bias is None
    c = Butterfly.from_dense(w, complex=True, increasing_stride=False, impl="ref")
    assert c.twiddle.dtype == torch.complex128
    torch.testing.assert_close(c.to_dense().real, w)
    # butterfly_factorize alone: one block per matrix, exact for butterflies of either direction
    tw = torch.randn(3, 1, 4, 8, 2, 2, dtype=torch.float64)
    for inc in (True, False):
        mats = torch.stack([stack_matrix(tw[i], inc) for i in range(3)])
        fitted = bfly.butterfly_factorize(mats, inc)
        assert fitted.shape == (3, 4, 8, 2, 2)
        torch.testing.assert_close(torch.stack([stack_matrix(fitted[i, None], inc) for i in range(3)]), mats)


def test_from_dense_value_errors():
    with pytest.raises(ValueError, match="2-D"):
        Butterfly.from_dense(torch.randn(4))
    with pytest.raises(ValueError, match="floating point"):
        Butterfly.from_dense(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        Butterfly.from_dense(torch.randn(4, 3), bias=torch.zeros(3))
    with pytest.raises(ValueError, match="tensor or nn.Linear"):
        Butterfly.from_dense([[1.0]])
    with pytest.raises(ValueError, match="complex=False"):
        Butterfly.from_dense(torch.randn(4, 4, dtype=torch.complex64), complex=False)
    with pytest.raises(ValueError, match="nblocks"):
        Butterfly.from_dense(torch.randn(4, 4), nblocks=0)
    with pytest.raises(ValueError, match=r"\(batch, n, n\)"):
        bfly.butterfly_factorize(torch.randn(2, 6, 6))


# ---------------------------------------------------------------------------------------------------------
# Flat block butterfly
# ---------------------------------------------------------------------------------------------------------
# Union of butterfly factor masks at strides 1 and 2 for butterfly_size = 8, written out by hand:
# row i keeps columns i, i^1, i^2.
HAND_MASK_8_2 = torch.tensor([
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 0, 1, 0, 0, 0, 0],
    [1, 0, 1, 1, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 1, 1, 0],
    [0, 0, 0, 0, 1, 1, 0, 1],
    [0, 0, 0, 0, 1, 0, 1, 1],
    [0, 0, 0, 0, 0, 1, 1, 1],
], dtype=torch.bool)


def dense_from_blocks(layer):
    """(out_ext, in_ext) weight assembled with a plain loop over the stored blocks."""
    b = layer.block
    w = torch.zeros(layer.out_ext, layer.in_ext, dtype=layer.weight.dtype)
    for z in range(layer.nnz_blocks):
        r, c = int(layer.row_idx[z]), int(layer.col_idx[z])
        w[r * b:(r + 1) * b, c * b:(c + 1) * b] = layer.weight.detach()[z]
    return w


def block_mask_elementwise(mask, out_ext, in_ext, block):
    """Block layout from the element-level stretch: element (r, c) -> mask (r*bs//out_ext, c*bs//in_ext)."""
    bs = mask.shape[0]
    r = torch.arange(out_ext) * bs // out_ext
    c = torch.arange(in_ext) * bs // in_ext
    elem = mask[r][:, c]
    return elem.reshape(out_ext // block, block, in_ext // block, block).any(3).any(1)


def test_flat_block_mask_by_hand():
    assert torch.equal(bfly.flat_butterfly_mask(8, 2), HAND_MASK_8_2)
    full = bfly.flat_butterfly_mask(8, 3)
    assert full.sum() == 8 * 4 and torch.equal(full[0], torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool))


@pytest.mark.parametrize("lowrank", [0, 3])
def test_flat_block_exact_size(lowrank):
    torch.manual_seed(5)
    block = 4
    layer = FlatBlockButterflyLinear(32, 32, butterfly_size=8, n_factors=2, block=block, lowrank_rank=lowrank,
                                     dtype=torch.float64)
    assert torch.equal(layer.layout, HAND_MASK_8_2)  # one block per mask entry
    w = dense_from_blocks(layer)
    expanded = torch.kron(HAND_MASK_8_2.double(), torch.ones(block, block, dtype=torch.float64))
    assert torch.equal(w * expanded, w)  # nothing stored outside the mask
    if lowrank:
        w = w + layer.lowrank_u.detach() @ layer.lowrank_v.detach()
    torch.testing.assert_close(layer.to_dense().detach(), w)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
    # hand counts: 24 nonzero blocks of 4x4
    n_params = 24 * 16 + 32 + lowrank * (32 + 32)
    assert sum(p.numel() for p in layer.parameters()) == n_params
    assert layer.flops(7) == 7 * (2 * 24 * 16 + 2 * lowrank * (32 + 32) + 32)


def test_flat_block_stretched_and_padded():
    torch.manual_seed(6)
    # out 128 = 32 blocks, in 64 = 16 blocks: each mask entry covers 4 x 2 blocks (fly's repeat)
    layer = FlatBlockButterflyLinear(64, 128, butterfly_size=8, n_factors=2, block=4, bias=False,
                                     dtype=torch.float64)
    assert torch.equal(layer.layout, torch.kron(HAND_MASK_8_2.int(), torch.ones(4, 2, dtype=torch.int)).bool())
    assert layer.nnz_blocks == 24 * 8
    assert sum(p.numel() for p in layer.parameters()) == 24 * 8 * 16
    assert layer.flops(1) == 2 * 24 * 8 * 16
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense_from_blocks(layer).T)
    # non-multiples: 30 -> 32 (8 blocks) outputs, 18 -> 20 (5 blocks) inputs, mask 4x4 with 1 factor
    layer = FlatBlockButterflyLinear(18, 30, butterfly_size=4, n_factors=1, block=4, lowrank_rank=2,
                                     dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    expected_layout = block_mask_elementwise(mask, 32, 20, 4)
    assert torch.equal(layer.layout, expected_layout)
    w = dense_from_blocks(layer)[:30, :18] + layer.lowrank_u.detach() @ layer.lowrank_v.detach()
    torch.testing.assert_close(layer.to_dense().detach(), w)
    x = torch.randn(3, 18, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
    assert layer.nnz_blocks == int(expected_layout.sum())


def test_flat_block_gradcheck_and_grads():
    torch.manual_seed(7)
    layer = FlatBlockButterflyLinear(12, 10, butterfly_size=4, n_factors=2, block=2, lowrank_rank=1,
                                     dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v), (x,))
    # weight gradient equals the dense gradient restricted to the stored blocks
    layer(x).square().sum().backward()
    w = layer.to_dense().detach().clone().requires_grad_(True)
    (x.detach() @ w.T + layer.bias.detach()).square().sum().backward()
    g_dense = torch.nn.functional.pad(w.grad, (0, layer.in_ext - 12, 0, layer.out_ext - 10))
    for z in range(layer.nnz_blocks):
        r, c = int(layer.row_idx[z]), int(layer.col_idx[z])
        torch.testing.assert_close(layer.weight.grad[z], g_dense[r * 2:(r + 1) * 2, c * 2:(c + 1) * 2])


def test_flat_block_value_errors():
    ok = dict(in_features=16, out_features=16, butterfly_size=8, n_factors=2, block=2)
    for key, bad in [("in_features", 0), ("out_features", -3), ("butterfly_size", 6), ("butterfly_size", 1),
                     ("n_factors", 0), ("n_factors", 4), ("block", 0), ("lowrank_rank", -1)]:
        with pytest.raises(ValueError, match=key):
            FlatBlockButterflyLinear(**{**ok, key: bad})
    with pytest.raises(ValueError, match="in_features=16"):
        FlatBlockButterflyLinear(**ok)(torch.randn(2, 15))


def test_flat_block_structured_path_matches_generic_path():
    # Mixer config shape (butterfly_size=8, n_factors=2, block=32) at small width: both code paths agree.
    torch.manual_seed(8)
    layer = FlatBlockButterflyLinear(256, 512, butterfly_size=8, n_factors=2, block=32, lowrank_rank=4)
    assert layer.struct_idx is not None  # bs divides the block counts: structured path
    x = torch.randn(6, 256)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-4, atol=1e-4)
    layer.struct_idx = None  # force the generic gather / scatter-add path
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
    assert layer.nnz_blocks == 24 * (16 // 8) * (8 // 8)
