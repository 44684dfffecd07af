"""Butterfly matrices, exact fast transforms built from them, and the flat block butterfly linear layer.

Self-contained: imports only torch and the standard library, so this file can be copied alone into another
repository. An optional compiled kernel (``cuda.butterfly_ops``) is imported lazily inside a try.

Contents
--------
- ``butterfly_multiply_ref(twiddle, x, increasing_stride=True)``: pure-PyTorch product of butterfly factors.
- ``butterfly_multiply(twiddle, x, increasing_stride=True, impl='auto')``: same, with optional kernel dispatch.
- ``Butterfly``: learnable product of log2(n) butterfly factors (padding, stacks, kaleidoscope blocks);
  ``Butterfly.from_dense`` projects a dense weight onto it (hierarchical factorisation, below).
- ``butterfly_factorize(mats, increasing_stride=True)``: twiddles of the butterfly closest to square matrices.
- ``fft``, ``ifft``, ``dct``, ``hadamard``: exact fast transforms as Butterfly-based modules.
- ``FlatBlockButterflyLinear``: the "pixelfly" flat block butterfly sparse linear layer (+ optional low rank).

Twiddle layout (HazyResearch/butterfly v2)
------------------------------------------
``twiddle`` has shape (nstacks, nblocks, log_n, n // 2, 2, 2) and ``x`` has shape (batch, nstacks, n).
Block ``b`` applies its ``log_n`` factors in order ``idx = 0, 1, ..., log_n - 1``; factor ``idx`` has
stride ``2**idx`` when the block's direction is increasing, else ``2**(log_n - 1 - idx)``. The first block's
direction is ``increasing_stride`` and the direction flips after every block (``nblocks=2`` gives the
kaleidoscope product B B*-shaped). Pair ``j`` of a factor with stride ``s`` touches entries
``i0 = (j // s) * 2 * s + j % s`` and ``i1 = i0 + s``:
``y[i0] = t[j,0,0] x[i0] + t[j,0,1] x[i1]``, ``y[i1] = t[j,1,0] x[i0] + t[j,1,1] x[i1]``.

FLOP convention
---------------
``flops(batch_tokens)`` counts real arithmetic operations really executed (multiplications + additions).
A real butterfly pair costs 4 mult + 2 add = 6, so a real factor of size n costs 3n. A complex pair costs
4 complex mult (4 real mult + 2 real add each) + 2 complex add (2 real add each) = 28 real ops, i.e. 14n per
factor. Bias adds cost 1 per output (2 if complex). ``FlatBlockButterflyLinear`` counts 2 ops per
multiply-accumulate of each stored nonzero block (the usual dense-matmul convention, 2*in*out for nn.Linear),
plus the low-rank term and the bias. Permutations and zero padding cost nothing.
"""

import importlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "butterfly_multiply_ref",
    "butterfly_multiply",
    "butterfly_factorize",
    "Butterfly",
    "ButterflyTransform",
    "fft",
    "ifft",
    "dct",
    "hadamard",
    "flat_butterfly_mask",
    "FlatBlockButterflyLinear",
]

