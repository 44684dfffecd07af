"""torchvision ResNet-18/34/50/101 as SeaM base models: the torchvision architecture and state-dict keys, with every
convolution and linear layer turned into a mask layer (``layers.mask.convert_to_masks``), masks off.

Weights from a local torchvision file (``resnet50-*.pth``, a plain state dict) load strictly; nothing is downloaded
(``weights=None``). The constructors also take
- ``head_classes=k``: SeaM's module head ``module_head = Sequential(ReLU, Linear(fc_out, k))`` after ``fc``;
- ``widths={layer name: [out, in]}``: the channel counts of every conv / linear layer of a physically pruned network
  (what ``models.extract`` writes), so an extracted module is rebuilt from its config dict alone.

Channel gates (``enable_masks('channel' | 'weight+channel')``) act after each conv's BatchNorm (``gate_batchnorm``),
and ``tie_stream_masks()`` makes the convolutions that write one residual stream share one gate per channel.
"""
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from layers.mask import convert_to_masks, gate_batchnorm

LAYOUTS = {'resnet18': (BasicBlock, [2, 2, 2, 2]), 'resnet34': (BasicBlock, [3, 4, 6, 3]),
           'resnet50': (Bottleneck, [3, 4, 6, 3]), 'resnet101': (Bottleneck, [3, 4, 23, 3])}


def block_convs(blk):
    """Names of a block's main-path convolutions in order (conv1, conv2[, conv3])."""
    return ['conv1', 'conv2', 'conv3'] if isinstance(blk, Bottleneck) else ['conv1', 'conv2']


def conv_bn_pairs(model):
    """[(conv name, bn name)] of every convolution and the BatchNorm right after it, in forward order."""
    pairs = [('conv1', 'bn1')]
    for s in range(1, 5):
        for b, blk in enumerate(getattr(model, f'layer{s}')):
            p = f'layer{s}.{b}'
            pairs += [(f'{p}.{c}', f'{p}.bn{c[-1]}') for c in block_convs(blk)]
            if blk.downsample is not None:
                pairs.append((f'{p}.downsample.0', f'{p}.downsample.1'))
    return pairs


def streams(model):
    """The residual streams, in order: [(writer conv names, [(stage, block) reading it])]. A stream is written by the
    stem or a projection shortcut and by the last conv of every block that adds to it; a block without projection
    continues the stream it reads (torchvision's resnet18/34 layer1 continues the stem's stream)."""
    out = [(['conv1'], [])]
    for s in range(1, 5):
        for b, blk in enumerate(getattr(model, f'layer{s}')):
            p = f'layer{s}.{b}'
            out[-1][1].append((s, b))
            if blk.downsample is not None:
                out.append(([f'{p}.downsample.0'], []))
            out[-1][0].append(f'{p}.{block_convs(blk)[-1]}')
    return out


class TVResNet(ResNet):
    """torchvision ResNet (same modules and keys) with mask layers and an optional SeaM module head.
    x (N, 3, H, W) -> logits (N, num_classes) (or (N, head_classes))."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, 'module_head'):
            x = self.module_head(x)
        return x

    def tie_stream_masks(self):
        """Channel gates only: the convolutions writing one residual stream share one gate Parameter per channel,
        so a gated-off channel is 0 in every tensor of that stream and extraction can remove it. Returns self."""
        for writers, _ in streams(self):
            convs = [self.get_submodule(n) for n in writers]
            gran = {c.mask_granularity for c in convs}
            if len(gran) != 1 or convs[0].gate_scores() is None:
                raise ValueError("tie_stream_masks: enable 'channel' or 'weight+channel' masks on every convolution "
                                 "first")
            name = 'weight_mask' if gran == {'channel'} else 'channel_mask'
            for c in convs[1:]:
                setattr(c, name, getattr(convs[0], name))
        return self


def _resize(model, widths):
    """Replace every conv / linear layer named in ``widths`` (and the BatchNorm after a conv) by one of the given
    [out, in] size; the weights are overwritten by the pruned state dict afterwards."""
    bn_of = dict(conv_bn_pairs(model))
    for name, (out, inp) in widths.items():
        old = model.get_submodule(name)
        parent, _, leaf = name.rpartition('.')
        holder = model.get_submodule(parent) if parent else model
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(inp, out, old.kernel_size, old.stride, old.padding, old.dilation, bias=old.bias is not None)
            bparent, _, bleaf = bn_of[name].rpartition('.')
            setattr(model.get_submodule(bparent) if bparent else model, bleaf, nn.BatchNorm2d(out))
        elif isinstance(old, nn.Linear):
            new = nn.Linear(inp, out, bias=old.bias is not None)
        else:
            raise ValueError(f'widths: {name!r} is not a conv or linear layer of this ResNet')
        setattr(holder, leaf, new)


def _build(name, num_classes=1000, head_classes=None, widths=None):
    block, layers = LAYOUTS[name]
    model = TVResNet(block, layers, num_classes=num_classes)
    if head_classes is not None:
        model.module_head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(num_classes, int(head_classes)))
    if widths is not None:
        unknown = set(widths) - {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        if unknown:
            raise ValueError(f'widths names layers that {name} does not have: {sorted(unknown)[:3]}')
        _resize(model, widths)
    convert_to_masks(model, skip=('module_head.1',))  # the head is trained, never masked
    for conv, bn in conv_bn_pairs(model):
        gate_batchnorm(model.get_submodule(conv), model.get_submodule(bn))
    return model


def resnet18(num_classes=1000, head_classes=None, widths=None):
    return _build('resnet18', num_classes, head_classes, widths)


def resnet34(num_classes=1000, head_classes=None, widths=None):
    return _build('resnet34', num_classes, head_classes, widths)


def resnet50(num_classes=1000, head_classes=None, widths=None):
    return _build('resnet50', num_classes, head_classes, widths)


def resnet101(num_classes=1000, head_classes=None, widths=None):
    return _build('resnet101', num_classes, head_classes, widths)


MODELS = {'resnet18': resnet18, 'resnet34': resnet34, 'resnet50': resnet50, 'resnet101': resnet101}
