"""FLOPs and parameters that a network really computes and stores (dense, structured and masked layers).

``count_flops(model, example_input, nonzero_only=False)`` -> ``{'total': int, 'per_image': float,
'by_module': {qualified name: int}, 'other': int, 'other_by_op': {op name: int}}`` for ONE forward pass of
``example_input`` (eval mode, no grad). ``count_params(model, nonzero_only=False)`` -> int.

Convention (one FLOP = one multiply or one add; a multiply-add is 2 FLOPs):

- ``nn.Linear``: 2 * weight elements * rows + 1 per output element for the bias.
  ``nn.Conv2d`` (any stride / dilation / groups): 2 * weight elements * output positions (N * H_out * W_out)
  + 1 per output element for the bias. For SeaM masked layers (``layers.mask.MaskConv`` / ``MaskLinear`` with masks
  enabled), or for any layer when ``nonzero_only=True``, only the NONZERO effective weights (weight * (mask > 0))
  and bias entries are counted: SeaM's way, a kept weight costs one multiply-add per output position.
- A module with a ``.flops(batch_tokens)`` method (``MonarchLinear``, ``Butterfly``, ``FlatBlockButterflyLinear``,
  ``ButterflyTransform``) is counted by that method with batch_tokens = input elements / last-dim size, i.e. the
  structured product actually computed (block-diagonal factors, butterfly factors), never the dense equivalent.
  Nothing inside such a module is counted again.
- ``BatchNorm{1,2,3}d`` in eval: 2 per element (the folded scale and shift). ``LayerNorm`` / ``GroupNorm``: 6 per
  element (mean: 1 add; variance: subtract, square, add; normalise: subtract, multiply by the per-row 1/std) + 2 per
  element with an affine (scale, shift); the per-row rsqrt is not counted.
- Every other matrix product (attention ``q @ k^T`` and ``attn @ v``, fused ``scaled_dot_product_attention``, the
  performer's random-feature products, ``bmm`` / ``einsum`` in a model's own forward) is counted EXACTLY by a
  ``torch.utils.flop_counter.FlopCounterMode`` pass on the same input (2 FLOPs per multiply-add, as above; the CPU
  fused attention kernel, which torch's table lacks, is added with torch's own SDPA formula). To avoid double
  counting, what FlopCounterMode attributes to a hooked module (above) is subtracted: ``other`` = FlopCounterMode's
  global total - its totals inside the hooked modules. So the two counts never overlap, and a structured layer's
  internal ``bmm``s count through its ``.flops`` only.
- Not counted: activations (ReLU, GELU, SiLU, exp, softmax), pooling, residual adds, reshapes, dropout.

Why hooks + FlopCounterMode rather than FlopCounterMode alone: FlopCounterMode sees the ops a layer happens to run
(a masked layer multiplies the full dense weight; a reference Monarch implementation may pad), while the hooks count
what the layer's structure requires. Why not hooks alone: attention products are functional calls no hook sees.
"""
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ['count_flops', 'count_params', 'format_count']

_NORM_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_LN = (nn.LayerNorm, nn.GroupNorm)


def _has_flops(m):
    return callable(getattr(m, 'flops', None)) and not isinstance(m, (nn.Linear, nn.Conv2d))


def _masks_on(m):
    return getattr(m, 'weight_mask', None) is not None and callable(getattr(m, 'masked_weight_bias', None))


def _effective_counts(m, nonzero_only):
    """(weight elements, bias elements) a Linear/Conv layer really multiplies with."""
    if _masks_on(m):
        w, b = m.masked_weight_bias()
        nonzero_only = True  # a masked-out weight is not computed (SeaM's convention)
    else:
        w, b = m.weight, m.bias
    if nonzero_only:
        return int((w != 0).sum()), 0 if b is None else int((b != 0).sum())
    return w.numel(), 0 if b is None else b.numel()


def _counted_modules(model):
    """(name, module) pairs counted by hooks; descendants of a counted module are skipped (no double counting)."""
    out, skip = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + '.') for p in skip):
            continue
        if _has_flops(m) or isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _NORM_BN + _NORM_LN):
            out.append((name, m))
            skip.append(name)
    return out


