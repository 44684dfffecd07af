"""SeaM weight masks: linear and convolution layers whose weights can be switched off by learned binary masks.

SeaM (Qi et al., ICSE 2023, "Reusing Deep Neural Network Models through Model Re-engineering") freezes a trained
network and learns one real-valued mask score per weight; the forward pass keeps a weight where its score is > 0.
The binarisation is trained with a straight-through estimator whose backward pass is a hardtanh.

This file imports only torch and the standard library, so it can be copied alone into another repository.

Usage::

    layer = MaskConv(3, 16, 3, padding=1)       # exactly an nn.Conv2d; plain state dicts load into it
    layer.load_state_dict(plain_conv.state_dict())
    layer.enable_masks()                        # adds weight_mask / bias_mask (all 1), freezes weight / bias
    loss = task_loss + alpha * weight_ratio(model)
    plain_model = bake_masks(model)             # deep copy of torch layers only, masks multiplied in

    # any CNN (torchvision, timm), in place: Conv2d / Linear become MaskConv / MaskLinear, and every BatchNorm2d
    # whose input is a conv's output (found by hooks on one forward of the example) applies that conv's channel gate
    convert_to_masks(cnn, example=torch.zeros(1, 3, 224, 224))
    pairs = find_conv_bn_pairs(cnn, torch.zeros(1, 3, 224, 224))   # [(conv name, bn name)] that forward finds
    gate_batchnorm(net.layer1[0].conv1, net.layer1[0].bn1)          # or pair one by hand

Granularity: ``'weight'`` (SeaM, one score per weight and per bias entry), ``'channel'`` (one score per output
filter / neuron, shared by its whole weight row and its bias entry: structured masks that can be removed physically),
or ``'weight+channel'`` (both: SeaM's per-weight masks inside channels that a per-channel gate can switch off whole).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['MaskLinear', 'MaskConv', 'GatedBatchNorm2d', 'binarize', 'weight_ratio', 'kept_counts', 'bake_masks',
           'enable_model_masks', 'masked_layers', 'convert_to_masks', 'gate_batchnorm', 'gate_batchnorms',
           'find_conv_bn_pairs']

GRANULARITIES = ('weight', 'channel', 'weight+channel')
STES = ('seam', 'hardtanh')


class _BinarizeSeam(torch.autograd.Function):
    """Forward (m > 0); backward hardtanh(grad), i.e. the incoming gradient clamped to [-1, 1].

    This is what SeaM's ``Binarization.backward`` does (``F.hardtanh(grad_output)``): the gradient passes straight
    through, clipped elementwise, whatever the mask value."""

    @staticmethod
    def forward(ctx, mask):
        return (mask > 0).to(mask.dtype)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad)


class _BinarizeHardtanh(torch.autograd.Function):
    """Forward (m > 0); backward grad * 1[|m| <= 1], the derivative of hardtanh(m) (the BinaryConnect-style STE)."""

    @staticmethod
    def forward(ctx, mask):
        ctx.save_for_backward(mask)
        return (mask > 0).to(mask.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * (mask.abs() <= 1).to(grad.dtype)


def binarize(mask, ste='seam'):
    """(mask > 0) as a float tensor of mask's shape and dtype, differentiable by a straight-through estimator.

    ste='seam' (default): backward clamps the gradient to [-1, 1], as SeaM's code does.
    ste='hardtanh': backward multiplies the gradient by 1[|mask| <= 1], the derivative of hardtanh.
    """
    if ste == 'seam':
        return _BinarizeSeam.apply(mask)
    if ste == 'hardtanh':
        return _BinarizeHardtanh.apply(mask)
    raise ValueError(f"ste must be one of {STES}, got {ste!r}")


class _MaskMixin:
    """Mask logic shared by MaskLinear and MaskConv (a mixin so both stay true subclasses of the torch layers)."""

    def _init_mask_state(self):
        self.weight_mask = None
        self.bias_mask = None
        self.channel_mask = None
        self.mask_granularity = None  # None: masks disabled, the layer is exactly its torch parent
        self.ste = 'seam'

    @property
    def masks_enabled(self):
        return self.weight_mask is not None

    def _gate_shape(self):
        # one score per output filter/neuron, broadcast over the rest of its weight row
        return (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)

    def gate_scores(self):
        """The per-output-channel score tensor (out, 1, ...) of a channel gate, or None at 'weight' granularity.
        A channel whose score is <= 0 outputs exactly 0 (weights and bias entry both gated)."""
        if self.mask_granularity == 'channel':
            return self.weight_mask
        return self.channel_mask

    def enable_masks(self, granularity='weight', ste='seam'):
        """Add mask parameters initialised to 1 (everything kept) and freeze ``weight`` / ``bias``.

        granularity='weight': ``weight_mask`` has the weight's shape, ``bias_mask`` the bias's shape (SeaM).
        granularity='channel': ``weight_mask`` is (out, 1, 1, 1) for a conv, (out, 1) for a linear layer, and also
        gates the bias entry of its channel (``bias_mask`` stays None), so a dropped channel outputs exactly 0.
        granularity='weight+channel': the 'weight' masks plus ``channel_mask`` of the channel shape, which gates
        whole rows (and their bias entries) on top of the per-weight masks.
        Calling it again with the same settings keeps the existing masks.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if ste not in STES:
            raise ValueError(f"ste must be one of {STES}, got {ste!r}")
        if self.masks_enabled:
            if granularity != self.mask_granularity:
                raise ValueError(f"masks are already enabled with granularity {self.mask_granularity!r}; "
                                 f"cannot switch to {granularity!r}")
            self.ste = ste
            return self
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        per_weight = granularity != 'channel'
        self.weight_mask = nn.Parameter(torch.ones(self.weight.shape if per_weight else self._gate_shape(), **kw))
        if self.bias is not None and per_weight:
            self.bias_mask = nn.Parameter(torch.ones(self.bias.shape, **kw))
        if granularity == 'weight+channel':
            self.channel_mask = nn.Parameter(torch.ones(self._gate_shape(), **kw))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.mask_granularity = granularity
        self.ste = ste
        return self

    def masked_weight_bias(self):
        """(weight, bias) actually used by forward: masked when masks are enabled (differentiable in the masks)."""
        if not self.masks_enabled:
            return self.weight, self.bias
        wm = binarize(self.weight_mask, self.ste)
        gate = binarize(self.channel_mask, self.ste) if self.channel_mask is not None else None
        weight = self.weight * (wm if gate is None else wm * gate)
        bias = self.bias
        if bias is not None:
            bm = binarize(self.bias_mask, self.ste) if self.bias_mask is not None else wm.reshape(-1)
            bias = bias * (bm if gate is None else bm * gate.reshape(-1))
        return weight, bias

    def mask_counts(self, differentiable=False):
        """(kept, total) elements of weight + bias under the current masks (total counts the masked tensors).

        In channel mode each channel score stands for its whole weight row plus its bias entry, so the counts are
        in weight elements at every granularity; with 'weight+channel' a weight is kept when its own mask and its
        channel's gate are both on. With differentiable=True ``kept`` is a tensor with an STE path.
        """
        if not self.masks_enabled:
            raise ValueError("mask_counts: masks are not enabled on this layer (call enable_masks() first)")
        wm = binarize(self.weight_mask, self.ste)
        total = self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)
        if self.mask_granularity == 'channel':  # the score stands for its row and its bias entry
            per_score = total // self.weight_mask.numel()
            kept = wm.sum() * per_score
        else:
            gate = binarize(self.channel_mask, self.ste) if self.channel_mask is not None else None
            kept = (wm if gate is None else wm * gate).sum()
            if self.bias_mask is not None:
                bm = binarize(self.bias_mask, self.ste)
                kept = kept + (bm if gate is None else bm * gate.reshape(-1)).sum()
        return (kept if differentiable else int(kept.detach().round().item())), total

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state dict saved with masks (a SeaM run) loads into a fresh layer: create the masks first.
        key = prefix + 'weight_mask'
        if not self.masks_enabled and key in state_dict:
            if prefix + 'channel_mask' in state_dict:
                self.enable_masks('weight+channel')
            else:
                shape = tuple(state_dict[key].shape)
                self.enable_masks('weight' if shape == tuple(self.weight.shape) else 'channel')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        s = super().extra_repr()
        return s + (f', masks={self.mask_granularity}' if self.masks_enabled else '')


