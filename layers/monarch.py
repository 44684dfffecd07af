"""Monarch matrices (Dao et al., ICML 2022) as a drop-in replacement for ``nn.Linear``.

One self-contained file: it imports only torch and the standard library, so it can be copied alone into
another repository. An optional compiled kernel (``cuda.monarch_ops`` in the repository this file comes
from) is imported lazily; without it everything runs on the pure-PyTorch reference.

Block layout (the one of HazyResearch/fly, so fly's state dicts load unchanged)
------------------------------------------------------------------------------
A Monarch product is ``y = P2 . BD(w2) . P1 . BD(w1) . x`` with

* ``w1`` of shape (k, q, p): ``k`` dense blocks, each mapping ``p`` inputs to ``q`` outputs,
* ``w2`` of shape (l, s, r): ``l`` dense blocks, each mapping ``r`` inputs to ``s`` outputs,
* ``k * q == l * r`` (the size of the intermediate vector),
* ``P1``: the intermediate vector (index ``kk*q + qq``) is read as an (r, l) grid and transposed to (l, r),
* ``P2``: the output (index ``ll*s + ss``) is read as an (l, s) grid and transposed to (s, l).

Written out, the dense (l*s, k*p) matrix of the product is::

    M[ss*l + ll, kk*p + pp] = sum_{i : i % l == ll, i // q == kk} w2[ll, ss, i // l] * w1[kk, i % q, pp]

i.e. every intermediate index ``i`` adds one rank-one term to exactly one (output group ``ll``, input block
``kk``) sub-matrix. ``MonarchLinear.from_dense`` exploits this: the set of Monarch matrices is exactly the
set of matrices whose (ll, kk) sub-matrices have rank <= the number of intermediate indices owned by the
pair, so the Frobenius-closest Monarch matrix is a truncated SVD of each sub-matrix (Eckart-Young,
block by block). With fly's square-root layout (q == l) every pair owns one index and the blocks are rank
one, as in the paper's Algorithm 1; with fly's ``MonarchLinear`` shapes (q = ceil(in/nblocks) or
ceil(out/nblocks)) a pair owns about q / nblocks indices.

Kernel dispatch contract (``monarch_multiply(..., impl=...)``)
---------------------------------------------------------------
``cuda.monarch_ops`` must expose ``kernel_available() -> (bool, str)`` and
``monarch_multiply(x, w1, w2)`` with the semantics of ``monarch_multiply_ref``. It may raise
``NotImplementedError`` for inputs it does not support (device, dtype): ``impl='auto'`` then uses the
reference for that call. ``impl='auto'`` warns once per process when the kernel cannot be used at all;
``impl='kernel'`` raises ``RuntimeError`` instead; ``impl='ref'`` never imports the kernel.
"""

import importlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["monarch_multiply_ref", "monarch_multiply", "MonarchLinear"]

_IMPLS = ("auto", "kernel", "ref")
_KERNEL_MODULE = "cuda.monarch_ops"

# Kernel state, resolved once per process: (module or None, error text). None until first needed.
_kernel_state = None
# The fallback warning of impl='auto' is emitted at most once per process.
_warned_fallback = False


# --------------------------------------------------------------------------------------------------------
# The reference product
# --------------------------------------------------------------------------------------------------------
def _check_factors(x, w1, w2):
    if not isinstance(x, torch.Tensor) or not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor):
        raise ValueError("monarch_multiply: x, w1 and w2 must be torch.Tensors")
    if w1.ndim != 3:
        raise ValueError(f"monarch_multiply: w1 must be 3-D (k, q, p), got shape {tuple(w1.shape)}")
    if w2.ndim != 3:
        raise ValueError(f"monarch_multiply: w2 must be 3-D (l, s, r), got shape {tuple(w2.shape)}")
    if x.ndim < 1:
        raise ValueError("monarch_multiply: x must have at least one dimension (..., k*p), got a scalar")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if x.shape[-1] != k * p:
        raise ValueError(
            f"monarch_multiply: x has last dimension {x.shape[-1]} but w1 {tuple(w1.shape)} needs k*p = {k * p}"
        )
    if k * q != l * r:
        raise ValueError(
            f"monarch_multiply: w1 {tuple(w1.shape)} produces k*q = {k * q} intermediate features but "
            f"w2 {tuple(w2.shape)} consumes l*r = {l * r}; they must be equal"
        )