_IMPLS = ("auto", "kernel", "ref")
_INITS = ("randn", "ortho", "identity")
_KERNEL_MODULE = "cuda.butterfly_ops"
_kernel_state = None  # (module or None, error text), filled on first use
_warned_fallback = False


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------
def _is_pow2(n):
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def _check_pos_int(value, name, owner, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def _complex_of(dtype):
    """Complex dtype with the precision of a real (or already complex) dtype."""
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _bit_reversal(n, device=None):
    """Permutation br with br[i] = the log2(n)-bit reversal of i (its own inverse)."""
    log_n = n.bit_length() - 1
    idx = torch.arange(n, device=device)
    rev = torch.zeros_like(idx)
    for bit in range(log_n):
        rev |= ((idx >> bit) & 1) << (log_n - 1 - bit)
    return rev


def _dense_weight_and_bias(weight_or_linear, bias, who):
    """(weight (out, in), bias (out,) or None) from a tensor or nn.Linear and a from_dense ``bias`` argument."""
    lin_bias = None
    if isinstance(weight_or_linear, nn.Linear):
        weight, lin_bias = weight_or_linear.weight, weight_or_linear.bias
    elif isinstance(weight_or_linear, torch.Tensor):
        weight = weight_or_linear
    else:
        raise ValueError(f"{who}: weight_or_linear must be a tensor or nn.Linear, "
                         f"got {type(weight_or_linear).__name__}")
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"{who}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() and not weight.is_complex():
        raise ValueError(f"{who}: weight must be floating point or complex, got {weight.dtype}")
    if bias is None:
        bias = lin_bias
    elif bias is False:
        bias = None
    elif isinstance(bias, torch.Tensor):
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{who}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    else:
        raise ValueError(f"{who}: bias must be None, False or a tensor, got {bias!r}")
    return weight, bias


def _first_lines(text, n=3):
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return " | ".join(lines[:n]) if lines else "unknown error"


def _load_kernel():
    """Returns (module or None, error text); imported lazily and cached for the process."""
    global _kernel_state
    if _kernel_state is None:
        try:
            mod = importlib.import_module(_KERNEL_MODULE)
            ok, err = mod.kernel_available()
            _kernel_state = (mod, "") if ok else (None, err or "kernel_available() returned False")
        except Exception as e:  # a missing, broken or unbuildable kernel must never break the layer
            _kernel_state = (None, f"{type(e).__name__}: {e}")
    return _kernel_state


def _warn_fallback(reason):
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"butterfly: compiled kernel {_KERNEL_MODULE} not used ({_first_lines(reason)}); falling back to the "
            "pure-PyTorch reference (same results, slower). Pass impl='ref' to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------------
# Butterfly product
# --------------------------------------------------------------------------------------------------------
def _check_twiddle_x(twiddle, x, who):
    if not isinstance(twiddle, torch.Tensor) or twiddle.dim() != 6 or tuple(twiddle.shape[4:]) != (2, 2):
        shape = tuple(twiddle.shape) if isinstance(twiddle, torch.Tensor) else type(twiddle).__name__
        raise ValueError(f"{who}: twiddle must have shape (nstacks, nblocks, log_n, n//2, 2, 2), got {shape}")
    nstacks, nblocks, log_n, half = twiddle.shape[:4]
    n = 2 * half
    if n < 2 or not _is_pow2(n) or (1 << log_n) != n:
        raise ValueError(
            f"{who}: twiddle dims 2 and 3 must be log_n and n//2 with n = 2**log_n >= 2, got log_n={log_n}, "
            f"n//2={half}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != nstacks or x.shape[2] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: x must have shape (batch, nstacks={nstacks}, n={n}), got {shape}")
    return nstacks, nblocks, log_n, n


def butterfly_multiply_ref(twiddle, x, increasing_stride=True):
    """Pure-PyTorch butterfly product (layout in the module docstring).

    Args:
        twiddle: (nstacks, nblocks, log_n, n // 2, 2, 2), real or complex.
        x: (batch, nstacks, n), real or complex; promoted to the common dtype with ``twiddle``.
        increasing_stride: direction of the first block (strides 1, 2, ..., n/2 if True).
    Returns:
        (batch, nstacks, n) in the promoted dtype.
    """
    nstacks, nblocks, log_n, n = _check_twiddle_x(twiddle, x, "butterfly_multiply_ref")
    dtype = torch.promote_types(twiddle.dtype, x.dtype)
    twiddle, x = twiddle.to(dtype), x.to(dtype)
    batch = x.shape[0]
    increasing = bool(increasing_stride)
    for b in range(nblocks):
        for idx in range(log_n):
            stride = 1 << (idx if increasing else log_n - 1 - idx)
            ngroups = n // (2 * stride)
            # Pair j = g*stride + o, so the pair axis splits into (group, offset) without copying.
            t = twiddle[:, b, idx].reshape(nstacks, ngroups, stride, 2, 2)
            xv = x.reshape(batch, nstacks, ngroups, 2, stride)  # [.., g, 0/1, o] = x[i0] / x[i1]
            x = torch.einsum("sgoab,zsgbo->zsgao", t, xv).reshape(batch, nstacks, n)
        increasing = not increasing
    return x


def butterfly_multiply(twiddle, x, increasing_stride=True, impl="auto"):
    """Butterfly product with optional compiled kernel; same arguments and result as ``butterfly_multiply_ref``.

    impl: 'auto' (kernel if usable, else the reference with one warning per process), 'kernel' (kernel or
    RuntimeError), 'ref' (reference; never imports the kernel). The kernel supports real float32 only:
    for any other dtype (complex, float64, half) every impl uses the reference silently.
    """
    if impl not in _IMPLS:
        raise ValueError(f"butterfly_multiply: impl must be one of {_IMPLS}, got {impl!r}")
    _check_twiddle_x(twiddle, x, "butterfly_multiply")
    if impl == "ref" or twiddle.dtype != torch.float32 or x.dtype != torch.float32:
        return butterfly_multiply_ref(twiddle, x, increasing_stride)
    mod, err = _load_kernel()
    if mod is None:
        if impl == "kernel":
            raise RuntimeError(
                f"butterfly_multiply: impl='kernel' but {_KERNEL_MODULE} is unavailable: {_first_lines(err, 6)}. "
                "Build the kernel or use impl='auto'/'ref'."
            )
        _warn_fallback(err)
        return butterfly_multiply_ref(twiddle, x, increasing_stride)
    x = x.contiguous()  # stacks are fed as an expanded view; the kernel may index memory directly
    if impl == "kernel":
        return mod.butterfly_multiply(twiddle, x, bool(increasing_stride))
    try:
        return mod.butterfly_multiply(twiddle, x, bool(increasing_stride))
    except NotImplementedError as e:  # the kernel's signal for an unsupported device/shape
        _warn_fallback(f"NotImplementedError: {e}")
        return butterfly_multiply_ref(twiddle, x, increasing_stride)


# --------------------------------------------------------------------------------------------------------
# Projection from dense: hierarchical butterfly factorisation
# --------------------------------------------------------------------------------------------------------
def butterfly_factorize(mats, increasing_stride=True):
    """Twiddles of one butterfly block (log_n factors) approximating each square matrix, by the hierarchical
    factorisation of Le Magoarou & Gribonval (2016) and Zheng, Riccietti & Gribonval (2023).

    Args:
        mats: (batch, n, n), n = 2**log_n >= 2, real or complex; ``y = mats[b] @ x`` is the map to approximate.
        increasing_stride: direction of the block (as in ``butterfly_multiply_ref``).
    Returns:
        (batch, log_n, n // 2, 2, 2) in the dtype of ``mats``: ``twiddle[:, None]`` (one stack per matrix, one
        block) reproduces ``mats`` exactly when each is a butterfly product of that direction.

    Why it works (increasing strides; decreasing is the transpose, below). Write an index as i = h * 2**k + l,
    l its k low bits. The first k factors mix only low bits and the others only high bits, so the product is
    M = A C with C = blockdiag_h(C_h) and A[(h', l'), (h, l)] = [l == l'] A_l'[h', h], hence
    M[(h', l'), (h, l)] = A_l'[h', h] * C_h[l', l]: for each (l', h), the (h', l) sub-matrix is the outer product
    of column h of A_l' and row l' of C_h, and no other sub-matrix uses either vector. The closest product A C
    with these supports is therefore the best rank-one fit of every sub-matrix on its own (truncated SVD).
    A_l and C_h are butterflies of sizes 2**(log_n - k) and 2**k: recurse (balanced split, k = log_n // 2) down
    to 2x2 twiddles, which are the sub-matrices themselves. If M is a butterfly, every sub-matrix has rank <= 1,
    the split is exact and the recovered A, C are the true ones up to a diagonal scaling (the free scale of each
    rank-one term), itself a butterfly factor: the recursion is exact again. For any other M only the first split
    is optimal (over the larger set of such products A C); the deeper splits are greedy, so the result is a good
    projection, not the proven optimum (Le, Zheng, Riccietti & Gribonval 2024 add an orthonormalisation for a
    quasi-optimality bound; not done here).
    """
    if not isinstance(mats, torch.Tensor) or mats.dim() != 3 or mats.shape[1] != mats.shape[2] \
            or mats.shape[1] < 2 or not _is_pow2(mats.shape[1]):
        shape = tuple(mats.shape) if isinstance(mats, torch.Tensor) else type(mats).__name__
        raise ValueError(f"butterfly_factorize: mats must have shape (batch, n, n) with n a power of 2 >= 2, "
                         f"got {shape}")
    if increasing_stride:
        return _factorize_increasing(mats)
    # A decreasing block D = F_0 F_1 ... F_{L-1} (stride 2**(L-1) applied first) is the transpose of the increasing
    # block F_{L-1}^T ... F_0^T: factor the transpose, then transpose every 2x2 twiddle and reverse the order.
    return _factorize_increasing(mats.transpose(1, 2)).flip(1).transpose(-1, -2)


def _factorize_increasing(mats):
    """(batch, n, n) -> (batch, log_n, n // 2, 2, 2), increasing strides (see ``butterfly_factorize``)."""
    batch, n = mats.shape[:2]
    log_n = n.bit_length() - 1
    if log_n == 1:  # one factor, one pair: the twiddle is the matrix
        return mats.reshape(batch, 1, 1, 2, 2)
    k = log_n // 2
    lo, hi = 1 << k, n >> k
    # (batch, l', h, h', l): one (hi x lo) sub-matrix per (l', h), each fitted by its leading singular pair
    blocks = mats.reshape(batch, hi, lo, hi, lo).permute(0, 2, 3, 1, 4)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    root = s[..., :1].sqrt()  # the scale is split evenly, so neither side's entries blow up
    col = u[..., 0] * root  # (batch, l', h, h'): column h of A_l'
    row = vh[..., 0, :] * root  # (batch, l', h, l): row l' of C_h
    high = col.transpose(-1, -2).reshape(batch * lo, hi, hi)  # A_l'[h', h]
    low = row.transpose(1, 2).reshape(batch * hi, lo, lo)  # C_h[l', l]
    tw_low = _factorize_increasing(low).reshape(batch, hi, k, lo // 2, 2, 2)
    tw_high = _factorize_increasing(high).reshape(batch, lo, log_n - k, hi // 2, 2, 2)
    # Global pair index of a factor of C_h: j = h * lo/2 + (its own pair index); of A_l: j = (own) * lo + l.
    tw_low = tw_low.permute(0, 2, 1, 3, 4, 5).reshape(batch, k, n // 2, 2, 2)
    tw_high = tw_high.permute(0, 2, 3, 1, 4, 5).reshape(batch, log_n - k, n // 2, 2, 2)
    return torch.cat([tw_low, tw_high], 1)


def _stack_matrices(twiddle, increasing_stride):
    """(nstacks, n, n) dense matrices of a twiddle (nstacks, nblocks, log_n, n // 2, 2, 2)."""
    nstacks, n = twiddle.shape[0], 2 * twiddle.shape[3]
    eye = torch.eye(n, dtype=twiddle.dtype, device=twiddle.device)
    cols = butterfly_multiply_ref(twiddle, eye.unsqueeze(1).expand(n, nstacks, n), increasing_stride)
    return cols.permute(1, 2, 0)  # cols[z, s] = M_s e_z, column z of M_s


# --------------------------------------------------------------------------------------------------------
# Butterfly module
# --------------------------------------------------------------------------------------------------------
class Butterfly(nn.Module):
    """Learnable product of butterfly factors: y = B x + bias, a drop-in for nn.Linear(in_size, out_size).

    n = smallest power of 2 >= in_size (at least 2); nstacks = ceil(out_size / n). The input (..., in_size)
    is zero-padded to n and fed to every stack; the stacks' outputs are concatenated to nstacks*n and
    sliced to out_size. With nblocks > 1 the blocks alternate stride direction (nblocks=2: kaleidoscope).

    Args:
        in_size, out_size: feature sizes (>= 1).
        bias: learnable bias of shape (out_size,).
        complex: complex twiddles/bias (real inputs are cast to complex; the output is complex).
        increasing_stride: direction of the first block.
        nblocks: number of butterfly blocks (>= 1), each of log2(n) factors.
        init: 'randn' (i.i.d. normal with std 1/sqrt(2) per entry: each output of a factor sums 2 terms, so
              E|y_i|^2 = E|x_i|^2 and the variance is preserved through the whole product; complex entries
              have E|t|^2 = 1/2 too), 'ortho' (each 2x2 twiddle a random rotation; complex: a Haar-random
              unitary, so every factor is orthogonal/unitary), 'identity' (each 2x2 twiddle = I).
        device, dtype: factory kwargs; with complex=True a real dtype selects its complex counterpart.
        impl: 'auto' | 'kernel' | 'ref', see ``butterfly_multiply``.
    The bias is initialised like nn.Linear's (uniform +-1/sqrt(in_size)).
    Parameters:
        twiddle: (nstacks, nblocks, log_n, n // 2, 2, 2); bias: (out_size,) or None.
    """

    def __init__(self, in_size, out_size, bias=True, complex=False, increasing_stride=True, nblocks=1,
                 init="randn", device=None, dtype=None, impl="auto"):
        super().__init__()
        _check_pos_int(in_size, "in_size", "Butterfly")
        _check_pos_int(out_size, "out_size", "Butterfly")
        _check_pos_int(nblocks, "nblocks", "Butterfly")
        if init not in _INITS:
            raise ValueError(f"Butterfly: init must be one of {_INITS}, got {init!r}")
        if impl not in _IMPLS:
            raise ValueError(f"Butterfly: impl must be one of {_IMPLS}, got {impl!r}")
        if dtype is None:
            dtype = torch.get_default_dtype()
        if dtype.is_complex and not complex:
            raise ValueError(f"Butterfly: dtype={dtype} is complex but complex=False; pass complex=True")
        if not dtype.is_floating_point and not dtype.is_complex:
            raise ValueError(f"Butterfly: dtype must be a floating or complex dtype, got {dtype}")
        if complex:
            if dtype not in (torch.float32, torch.float64, torch.complex64, torch.complex128):
                raise ValueError(f"Butterfly: complex=True needs dtype float32/float64 (or complex64/complex128), "
                                 f"got {dtype}: torch has almost no complex-half kernels")
            dtype = _complex_of(dtype)
        self.in_size, self.out_size = in_size, out_size
        self.log_n = max(1, math.ceil(math.log2(in_size)))
        self.n = 1 << self.log_n
        self.nstacks = -(-out_size // self.n)
        self.nblocks = nblocks
        self.complex = bool(complex)
        self.increasing_stride = bool(increasing_stride)
        self.init = init
        self.impl = impl
        shape = (self.nstacks, nblocks, self.log_n, self.n // 2, 2, 2)
        self.twiddle = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        t = self.twiddle
        with torch.no_grad():
            if self.init == "randn":
                t.normal_(0.0, 1.0)  # complex normal_ gives E|z|^2 = 1
                t.mul_(1.0 / math.sqrt(2.0))
            elif self.init == "identity":
                t.copy_(torch.eye(2, dtype=t.dtype, device=t.device).expand_as(t))
            else:  # ortho
                if self.complex:
                    a = torch.randn(t.shape, dtype=t.dtype, device=t.device)
                    q, r = torch.linalg.qr(a)
                    d = torch.diagonal(r, dim1=-2, dim2=-1)
                    # Fixing the phases of R's diagonal makes Q Haar-distributed (and keeps it unitary).
                    q = q * (d / d.abs().clamp_min(1e-30)).unsqueeze(-2)
                    t.copy_(q)
                else:
                    theta = torch.rand(t.shape[:-2], dtype=t.dtype, device=t.device) * (2 * math.pi)
                    c, s = torch.cos(theta), torch.sin(theta)
                    t.copy_(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2))
            if self.bias is not None:
                # nn.Linear's bias init (uniform +-1/sqrt(fan_in)); a complex bias gets it on both parts.
                bound = 1.0 / math.sqrt(self.in_size)
                b = torch.view_as_real(self.bias) if self.bias.is_complex() else self.bias
                b.uniform_(-bound, bound)

    def _butterfly(self, x2d):
        """(batch, in_size) -> (batch, out_size), no bias."""
        batch = x2d.shape[0]
        if self.complex and not x2d.dtype.is_complex:
            x2d = x2d.to(self.twiddle.dtype)
        if self.in_size < self.n:
            x2d = F.pad(x2d, (0, self.n - self.in_size))
        xs = x2d.unsqueeze(1).expand(batch, self.nstacks, self.n)
        y = butterfly_multiply(self.twiddle, xs, self.increasing_stride, impl=self.impl)
        return y.reshape(batch, self.nstacks * self.n)[:, : self.out_size]

    def forward(self, x):
        """x: (..., in_size) -> (..., out_size)."""
        if x.shape[-1] != self.in_size:
            raise ValueError(f"Butterfly: input last dim must be in_size={self.in_size}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._butterfly(x.reshape(-1, self.in_size))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_size)

    def to_dense(self):
        """Dense (out_size, in_size) matrix of the linear part (no bias), in the twiddle dtype."""
        eye = torch.eye(self.in_size, dtype=self.twiddle.dtype, device=self.twiddle.device)
        return self._butterfly(eye).transpose(0, 1)

    @classmethod
    def from_dense(cls, weight_or_linear, bias=None, nblocks=1, increasing_stride=True, complex=None, impl="auto"):
        """A Butterfly layer whose matrix approximates a dense weight: ``butterfly_factorize`` of every stack.

        Args:
            weight_or_linear: an (out, in) real or complex floating-point tensor, or an ``nn.Linear``.
            bias: None -> the nn.Linear's bias if one is given (no bias for a plain tensor);
                  a tensor (out,) -> that bias; False -> no bias.
            nblocks, increasing_stride, impl: as in the constructor.
            complex: None -> complex twiddles iff the weight is complex; True with a real weight gives complex
                     twiddles holding the same (real) fit.
        Returns:
            Butterfly on the weight's device, in its dtype (complex=True with a real weight: the complex
            counterpart). Computed in double precision. Consumes no random numbers.

        Exactness. The layer's matrix is the first ``out`` rows and ``in`` columns of the stacked n x n butterflies
        [M_0; M_1; ...]; the rest is never seen. Each stack is fitted to its rows of the weight, zero-padded to
        n x n. Zeroing rows or columns of a butterfly (a 0/1 diagonal on either side) leaves a butterfly, since a
        diagonal merges into the first or last factor; so the zero-padded target loses nothing: for nblocks=1 the
        matrix of any Butterfly of the same direction (whatever its hidden rows and columns) comes back exactly,
        square or rectangular, power of 2 or padded, real or complex.

        nblocks >= 2 (kaleidoscope products) is NOT recovered exactly: every bit is mixed by two blocks, so no
        split of the product has the disjoint rank-one sub-matrices the hierarchical algorithm needs, and the
        best fit has no closed form. Here one block is fitted and the others are the identity (within the set,
        so never worse than nblocks=1); both directions are tried (blocks 0 and 1) and each stack keeps the
        closer fit on the visible entries. Exact for a matrix that is a single butterfly of either direction.
        """
        weight, bias = _dense_weight_and_bias(weight_or_linear, bias, "Butterfly.from_dense")
        if complex is None:
            complex = weight.is_complex()
        elif not complex and weight.is_complex():
            raise ValueError("Butterfly.from_dense: complex=False but the weight is complex; pass complex=True or "
                             "None")
        out_size, in_size = weight.shape
        layer = cls(in_size, out_size, bias=bias is not None, complex=complex, increasing_stride=increasing_stride,
                    nblocks=nblocks, init="identity", device=weight.device, dtype=weight.dtype, impl=impl)
        with torch.no_grad():
            layer.twiddle.copy_(layer._fit_twiddle(weight.detach()))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def _fit_twiddle(self, weight):
        """Twiddle (nstacks, nblocks, log_n, n // 2, 2, 2), double precision, fitted to (out_size, in_size)."""
        work = torch.complex128 if self.complex else torch.float64
        n, nstacks = self.n, self.nstacks
        padded = weight.new_zeros(nstacks * n, n, dtype=work)
        padded[: self.out_size, : self.in_size] = weight.to(work)
        mats = padded.reshape(nstacks, n, n)
        if self.nblocks == 1:
            return butterfly_factorize(mats, self.increasing_stride).unsqueeze(1)
        visible = torch.zeros(nstacks * n, n, dtype=torch.bool, device=weight.device)
        visible[: self.out_size, : self.in_size] = True
        visible = visible.reshape(nstacks, n, n)
        ident = torch.eye(2, dtype=work, device=weight.device)
        best = best_err = None
        for b in (0, 1):  # block b's direction flips with each block
            tw = ident.expand(nstacks, self.nblocks, self.log_n, n // 2, 2, 2).clone()
            tw[:, b] = butterfly_factorize(mats, self.increasing_stride == (b == 0))
            diff = (_stack_matrices(tw, self.increasing_stride) - mats) * visible
            err = diff.abs().pow(2).sum((1, 2))
            if best is None:
                best, best_err = tw, err
            else:
                keep = (err < best_err).reshape(nstacks, 1, 1, 1, 1, 1)
                best, best_err = torch.where(keep, tw, best), torch.minimum(err, best_err)
        return best

    def flops(self, batch_tokens=1):
        """Real arithmetic ops for ``batch_tokens`` input vectors (convention in the module docstring)."""
        per_factor = (14 if self.complex else 3) * self.n
        total = self.nstacks * self.nblocks * self.log_n * per_factor
        if self.bias is not None:
            total += (2 if self.complex else 1) * self.out_size
        return int(batch_tokens) * total

    def extra_repr(self):
        return (f"in_size={self.in_size}, out_size={self.out_size}, n={self.n}, nstacks={self.nstacks}, "
                f"nblocks={self.nblocks}, complex={self.complex}, increasing_stride={self.increasing_stride}, "
                f"bias={self.bias is not None}, impl={self.impl!r}")


# --------------------------------------------------------------------------------------------------------
# Exact fast transforms
# --------------------------------------------------------------------------------------------------------
class ButterflyTransform(nn.Module):
    """y = post-processing(Butterfly(x[..., perm])): a fixed input permutation, a Butterfly, and for the
    DCT a complex diagonal followed by taking the real part.

    Attributes: ``butterfly`` (Butterfly, bias=False; its twiddles are learnable parameters initialised to
    the exact transform), ``perm`` buffer (n,), ``post`` buffer (n,) complex or None, ``real_output``.
    Input (..., n) real or complex; output (..., n) complex (fft/ifft), real (dct) or the dtype of the
    twiddles (hadamard).
    """

    def __init__(self, butterfly, perm, post=None, real_output=False):
        super().__init__()
        self.butterfly = butterfly
        self.n = butterfly.in_size
        self.register_buffer("perm", perm)
        self.register_buffer("post", post)
        self.real_output = bool(real_output)

    def forward(self, x):
        """x: (..., n) -> (..., n)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"ButterflyTransform: input last dim must be n={self.n}, got {tuple(x.shape)}")
        y = self.butterfly(x[..., self.perm])
        if self.post is not None:
            y = y * self.post
        return y.real if self.real_output else y

    def to_dense(self):
        """Dense (n, n) matrix of the transform."""
        tw = self.butterfly.twiddle
        # A real identity: the transforms are applied to real-valued columns (the DCT takes a real part).
        eye = torch.eye(self.n, dtype=tw.real.dtype, device=tw.device)
        return self(eye).transpose(0, 1)

    def flops(self, batch_tokens=1):
        """Butterfly ops + post-processing: Re(V*d) needs 2 mult + 1 add per entry; a full complex
        diagonal (not used by the constructors here) would be 6. Permutations cost nothing."""
        total = self.butterfly.flops(1)
        if self.post is not None:
            total += (3 if self.real_output else 6) * self.n
        return int(batch_tokens) * total


def _check_transform_n(n, who):
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or not _is_pow2(n):
        raise ValueError(f"{who}: n must be a power of 2 >= 2, got {n!r}")


def _fft_twiddle(n, inverse, scale_per_factor):
    """Decimation-in-time twiddles (1, 1, log_n, n//2, 2, 2), complex128, for increasing strides.

    Stage with stride s merges two DFTs of size s into one of size 2s: for offset o in a group,
    y[i0] = x[i0] + w^o x[i1], y[i1] = x[i0] - w^o x[i1], w = exp(-+2 pi i / (2s)). Fed with the
    bit-reversed input, the stages produce the DFT in natural order.
    """
    log_n = n.bit_length() - 1
    sign = 1.0 if inverse else -1.0
    tw = torch.empty(1, 1, log_n, n // 2, 2, 2, dtype=torch.complex128)
    j = torch.arange(n // 2, dtype=torch.float64)
    for idx in range(log_n):
        s = 1 << idx
        o = j % s
        w = torch.polar(torch.ones_like(o), sign * math.pi * o / s)  # exp(+-2 pi i o / (2s))
        one = torch.ones_like(w)
        tw[0, 0, idx] = torch.stack([torch.stack([one, w], -1), torch.stack([one, -w], -1)], -2)
    return tw * scale_per_factor


def _transform_butterfly(n, twiddle, complex, device, dtype, impl):
    bf = Butterfly(n, n, bias=False, complex=complex, increasing_stride=True, nblocks=1, init="identity",
                   device=device, dtype=dtype, impl=impl)
    with torch.no_grad():
        bf.twiddle.copy_(twiddle.to(bf.twiddle.dtype) if complex else twiddle.real.to(bf.twiddle.dtype))
    return bf


def fft(n, normalized=False, device=None, dtype=None, impl="auto"):
    """DFT module: y_k = sum_m x_m exp(-2 pi i k m / n) (times 1/sqrt(n) if normalized), like torch.fft.fft.

    Bit-reversal input permutation + a complex Butterfly with increasing strides (decimation in time).
    dtype: real precision of the twiddles (default float32 -> complex64). Input (..., n), output complex.
    """
    _check_transform_n(n, "fft")
    scale = 2 ** -0.5 if normalized else 1.0
    bf = _transform_butterfly(n, _fft_twiddle(n, False, scale), True, device, dtype, impl)
    return ButterflyTransform(bf, _bit_reversal(n, device))


def ifft(n, normalized=False, device=None, dtype=None, impl="auto"):
    """Inverse DFT module: y_k = (1/n) sum_m x_m exp(+2 pi i k m / n) (1/sqrt(n) if normalized), like
    torch.fft.ifft. Bit-reversal input permutation + complex Butterfly; the 1/n is spread as 1/2 per factor."""
    _check_transform_n(n, "ifft")
    scale = 2 ** -0.5 if normalized else 0.5
    bf = _transform_butterfly(n, _fft_twiddle(n, True, scale), True, device, dtype, impl)
    return ButterflyTransform(bf, _bit_reversal(n, device))


def dct(n, device=None, dtype=None, impl="auto"):
    """Unnormalised DCT-II module: X_k = sum_{m=0}^{n-1} x_m cos(pi/n (m + 1/2) k), k = 0..n-1
    (scipy.fft.dct(type=2) is exactly 2 X_k). Input (..., n) real, output (..., n) real.

    Construction (Makhoul 1980): v_m = x_{2m}, v_{n-1-m} = x_{2m+1} for m < n/2; V = FFT(v);
    X_k = Re(exp(-i pi k / (2n)) V_k). Proof: split the DCT sum into even and odd inputs,
    X_k = sum_m x_{2m} cos(pi k (4m+1) / (2n)) + sum_m x_{2m+1} cos(pi k (4m+3) / (2n)). In the odd sum put
    m' = n-1-m (so x_{2m+1} = v_{m'}): 4m+3 = 4n - (4m'+1) and cos(2 pi k - a) = cos(a), so both sums have the
    form v_m cos(pi k (4m+1) / (2n)) and X_k = sum_{m<n} v_m cos(pi k (4m+1)/(2n))
    = Re(sum_m v_m exp(-i pi k (4m+1)/(2n))) = Re(exp(-i pi k/(2n)) sum_m v_m exp(-2 pi i k m / n)).
    The FFT is the bit-reversed complex Butterfly of ``fft``; both permutations are merged into ``perm``.
    """
    _check_transform_n(n, "dct")
    half = n // 2
    m = torch.arange(half)
    reorder = torch.empty(n, dtype=torch.long)
    reorder[m] = 2 * m
    reorder[n - 1 - m] = 2 * m + 1
    perm = reorder[_bit_reversal(n)]  # fft input a[i] = v[br[i]] = x[reorder[br[i]]]
    bf = _transform_butterfly(n, _fft_twiddle(n, False, 1.0), True, device, dtype, impl)
    k = torch.arange(n, dtype=torch.float64)
    post = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n)).to(bf.twiddle.dtype)
    return ButterflyTransform(bf, perm.to(device), post.to(device), real_output=True)


def hadamard(n, normalized=False, device=None, dtype=None, impl="auto"):
    """Sylvester Hadamard module: H_n = H_2 kron H_{n/2}, H_2 = [[1, 1], [1, -1]] (times 1/sqrt(n) if
    normalized). Every factor is H_2 at its stride (the factors commute); real Butterfly, identity perm."""
    _check_transform_n(n, "hadamard")
    log_n = n.bit_length() - 1
    scale = 2 ** -0.5 if normalized else 1.0
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) * scale
    tw = h2.expand(1, 1, log_n, n // 2, 2, 2).to(torch.complex128)
    bf = _transform_butterfly(n, tw, False, device, dtype, impl)
    return ButterflyTransform(bf, torch.arange(n, device=device))


# --------------------------------------------------------------------------------------------------------
# Flat block butterfly ("pixelfly") linear layer
# --------------------------------------------------------------------------------------------------------
def flat_butterfly_mask(butterfly_size, n_factors, device=None):
    """(butterfly_size, butterfly_size) bool mask: union of the butterfly factor masks at strides
    1, 2, ..., 2**(n_factors-1). Factor at stride s has entries (i, i) and (i, i XOR s)."""
    i = torch.arange(butterfly_size, device=device)
    mask = i[:, None] == i[None, :]
    for k in range(n_factors):
        mask |= (i[:, None] ^ (1 << k)) == i[None, :]
    return mask


def _stretch_cover(num_blocks, block, extended, butterfly_size, device):
    """(num_blocks, butterfly_size) bool: which mask rows the elements of each block map to, where element
    r of an ``extended``-long axis maps to mask row (r * butterfly_size) // extended. When butterfly_size
    divides ``extended`` this is fly's ``repeat('b -> (b f)')`` stretch."""
    r = torch.arange(extended, device=device)
    rows = (r * butterfly_size) // extended
    cover = torch.zeros(num_blocks, butterfly_size, dtype=torch.bool, device=device)
    cover[r // block, rows] = True
    return cover


class FlatBlockButterflyLinear(nn.Module):
    """Block-sparse linear layer with the flat block butterfly ("pixelfly") pattern, plus optional low rank.

    y = x @ (mask * W).T + (x @ V.T) @ U.T + bias, x (..., in_features), y (..., out_features).

    Layout (as HazyResearch/fly's FlatBlockButterflySparsityConfig): features are padded to multiples of
    ``block`` (in_ext, out_ext); the (butterfly_size, butterfly_size) mask from ``flat_butterfly_mask`` is
    stretched over the (out_ext, in_ext) matrix (element (r, c) -> mask entry (r*bs//out_ext, c*bs//in_ext),
    i.e. each mask entry covers an (out_ext/bs) x (in_ext/bs) rectangle when bs divides both), and a
    (block x block) tile is kept iff it touches a nonzero mask entry. With out_ext = in_ext = bs*block
    every mask entry is exactly one block. Only kept blocks are stored.

    Parameters: ``weight`` (nnz_blocks, block, block) where weight[z] is the dense tile at block row
    ``row_idx[z]``, block column ``col_idx[z]`` (buffers); ``lowrank_u`` (out_features, rank) and
    ``lowrank_v`` (rank, in_features) if lowrank_rank > 0; ``bias`` (out_features,).
    Init: tiles uniform with nn.Linear's bound 1/sqrt(fan_in) scaled by sqrt(1/density) so the output
    variance matches a dense nn.Linear (fly's rule); V and U like nn.Linear with fan_in in_features / rank.
    """

    def __init__(self, in_features, out_features, butterfly_size, n_factors, block, lowrank_rank=0, bias=True,
                 device=None, dtype=None):
        super().__init__()
        who = "FlatBlockButterflyLinear"
        _check_pos_int(in_features, "in_features", who)
        _check_pos_int(out_features, "out_features", who)
        _check_pos_int(block, "block", who)
        if isinstance(butterfly_size, bool) or not isinstance(butterfly_size, int) or butterfly_size < 2 \
                or not _is_pow2(butterfly_size):
            raise ValueError(f"{who}: butterfly_size must be a power of 2 >= 2, got {butterfly_size!r}")
        log_bs = butterfly_size.bit_length() - 1
        if isinstance(n_factors, bool) or not isinstance(n_factors, int) or not 1 <= n_factors <= log_bs:
            raise ValueError(f"{who}: n_factors must be an integer in [1, log2(butterfly_size)={log_bs}], "
                             f"got {n_factors!r}")
        if isinstance(lowrank_rank, bool) or not isinstance(lowrank_rank, int) or lowrank_rank < 0:
            raise ValueError(f"{who}: lowrank_rank must be an integer >= 0, got {lowrank_rank!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.butterfly_size, self.n_factors, self.block = butterfly_size, n_factors, block
        self.lowrank_rank = lowrank_rank
        self.nb_in = -(-in_features // block)
        self.nb_out = -(-out_features // block)
        self.in_ext, self.out_ext = self.nb_in * block, self.nb_out * block

        mask = flat_butterfly_mask(butterfly_size, n_factors).float()
        row_cover = _stretch_cover(self.nb_out, block, self.out_ext, butterfly_size, None).float()
        col_cover = _stretch_cover(self.nb_in, block, self.in_ext, butterfly_size, None).float()
        layout = (row_cover @ mask @ col_cover.T) > 0  # (nb_out, nb_in)
        rows, cols = layout.nonzero(as_tuple=True)
        self.register_buffer("layout", layout.to(device))
        self.register_buffer("row_idx", rows.to(device))
        self.register_buffer("col_idx", cols.to(device))
        self.nnz_blocks = int(rows.numel())
        struct = self._structured_index(layout, rows)  # None: generic gather path
        self.register_buffer("struct_idx", None if struct is None else struct[0].to(device), persistent=False)
        self.register_buffer("struct_perm", None if struct is None else struct[1].to(device), persistent=False)

        self.weight = nn.Parameter(torch.empty(self.nnz_blocks, block, block, **factory))
        if lowrank_rank > 0:
            self.lowrank_u = nn.Parameter(torch.empty(out_features, lowrank_rank, **factory))
            self.lowrank_v = nn.Parameter(torch.empty(lowrank_rank, in_features, **factory))
        else:
            self.register_parameter("lowrank_u", None)
            self.register_parameter("lowrank_v", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _structured_index(self, layout, rows):
        """((K, bs, a, c) indices into ``weight``, (K, bs) partner permutations) for the fast path, or None.

        When bs divides both block counts, the layout is kron(mask, ones(a, c)) (a = nb_out/bs, c = nb_in/bs),
        and the mask is a disjoint union of K = n_factors + 1 permutations pi_k (identity, i XOR 2**k). Then
        y_group[i] = sum_k W_k[i] x_group[pi_k(i)] with dense (a*block, c*block) groups W_k[i]: K batched
        matmuls whose activations are only as large as x and y (the generic gather path materialises one
        input block per stored block, i.e. (blocks per row) x the output size).
        """
        bs = self.butterfly_size
        if self.nb_out % bs or self.nb_in % bs:
            return None
        a, c = self.nb_out // bs, self.nb_in // bs
        zmap = torch.full(layout.shape, -1, dtype=torch.long)
        zmap[layout] = torch.arange(rows.numel())  # row-major order, the same order as nonzero()
        i = torch.arange(bs)
        perms = [i] + [i ^ (1 << k) for k in range(self.n_factors)]
        idx = torch.stack([
            zmap.reshape(bs, a, bs, c)[i, :, p, :] for p in perms  # (bs, a, c): group i, partner p[i]
        ])
        if bool((idx < 0).any()):  # cannot happen for the flat butterfly mask; keep the generic path if so
            return None
        return idx, torch.stack(perms)

    @property
    def density(self):
        """Fraction of the padded (out_ext, in_ext) matrix stored in nonzero blocks."""
        return self.nnz_blocks * self.block ** 2 / (self.out_ext * self.in_ext)

    def reset_parameters(self):
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_ext) / math.sqrt(self.density)
            self.weight.uniform_(-bound, bound)
            if self.lowrank_u is not None:
                self.lowrank_v.uniform_(-1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))
                b = 1.0 / math.sqrt(self.lowrank_rank)
                self.lowrank_u.uniform_(-b, b)
            if self.bias is not None:
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)

    def forward(self, x):
        """x: (..., in_features) -> (..., out_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FlatBlockButterflyLinear: input last dim must be in_features={self.in_features}, "
                             f"got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        batch = x2.shape[0]
        xp = F.pad(x2, (0, self.in_ext - self.in_features)) if self.in_ext > self.in_features else x2
        if self.struct_idx is not None:
            y = self._forward_structured(xp)
        else:
            xb = xp.reshape(batch, self.nb_in, self.block)
            # Gather the input block each stored tile reads, multiply all tiles in one batched matmul, then
            # scatter-add the tile outputs into their block rows.
            gathered = xb.index_select(1, self.col_idx).transpose(0, 1)  # (nnz, batch, block)
            prod = torch.bmm(gathered, self.weight.transpose(1, 2))  # (nnz, batch, block)
            out = prod.new_zeros(self.nb_out, batch, self.block).index_add_(0, self.row_idx, prod)
            y = out.permute(1, 0, 2).reshape(batch, self.out_ext)
        y = y[:, : self.out_features]
        if self.lowrank_u is not None:
            y = y + (x2 @ self.lowrank_v.T) @ self.lowrank_u.T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # under autocast keep the output in the matmul dtype
        return y.reshape(*lead, self.out_features)

    def _forward_structured(self, xp):
        """xp (batch, in_ext) -> (batch, out_ext) via K group-batched matmuls (see _structured_index)."""
        bs, blk = self.butterfly_size, self.block
        k_terms, _, a, c = self.struct_idx.shape
        batch = xp.shape[0]
        # (K, bs, a, c, blk, blk) -> (K, bs, a*blk, c*blk): a gather of the parameters (cheap: weight-sized)
        w = self.weight[self.struct_idx].permute(0, 1, 2, 4, 3, 5).reshape(k_terms, bs, a * blk, c * blk)
        xg = xp.reshape(batch, bs, c * blk).transpose(0, 1)  # (bs, batch, c*blk)
        out = None
        for k in range(k_terms):
            term = torch.bmm(xg[self.struct_perm[k]], w[k].transpose(1, 2))  # (bs, batch, a*blk)
            out = term if out is None else out + term
        return out.transpose(0, 1).reshape(batch, self.out_ext)

    def sparse_dense_weight(self):
        """Dense (out_features, in_features) masked weight of the block-sparse part only."""
        w = self.weight.new_zeros(self.nb_out, self.nb_in, self.block, self.block)
        w = w.index_put((self.row_idx, self.col_idx), self.weight)
        w = w.permute(0, 2, 1, 3).reshape(self.out_ext, self.in_ext)
        return w[: self.out_features, : self.in_features]

    def to_dense(self):
        """Dense (out_features, in_features) weight: masked block-sparse part + U @ V (no bias)."""
        w = self.sparse_dense_weight()
        if self.lowrank_u is not None:
            w = w + self.lowrank_u @ self.lowrank_v
        return w

    def flops(self, batch_tokens=1):
        """2 ops per multiply-accumulate really computed (padded tile rows/cols included) + bias adds."""
        total = 2 * self.nnz_blocks * self.block ** 2
        if self.lowrank_u is not None:
            total += 2 * self.lowrank_rank * (self.in_features + self.out_features)
        if self.bias is not None:
            total += self.out_features
        return int(batch_tokens) * total

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"butterfly_size={self.butterfly_size}, n_factors={self.n_factors}, block={self.block}, "
                f"nnz_blocks={self.nnz_blocks}/{self.nb_out * self.nb_in}, lowrank_rank={self.lowrank_rank}, "
                f"bias={self.bias is not None}")