class MaskLinear(_MaskMixin, nn.Linear):
    """nn.Linear with optional SeaM masks. x (..., in_features) -> (..., out_features).

    Same constructor and parameter names as nn.Linear, so nn.Linear state dicts load into it unchanged."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask_state()

    def forward(self, x):
        weight, bias = self.masked_weight_bias()
        return F.linear(x, weight, bias)


class MaskConv(_MaskMixin, nn.Conv2d):
    """nn.Conv2d with optional SeaM masks. x (N, C_in, H, W) -> (N, C_out, H_out, W_out).

    Same constructor and parameter names as nn.Conv2d, so nn.Conv2d state dicts load into it unchanged."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode='zeros', device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_mask_state()

    def forward(self, x):
        weight, bias = self.masked_weight_bias()
        return self._conv_forward(x, weight, bias)


class GatedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose output is multiplied by the binary channel gate of the MaskConv that feeds it.

    A channel switched off by its gate must be exactly 0 *after* the BatchNorm (BN would otherwise turn the zero into
    the constant ``bias - mean * scale``, and the channel could not be removed). Same parameters and buffers as
    nn.BatchNorm2d, so state dicts are unchanged. Made by ``gate_batchnorm(conv, bn)``, which swaps the class in
    place; with no gate on the conv (masks off, or 'weight' granularity) it is exactly nn.BatchNorm2d."""

    def forward(self, x):
        y = super().forward(x)
        conv = self._gate_conv[0]
        scores = conv.gate_scores() if isinstance(conv, MaskConv) else None
        if scores is None:
            return y
        return y * binarize(scores, conv.ste).view(1, -1, 1, 1)


def gate_batchnorm(conv, bn):
    """Make ``bn`` (the BatchNorm2d right after ``conv``) apply ``conv``'s channel gate; in place, returns bn."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
        raise ValueError(f"gate_batchnorm: expected the BatchNorm2d({conv.out_channels}) that follows the conv, "
                         f"got {bn!r}")
    bn.__class__ = GatedBatchNorm2d
    bn._gate_conv = (conv,)  # a tuple, not an attribute Module: the conv must not become a submodule of the BN
    return bn