def _layer_flops(m, inp, out, nonzero_only):
    x = inp[0]
    if _has_flops(m):
        return int(m.flops(x.numel() // x.shape[-1]))
    if isinstance(m, nn.Linear):
        nw, nb = _effective_counts(m, nonzero_only)
        rows = out.numel() // out.shape[-1]
        return 2 * nw * rows + nb * rows
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nw, nb = _effective_counts(m, nonzero_only)
        positions = out.numel() // out.shape[1]  # N * spatial output size
        return 2 * nw * positions + nb * positions
    if isinstance(m, _NORM_BN):
        return 2 * out.numel()
    affine = getattr(m, 'elementwise_affine', getattr(m, 'affine', False))
    return (8 if affine else 6) * out.numel()


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def count_flops(model, example_input, nonzero_only=False):
    """FLOPs of one forward of ``model`` on ``example_input`` (a tensor (N, ...) or a tuple of positional inputs).

    Returns ``{'total', 'per_image' (total / N), 'by_module' (hooked layers, by qualified name), 'other' (products
    outside hooked layers, e.g. attention), 'other_by_op'}``. See the module docstring for the convention.
    ``nonzero_only=True`` counts only nonzero weights / bias entries of every Linear / Conv layer."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not torch.is_tensor(inputs[0]) or inputs[0].dim() < 1:
        raise ValueError("example_input must be a tensor (N, ...) or a tuple whose first item is one")
    counted = _counted_modules(model)
    names = {id(m): n for n, m in counted}
    by_module = {}

    def hook(m, inp, out):
        n = names[id(m)]
        by_module[n] = by_module.get(n, 0) + _layer_flops(m, inp, out, nonzero_only)

    handles = [m.register_forward_hook(hook) for _, m in counted]
    was_training = model.training
    model.eval()
    mapping = {}
    if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
    fc = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        with torch.no_grad(), fc:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # FlopCounterMode names modules '<RootClass>.<qualified name>' (root: '<RootClass>'), 'Global' = everything.
    counts = fc.get_flop_counts()
    root = type(model).__name__
    glob = {str(op): int(v) for op, v in counts.get('Global', {}).items()}
    inside = {}
    for n, _ in counted:
        key = root if n == '' else f'{root}.{n}'
        for op, v in counts.get(key, {}).items():
            inside[str(op)] = inside.get(str(op), 0) + int(v)
    other_by_op = {op: v - inside.get(op, 0) for op, v in glob.items() if v - inside.get(op, 0)}
    other = sum(other_by_op.values())
    total = sum(by_module.values()) + other
    return {'total': total, 'per_image': total / inputs[0].shape[0], 'by_module': by_module, 'other': other,
            'other_by_op': other_by_op}


def count_params(model, nonzero_only=False):
    """Parameters of the network as deployed: every parameter element, except SeaM mask scores (``weight_mask`` /
    ``bias_mask`` / ``channel_mask``: training-time selectors, not weights). For a layer with masks enabled, or for
    every parameter when ``nonzero_only=True``, only nonzero effective entries (weight * (mask > 0)) count. Buffers
    (BatchNorm statistics, the performer's fixed projection) are not parameters and are not counted."""
    total, seen = 0, set()
    with torch.no_grad():
        for m in model.modules():
            total += _module_params(m, seen, nonzero_only)
    return total


def _module_params(m, seen, nonzero_only):
    """Parameter elements held directly by ``m`` (not its children); ``seen`` skips shared parameters."""
    total, masked = 0, _masks_on(m)
    eff = dict(zip(('weight', 'bias'), m.masked_weight_bias())) if masked else {}
    for pname, p in m.named_parameters(recurse=False):
        if id(p) in seen or (masked and pname in ('weight_mask', 'bias_mask', 'channel_mask')):
            continue
        seen.add(id(p))
        t = eff.get(pname, p)
        total += int((t != 0).sum()) if (masked or nonzero_only) else t.numel()
    return total


def format_count(n):
    """1234567 -> '1.23M' (K, M, G, T)."""
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.2f}{unit}'
    return f'{n:.0f}' if float(n).is_integer() else f'{n:.2f}'