def monarch_multiply_ref(x, w1, w2):
    """Pure-PyTorch Monarch product ``P2 . BD(w2) . P1 . BD(w1) . x`` (fly's layout, see module docstring).

    Args:
        x:  (..., k*p), any number of leading batch dimensions (including none).
        w1: (k, q, p) first block-diagonal factor.
        w2: (l, s, r) second block-diagonal factor, with l*r == k*q.
    Returns:
        (..., l*s). Differentiable in all three arguments. Uses ``torch.matmul`` so autocast applies.
    """
    _check_factors(x, w1, w2)
    return _monarch_product(x, w1, w2)


def _monarch_product(x, w1, w2):
    """``monarch_multiply_ref`` without the argument checks (for callers that have made them)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch_shape = x.shape[:-1]
    b = math.prod(batch_shape)
    # (b, k, p) -> (k, b, p): one batched matmul per input block.
    xb = x.reshape(b, k, p).transpose(0, 1)
    h = torch.matmul(xb, w1.transpose(-1, -2))  # (k, b, q); h[kk, :, qq] is intermediate index kk*q + qq
    # Flatten to (b, k*q), read the intermediate index as (r, l) and bring l to the front: (l, b, r).
    h = h.transpose(0, 1).reshape(b, r, l).permute(2, 0, 1)
    o = torch.matmul(h, w2.transpose(-1, -2))  # (l, b, s)
    # Output index ss*l + ll: (l, b, s) -> (b, s, l) -> (b, s*l).
    return o.permute(1, 2, 0).reshape(*batch_shape, s * l)


# --------------------------------------------------------------------------------------------------------
# Dispatch to the optional compiled kernel
# --------------------------------------------------------------------------------------------------------
def _first_lines(text, n=3):
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    head = " | ".join(lines[:n])
    return head + (" | ..." if len(lines) > n else "")


def _load_kernel():
    """Returns (module or None, error text); imported lazily and cached for the process."""
    global _kernel_state
    if _kernel_state is None:
        try:
            # importlib (not an import statement) so the module can live anywhere sys.modules points to.
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
            f"monarch: compiled kernel {_KERNEL_MODULE} not used ({_first_lines(reason)}); falling back to the "
            "pure-PyTorch reference (same results, slower). Pass impl='ref' to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )


def _autocast_cast(*tensors):
    """Casts float16/bfloat16/float32 tensors to the autocast dtype, as autocast does for matmul.

    Done explicitly so the compiled kernel (which may not be registered with autocast) sees exactly the
    dtypes the reference would compute in. float64 is left alone, as autocast leaves it alone.
    """
    dev = tensors[0].device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    eligible = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.to(dt) if t.dtype in eligible else t for t in tensors)


def monarch_multiply(x, w1, w2, impl="auto"):
    """Monarch product with optional compiled kernel; same arguments and result as ``monarch_multiply_ref``.

    Args:
        x: (..., k*p); w1: (k, q, p); w2: (l, s, r) with l*r == k*q.
        impl: 'auto' (kernel if usable, else reference with one warning per process),
              'kernel' (kernel or RuntimeError), 'ref' (reference; never imports the kernel).
    Returns:
        (..., l*s).
    """
    if impl not in _IMPLS:
        raise ValueError(f"monarch_multiply: impl must be one of {_IMPLS}, got {impl!r}")
    _check_factors(x, w1, w2)
    x, w1, w2 = _autocast_cast(x, w1, w2)
    if impl == "ref":
        return monarch_multiply_ref(x, w1, w2)
    mod, err = _load_kernel()
    if mod is None:
        if impl == "kernel":
            raise RuntimeError(
                f"monarch_multiply: impl='kernel' but {_KERNEL_MODULE} is unavailable: {_first_lines(err, 6)}. "
                "Build the kernel or use impl='auto'/'ref'."
            )
        _warn_fallback(err)
        return monarch_multiply_ref(x, w1, w2)
    if impl == "kernel":
        return mod.monarch_multiply(x, w1, w2)
    try:
        return mod.monarch_multiply(x, w1, w2)
    except NotImplementedError as e:  # the kernel's documented signal for unsupported device/dtype
        _warn_fallback(f"NotImplementedError: {e}")
        return monarch_multiply_ref(x, w1, w2)


# --------------------------------------------------------------------------------------------------------
# Projection of a dense matrix onto Monarch factors
# --------------------------------------------------------------------------------------------------------
def _monarch_project(dense, k, q, p, l, s, r):
    """Frobenius-closest Monarch factors for a (l*s, k*p) matrix: block-wise truncated SVD.

    Sub-matrix (ll, kk) is ``dense[ss*l + ll, kk*p + pp]`` over (ss, pp); intermediate index i contributes
    the rank-one term w2[i%l, :, i//l] (x) w1[i//q, i%q, :] to pair (i % l, i // q) and to no other pair,
    and no parameter is shared between pairs. So the Monarch set is {M : rank(M_(ll,kk)) <= t_(ll,kk)} with
    t = number of indices the pair owns, and the projection is the rank-t SVD of each sub-matrix.

    Returns w1 (k, q, p) and w2 (l, s, r) in ``dense``'s dtype (SVD done in float32 at least).
    """
    out_dtype = dense.dtype
    work = dense if dense.dtype == torch.float64 else dense.float()
    blocks = work.reshape(s, l, k, p).permute(1, 2, 0, 3)  # (l, k, s, p)
    u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)  # (l,k,s,m), (l,k,m), (l,k,m,p)
    root = sv.sqrt()
    us = u * root.unsqueeze(-2)  # (l, k, s, m): columns scaled by sqrt(sigma)
    vs = vh * root.unsqueeze(-1)  # (l, k, m, p): rows scaled by sqrt(sigma)

    n = k * q
    i = torch.arange(n, device=dense.device)
    ll, rr = i % l, i // l  # position of index i in the (r, l) grid that feeds w2
    kk, qq = i // q, i % q  # position of index i in w1's output
    # Rank slot of i inside its pair: indices of a pair are i = rr*l + ll >= kk*q, so they start at
    # rr_first = ceil((kk*q - ll) / l); the j-th one (in increasing i) gets singular component j.
    first = -torch.div(ll - kk * q, l, rounding_mode="floor")
    j = rr - first
    m = sv.shape[-1]
    t_max = int(j.max().item()) + 1
    if t_max > m:  # more slots than the block's rank can use: the extra rank-one terms are zero
        us = F.pad(us, (0, t_max - m))
        vs = F.pad(vs, (0, 0, 0, t_max - m))

    w1 = work.new_zeros(k, q, p)
    w2 = work.new_zeros(l, s, r)
    w2[ll, :, rr] = us[ll, kk, :, j]  # (n, s)
    w1[kk, qq, :] = vs[ll, kk, j, :]  # (n, p)
    return w1.to(out_dtype), w2.to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------
def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MonarchLinear: {name} must be a positive int, got {value!r}")


class MonarchLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with a Monarch weight (parameter layout of HazyResearch/fly).

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        nblocks: number of blocks of each block-diagonal factor; 1 <= nblocks <= min(in, out).
        bias: learnable bias of shape (out_features,).
        device, dtype: factory kwargs.
        impl: 'auto' | 'kernel' | 'ref', see ``monarch_multiply``.

    Parameters (ib = ceil(in/nblocks), ob = ceil(out/nblocks)):
        if ib < ob:  blkdiag1 (nblocks, ib, ib), blkdiag2 (nblocks, ob, ib)
        else:        blkdiag1 (nblocks, ob, ib), blkdiag2 (nblocks, ob, ob)
        bias (out_features,) or None.

    Shapes: input (..., in_features) is zero-padded to (..., ib*nblocks), multiplied, and the
    (..., ob*nblocks) result is sliced to (..., out_features).

    Cost: a token costs 2*(blkdiag1.numel() + blkdiag2.numel()) FLOPs (+ out_features for the bias) instead
    of nn.Linear's 2*in*out (+ out). For in == out == n divisible by nblocks that is 4*n*n/nblocks, i.e.
    2/nblocks of dense; parameters shrink by the same ratio. See ``flops`` and ``dense_flops``.
    """

    def __init__(self, in_features, out_features, nblocks=4, bias=True, device=None, dtype=None, impl="auto"):
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1:
            raise ValueError(f"MonarchLinear: nblocks must be an int >= 1, got {nblocks!r}")
        if nblocks > in_features or nblocks > out_features:
            # More blocks than features would leave whole blocks made only of padding.
            raise ValueError(
                f"MonarchLinear: nblocks={nblocks} is larger than in_features={in_features} or "
                f"out_features={out_features}; use nblocks <= {min(in_features, out_features)}"
            )
        if impl not in _IMPLS:
            raise ValueError(f"MonarchLinear: impl must be one of {_IMPLS}, got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.impl = impl
        ib = math.ceil(in_features / nblocks)
        ob = math.ceil(out_features / nblocks)
        self.in_blksz, self.out_blksz = ib, ob
        # fly's choice: the square factor sits on the smaller side so the intermediate size is
        # nblocks*min(ib, ob) and both bmm's stay as small as possible.
        if ib < ob:
            shape1, shape2 = (nblocks, ib, ib), (nblocks, ob, ib)
        else:
            shape1, shape2 = (nblocks, ob, ib), (nblocks, ob, ob)
        self.blkdiag1 = nn.Parameter(torch.empty(shape1, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(shape2, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's init, applied per factor.

        nn.Linear uses kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); here fan_in of
        each factor is its block input size (last dim), since that is what each output of the block sums
        over. The bias uses fan_in = in_features exactly like nn.Linear.
        """
        with torch.no_grad():
            for w in (self.blkdiag1, self.blkdiag2):
                bound = 1.0 / math.sqrt(w.shape[-1])
                w.uniform_(-bound, bound)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @property
    def padded_in_features(self):
        return self.in_blksz * self.nblocks

    @property
    def padded_out_features(self):
        return self.blkdiag2.shape[0] * self.blkdiag2.shape[1]

    def forward(self, x):
        """x: (..., in_features) -> (..., out_features). Under autocast, factors and input are cast to the
        autocast dtype (as nn.Linear's matmul would be) and the bias is added in the output dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MonarchLinear: input has last dimension {x.shape[-1]}, expected in_features={self.in_features}"
            )
        pad = self.padded_in_features - self.in_features
        if pad:
            x = F.pad(x, (0, pad))  # zero columns: the padded inputs contribute nothing
        y = monarch_multiply(x, self.blkdiag1, self.blkdiag2, impl=self.impl)
        if self.padded_out_features != self.out_features:
            y = y[..., : self.out_features]
        if self.bias is not None:
            # Cast the bias so a bf16/fp16 (autocast) output is not silently promoted to float32.
            y = y + self.bias.to(y.dtype)
        return y

    def to_dense(self):
        """The exact dense weight (out_features, in_features) with ``forward(x) == x @ W.T + bias``.

        Computed by pushing the identity through the reference product (differentiable, parameter dtype).
        """
        eye = torch.eye(self.in_features, device=self.blkdiag1.device, dtype=self.blkdiag1.dtype)
        eye = F.pad(eye, (0, self.padded_in_features - self.in_features))
        cols = monarch_multiply_ref(eye, self.blkdiag1, self.blkdiag2)  # (in, padded_out): row j = W[:, j]
        return cols[:, : self.out_features].t()

    @classmethod
    def from_dense(cls, weight_or_linear, nblocks=4, bias=None, impl="auto"):
        """The MonarchLinear whose weight is Frobenius-closest to a dense weight.

        Args:
            weight_or_linear: an (out, in) floating-point tensor or an ``nn.Linear``.
            nblocks: as in the constructor.
            bias: None -> the nn.Linear's bias if one is given (no bias for a plain tensor);
                  a tensor (out,) -> that bias; False -> no bias.
            impl: as in the constructor.
        Returns:
            MonarchLinear on the weight's device and dtype.

        Padding: the layer's weight is the top-left (out, in) corner of an (ob*nblocks, ib*nblocks) Monarch
        matrix; the padded rows/columns are never seen. We project the zero-padded dense matrix. This is the
        exact optimum over the visible corner: within every (output group, input block) sub-matrix the
        visible entries form a row subset x column subset, the best rank-t fit of a matrix whose other
        rows/columns are zero is the rank-t SVD of the visible part padded with zeros, and its error on the
        visible part is the smallest possible. In particular a matrix produced by a MonarchLinear (whatever
        its hidden rows were) is recovered exactly.
        """
        lin_bias = None
        if isinstance(weight_or_linear, nn.Linear):
            weight = weight_or_linear.weight
            lin_bias = weight_or_linear.bias
        elif isinstance(weight_or_linear, torch.Tensor):
            weight = weight_or_linear
        else:
            raise ValueError(
                f"MonarchLinear.from_dense: weight_or_linear must be a tensor or nn.Linear, "
                f"got {type(weight_or_linear).__name__}"
            )
        if weight.ndim != 2:
            raise ValueError(
                f"MonarchLinear.from_dense: weight must be 2-D (out_features, in_features), "
                f"got shape {tuple(weight.shape)}"
            )
        if not weight.is_floating_point():
            raise ValueError(f"MonarchLinear.from_dense: weight must be floating point, got {weight.dtype}")
        out_features, in_features = weight.shape
        if bias is None:
            bias = lin_bias
        elif bias is False:
            bias = None
        elif isinstance(bias, torch.Tensor):
            if bias.shape != (out_features,):
                raise ValueError(
                    f"MonarchLinear.from_dense: bias must have shape ({out_features},), got {tuple(bias.shape)}"
                )
        else:
            raise ValueError(f"MonarchLinear.from_dense: bias must be None, False or a tensor, got {bias!r}")

        layer = cls(in_features, out_features, nblocks=nblocks, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype, impl=impl)
        k, q, p = layer.blkdiag1.shape
        l, s, r = layer.blkdiag2.shape
        with torch.no_grad():
            w = weight.detach()
            padded = w.new_zeros(l * s, k * p)
            padded[:out_features, :in_features] = w
            w1, w2 = _monarch_project(padded, k, q, p, l, s, r)
            layer.blkdiag1.copy_(w1)
            layer.blkdiag2.copy_(w2)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def flops(self, batch_tokens):
        """FLOPs really computed for ``batch_tokens`` input vectors: 2 per multiply-add of both factors on
        the padded sizes, plus one add per output for the bias."""
        per_token = 2 * (self.blkdiag1.numel() + self.blkdiag2.numel())
        if self.bias is not None:
            per_token += self.out_features
        return batch_tokens * per_token

    def dense_flops(self, batch_tokens):
        """FLOPs of the ``nn.Linear(in, out, bias)`` this layer replaces: 2*in*out (+ out for the bias)."""
        per_token = 2 * self.in_features * self.out_features
        if self.bias is not None:
            per_token += self.out_features
        return batch_tokens * per_token

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}, impl={self.impl!r}"
        )