def gate_batchnorms(model, pairs):
    """``gate_batchnorm`` for every (conv name, bn name) in ``pairs`` (e.g. from ``find_conv_bn_pairs``); in place,
    returns the model."""
    for conv, bn in pairs:
        gate_batchnorm(model.get_submodule(conv), model.get_submodule(bn))
    return model


def find_conv_bn_pairs(model, example):
    """[(conv name, bn name)] of every BatchNorm2d of ``model`` whose input is exactly the output of a Conv2d, in the
    order the BatchNorms first run, found by forward hooks on one pass of ``example`` (a tensor (N, C, H, W) or a
    tuple of positional inputs; zeros are enough).

    The pass runs under no_grad with every module in eval mode (BatchNorm statistics do not move; each module's
    train/eval flag is restored afterwards). "Exactly" means the same tensor object, not modified in place in
    between (its version counter is unchanged), so ``conv -> ReLU(inplace) -> bn`` is not a pair. Only plain
    ``nn.BatchNorm2d`` (or ``GatedBatchNorm2d``) counts, not subclasses with their own forward (e.g. a BN fused with
    an activation, after which a zero channel need not stay zero). A BatchNorm that runs more than once is a pair
    only when every call is fed by the same conv. Returns names as ``model.named_modules()`` gives them."""
    inputs = example if isinstance(example, (tuple, list)) else (example,)
    if not inputs or not all(torch.is_tensor(t) for t in inputs):
        raise ValueError("find_conv_bn_pairs: example must be an input tensor (N, C, H, W) or a tuple of input "
                         f"tensors, got {type(example).__name__}")
    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {m: n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, GatedBatchNorm2d)}
    outputs = {}   # id(output) -> (output, its version, conv name); the tensor is kept so its id is not reused
    sources = {}   # bn name -> set of conv names (None: fed by something else), in first-call order

    def conv_hook(m, inp, out):
        if torch.is_tensor(out):
            outputs[id(out)] = (out, out._version, convs[m])

    def bn_hook(m, inp):
        x = inp[0] if inp else None
        hit = outputs.get(id(x)) if torch.is_tensor(x) else None
        src = hit[2] if hit is not None and hit[0] is x and hit[1] == x._version else None
        sources.setdefault(bns[m], set()).add(src)

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_pre_hook(bn_hook) for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return [(next(iter(src)), bn) for bn, src in sources.items() if len(src) == 1 and None not in src]


def convert_to_masks(model, skip=(), example=None):
    """In place: every plain ``nn.Conv2d`` / ``nn.Linear`` of ``model`` (except the module names in ``skip``) becomes
    a MaskConv / MaskLinear with masks off. The class is swapped on the existing module, so the parameters are the
    same tensors, the state-dict keys do not change (weights of the original architecture load strictly) and no
    random numbers are drawn. Subclasses with their own forward (e.g. weight-standardised convs) are left alone.

    example: an input for one forward pass (a tensor (N, C, H, W), or a tuple of positional inputs). With it, every
    BatchNorm2d fed directly by a converted conv (``find_conv_bn_pairs``) becomes a GatedBatchNorm2d applying that
    conv's channel gate, so 'channel' / 'weight+channel' masks give exactly-zero channels after the BN. The state
    dict is still unchanged. Without it, BatchNorms are left as they are (fine for 'weight' masks). Returns the
    model."""
    for name, m in model.named_modules():
        if name in skip:
            continue
        if type(m) is nn.Conv2d:
            m.__class__ = MaskConv
            m._init_mask_state()
        elif type(m) is nn.Linear:
            m.__class__ = MaskLinear
            m._init_mask_state()
    if example is not None:
        pairs = find_conv_bn_pairs(model, example)
        gate_batchnorms(model, [(c, b) for c, b in pairs if isinstance(model.get_submodule(c), MaskConv)])
    return model


def masked_layers(model):
    """[(name, layer)] of every MaskLinear / MaskConv in model whose masks are enabled."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _MaskMixin) and m.masks_enabled]


def enable_model_masks(model, granularity='weight', ste='seam'):
    """Call enable_masks on every MaskLinear / MaskConv in model; returns the model."""
    layers = [m for m in model.modules() if isinstance(m, _MaskMixin)]
    if not layers:
        raise ValueError("enable_model_masks: the model contains no MaskLinear / MaskConv layer")
    for m in layers:
        m.enable_masks(granularity, ste)
    return model


def weight_ratio(model, cost=None):
    """Fraction of kept elements over all weight and bias masks of every masked layer: one global scalar tensor.

    Equals SeaM's ``mean(binarize(cat(all masks)))`` at weight granularity; differentiable through the STE, so it
    can be added to the loss (``ce + alpha * weight_ratio(model)``).

    cost: optional {layer name: cost of one element}, e.g. the output pixels of each convolution, which turns the
    ratio into the fraction of kept multiply-adds (a layer missing from the dict costs 1 per element)."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError("weight_ratio: the model has no layer with masks enabled (call enable_masks() first)")
    kept, total = 0, 0
    for name, m in layers:
        k, t = m.mask_counts(differentiable=True)
        c = 1.0 if cost is None else float(cost.get(name, 1.0))
        kept, total = kept + c * k, total + c * t
    return kept / total


def kept_counts(model):
    """(kept, total) integer element counts over every masked layer (weight_ratio without the autograd path)."""
    kept, total = 0, 0
    for _, m in masked_layers(model):
        k, t = m.mask_counts()
        kept, total = kept + k, total + t
    return kept, total


def _plain_copy(layer):
    """A plain nn.Linear / nn.Conv2d holding layer's masked weight and bias (no mask parameters)."""
    with torch.no_grad():
        weight, bias = layer.masked_weight_bias()
        kw = dict(bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
        if isinstance(layer, nn.Conv2d):
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                            padding_mode=layer.padding_mode, **kw)
        else:
            new = nn.Linear(layer.in_features, layer.out_features, **kw)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(layer.training)
    return new


def _plain_batchnorm(bn):
    """In place: a GatedBatchNorm2d becomes an nn.BatchNorm2d whose weight and bias are 0 on the channels its conv's
    gate switches off, so their output is exactly 0 whatever the statistics. Without an affine (affine=False) the
    running mean of those channels is zeroed instead: their input is an exact 0 (the conv's gate zeroes its row and
    bias), so (0 - 0) / sqrt(var + eps) = 0 in eval mode, and a constant-0 batch also normalises to 0."""
    conv = bn._gate_conv[0]
    scores = conv.gate_scores() if isinstance(conv, MaskConv) else None
    if scores is not None:
        off = ~(scores.detach().reshape(-1) > 0)
        with torch.no_grad():
            if bn.affine:
                bn.weight[off] = 0
                bn.bias[off] = 0
            elif bn.running_mean is not None:
                bn.running_mean[off] = 0
    del bn._gate_conv
    bn.__class__ = nn.BatchNorm2d


def bake_masks(model):
    """Deep copy of model with no mask class left: every MaskLinear / MaskConv becomes a plain nn.Linear / nn.Conv2d
    whose weight and bias are multiplied by the binarised masks, and every GatedBatchNorm2d a plain nn.BatchNorm2d
    whose weight and bias are zeroed on the channels its conv's gate switches off. The input model is untouched.

    Outputs equal the masked model's in eval mode, and in train mode too (a gated-off channel enters the BN as an
    exact 0 and leaves it as 0 * scale + 0). What differs is training the baked copy further: nothing holds the
    removed weights and the zeroed BN entries at 0 any more (the BN bias of an off channel gets the gradient
    sum(dL/dy), so the channel would come back as a constant); re-mask or extract instead of fine-tuning it.

    A MaskLinear / MaskConv passed directly returns the plain layer."""
    if isinstance(model, _MaskMixin):
        return _plain_copy(model)
    out = copy.deepcopy(model)  # the copied BNs' _gate_conv point at the copied convs (deepcopy's memo)
    for module in list(out.modules()):  # BNs first: they read the gates of the mask layers replaced below
        if isinstance(module, GatedBatchNorm2d):
            _plain_batchnorm(module)
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _MaskMixin):
                setattr(module, child_name, _plain_copy(child))
    return out
