"""Physical extraction of a SeaM-masked CNN (the CIFAR nets, torchvision ResNets) into a smaller plain network.

``extract_module(model, config)`` takes a masked ``models.cifar`` network (masks enabled, usually with a module
head) and returns ``(pruned_model, pruned_config)``: a plain network, rebuilt by ``models.build_model`` from
``pruned_config`` alone, whose outputs equal the masked model's outputs in eval mode.

What is removed (every removal is exact, never an approximation):
- *zero* channels: the masks leave a filter/neuron whose post-activation output is identically 0 (all its
  effective weights vanish on live inputs and its BatchNorm'd bias, or its channel gate, yields <= 0 before ReLU);
- *unused* channels: every consumer's effective weights on that channel are 0 (found by a fixpoint, since removing
  a consumer's rows can make its inputs unused);
- *constant* neurons/channels feeding a linear layer (VGG's last conv through the 1x1 flatten, classifier neurons,
  the output layer into the module head): the constant relu(.) value is folded into the consumer's bias.
A constant nonzero channel that feeds a zero-padded 3x3 convolution is kept: its contribution differs at the
border pixels, so it cannot be folded into a bias. ResNet20: the residual stream of a stage shares one channel
index across the stem / every block output / the projection shortcut, so a stream channel is removed only when it
is zero in every stream tensor of the stage or unused by every convolution (and fc) reading that stage.
A group that would lose every channel keeps one, with its consumers' weights on it zeroed (still exact).
"""
import torch
import torch.nn as nn

from layers.mask import MaskConv, MaskLinear, binarize


# ----------------------------------------------------------------------------------------------------- extraction
def _effective(layer):
    """(weight, bias or zeros, gate) actually applied by a (mask) layer; gate is the channel gate (all 1 if none)."""
    with torch.no_grad():
        if isinstance(layer, (MaskConv, MaskLinear)):
            w, b = layer.masked_weight_bias()
        else:
            w, b = layer.weight, layer.bias
        w = w.detach().clone()
        b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.detach().clone()
        gate = torch.ones(w.shape[0], dtype=torch.bool)
        scores = layer.gate_scores() if isinstance(layer, (MaskConv, MaskLinear)) else None
        if scores is not None:
            gate = binarize(scores.detach()).reshape(-1) > 0
    return w, b, gate


def _bn_of_const(bn, v):
    """Eval-mode BatchNorm2d applied to a per-channel constant v (C,)."""
    return (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _unit_const(w, b, gate, bn, zero_in):
    """Per output channel: (is_const, pre-activation value) of conv/linear (+BN, +channel gate) given the inputs
    known to be identically zero. A row whose weights vanish on every live input outputs its bias everywhere."""
    live = w[:, ~zero_in] if w.dim() >= 2 else w
    rowzero = (live.reshape(w.shape[0], -1) == 0).all(dim=1)
    val = b.clone()
    if bn is not None:
        val = _bn_of_const(bn, val)
    val = torch.where(gate, val, torch.zeros_like(val))
    return rowzero | ~gate, val


class _Graph:
    """Layers (effective tensors + their channel groups) and per-group keep masks."""

    def __init__(self):
        self.layers = {}   # key -> dict(mod, bn, bnkey, w, b, gate, gin, gout)
        self.sizes = {}    # group -> channel count
        self.dead = {}     # group -> bool (removed by the forward analysis: zero or folded)
        self.fixed = set()  # groups that are never pruned (network input / output)

    def add(self, key, mod, gin, gout, bn=None, bnkey=None):
        w, b, gate = _effective(mod)
        self.layers[key] = dict(mod=mod, bn=bn, bnkey=bnkey, w=w, b=b, gate=gate, gin=gin, gout=gout)
        for g, n in ((gin, w.shape[1]), (gout, w.shape[0])):
            self.sizes[g] = n
            self.dead.setdefault(g, torch.zeros(n, dtype=torch.bool))

    def fold(self, key, consts):
        """Fold constant inputs {channel: value} of a *linear* consumer into its bias; mark them dead."""
        L = self.layers[key]
        for c, v in consts.items():
            L['b'] += L['w'][:, c] * v
            self.dead[L['gin']][c] = True

    def keep_sets(self):
        keep = {g: (torch.ones(n, dtype=torch.bool) if g in self.fixed else ~self.dead[g])
                for g, n in self.sizes.items()}
        changed = True
        while changed:  # a channel is used when a kept row of some consumer has a nonzero weight on it
            changed = False
            for g in self.sizes:
                if g in self.fixed:
                    continue
                used = torch.zeros(self.sizes[g], dtype=torch.bool)
                for L in self.layers.values():
                    if L['gin'] == g:
                        rows = L['w'][keep[L['gout']]]
                        if rows.shape[0] == 0:
                            continue
                        used |= (rows != 0).transpose(0, 1).reshape(self.sizes[g], -1).any(dim=1)
                new = keep[g] & used
                if not torch.equal(new, keep[g]):
                    keep[g], changed = new, True
        zero_cols = {}
        for g, k in keep.items():
            if not k.any():  # keep one channel; its consumers ignore it, so its value does not matter
                k[0] = True
                zero_cols[g] = 0
        return keep, zero_cols

    def state_dict(self, keep, zero_cols):
        sd = {}
        for key, L in self.layers.items():
            ko, ki = keep[L['gout']], keep[L['gin']]
            w = L['w'].clone()
            if L['gin'] in zero_cols:
                w[:, zero_cols[L['gin']]] = 0
            sd[key + '.weight'] = w[ko][:, ki].contiguous()
            if L['mod'].bias is not None:
                sd[key + '.bias'] = L['b'][ko].clone()
            if L['bn'] is not None:
                for name in ('weight', 'bias', 'running_mean', 'running_var'):
                    sd[f"{L['bnkey']}.{name}"] = getattr(L['bn'], name).detach()[ko].clone()
                # a kept channel whose channel gate is off (e.g. a stream channel the identity keeps alive) must
                # still add exactly 0 here: its conv row is 0, so a zero BN scale and shift reproduce the gate
                off = ~L['gate'][ko]
                sd[f"{L['bnkey']}.weight"][off] = 0
                sd[f"{L['bnkey']}.bias"][off] = 0
                sd[f"{L['bnkey']}.num_batches_tracked"] = L['bn'].num_batches_tracked.clone()
        return sd


def _head_key(model, g, last_key, last_out):
    if hasattr(model, 'module_head'):
        g.add('module_head.1', model.module_head[1], last_out, 'out')
        g.fixed.add('out')
        return 'module_head.1'
    g.fixed.add(last_out)
    return None


def _fold_linear_chain(g, keys, zero_in):
    """Linear layers [k0 -> k1 -> ...] each followed by ReLU: fold constant neurons of k_i into k_{i+1}."""
    for cur, nxt in zip(keys[:-1], keys[1:]):
        L = g.layers[cur]
        const, val = _unit_const(L['w'], L['b'], L['gate'], None, zero_in)
        post = torch.relu(val)
        zero_in = const & (post == 0)
        g.dead[L['gout']] |= zero_in
        g.fold(nxt, {int(c): post[c] for c in torch.nonzero(const & ~zero_in).flatten()})
        zero_in = g.dead[L['gout']].clone()


def _extract_vgg(model):
    g = _Graph()
    g.fixed.add('in')
    feats = list(model.features)
    units = [(i, i + 1) for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    gin = 'in'
    for n, (ci, bi) in enumerate(units):
        g.add(f'features.{ci}', feats[ci], gin, f'c{n}', bn=feats[bi], bnkey=f'features.{bi}')
        gin = f'c{n}'
    g.add('classifier.0', model.classifier[0], gin, 'f0')
    g.add('classifier.3', model.classifier[3], 'f0', 'f1')
    g.add('classifier.6', model.classifier[6], 'f1', 'f2')
    head = _head_key(model, g, 'classifier.6', 'f2')
    zero_in = torch.zeros(3, dtype=torch.bool)
    for n, (ci, _) in enumerate(units):  # conv chain: const channels are kept (3x3 zero padding), zeros removed
        L = g.layers[f'features.{ci}']
        const, val = _unit_const(L['w'], L['b'], L['gate'], L['bn'], zero_in)
        post = torch.relu(val)
        zero_in = const & (post == 0)
        g.dead[f'c{n}'] |= zero_in
        if n == len(units) - 1:  # 1x1 map after the last pool: constant channels fold into classifier.0
            g.fold('classifier.0', {int(c): post[c] for c in torch.nonzero(const & ~zero_in).flatten()})
    keys = ['classifier.0', 'classifier.3', 'classifier.6'] + ([head] if head else [])
    _fold_linear_chain(g, keys, g.dead[gin].clone())
    keep, zero_cols = g.keep_sets()
    widths = [int(keep[f'c{n}'].sum()) for n in range(len(units))] + [int(keep[f].sum()) for f in ('f0', 'f1', 'f2')]
    return g.state_dict(keep, zero_cols), widths


def _extract_resnet(model):
    g = _Graph()
    g.fixed.add('in')
    g.add('conv1', model.conv1, 'in', 'S1', bn=model.bn1, bnkey='bn1')
    stages = [model.layer1, model.layer2, model.layer3]
    for s, stage in enumerate(stages):
        for b, blk in enumerate(stage):
            p = f'layer{s + 1}.{b}'
            gin = f'S{s}' if (b == 0 and s > 0) else f'S{s + 1}'
            g.add(f'{p}.conv1', blk.conv1, gin, f'M{s}{b}', bn=blk.bn1, bnkey=f'{p}.bn1')
            g.add(f'{p}.conv2', blk.conv2, f'M{s}{b}', f'S{s + 1}', bn=blk.bn2, bnkey=f'{p}.bn2')
            if blk.downsample is not None:
                g.add(f'{p}.downsample.0', blk.downsample[0], gin, f'S{s + 1}', bn=blk.downsample[1],
                      bnkey=f'{p}.downsample.1')
    g.add('fc', model.fc, 'S3', 'f')
    head = _head_key(model, g, 'fc', 'f')

    def unit(key, zero_in):
        L = g.layers[key]
        return _unit_const(L['w'], L['b'], L['gate'], L['bn'], zero_in)

    sc, v = unit('conv1', torch.zeros(3, dtype=torch.bool))
    sv = torch.relu(v)
    tz = sc & (sv == 0)          # channels of the current stream tensor that are identically 0
    stage_zero = tz.clone()      # ... and of every stream tensor of the current stage
    for s, stage in enumerate(stages):
        for b, blk in enumerate(stage):
            p = f'layer{s + 1}.{b}'
            mc, mv = unit(f'{p}.conv1', tz)
            mz = mc & (torch.relu(mv) == 0)
            g.dead[f'M{s}{b}'] |= mz
            c2, v2 = unit(f'{p}.conv2', mz)
            if blk.downsample is not None:
                g.dead[f'S{s}'] |= stage_zero  # close the previous stage
                ic, iv = unit(f'{p}.downsample.0', tz)
            else:
                ic, iv = sc, sv
            sc, sv = c2 & ic, torch.relu(v2 + iv)
            tz = sc & (sv == 0)
            stage_zero = tz.clone() if blk.downsample is not None else stage_zero & tz
    g.dead['S3'] |= stage_zero
    if head:
        _fold_linear_chain(g, ['fc', head], tz)
    keep, zero_cols = g.keep_sets()
    widths = ([int(keep[f'S{s}'].sum()) for s in (1, 2, 3)]
              + [int(keep[f'M{s}{b}'].sum()) for s in range(3) for b in range(len(stages[s]))]
              + [int(keep['f'].sum())])
    return g.state_dict(keep, zero_cols), widths


def _extract_tv_resnet(model):
    """torchvision ResNet (BasicBlock or Bottleneck, models/tv_resnet.py): the same analysis as ResNet20, with the
    residual streams found from the shortcuts (``tv_resnet.streams``) and 2 or 3 convs per block; the max-pool after
    the stem keeps a zero channel zero and a constant one constant."""
    from models.tv_resnet import block_convs
    g = _Graph()
    g.fixed.add('in')
    g.add('conv1', model.conv1, 'in', 'S0', bn=model.bn1, bnkey='bn1')

    def unit(key, zero_in):
        L = g.layers[key]
        return _unit_const(L['w'], L['b'], L['gate'], L['bn'], zero_in)

    sc, v = unit('conv1', torch.zeros(3, dtype=torch.bool))
    sv = torch.relu(v)
    tz = sc & (sv == 0)          # channels of the current stream tensor that are identically 0
    stream_zero = tz.clone()     # ... and of every tensor of the current stream
    cur, n_streams = 'S0', 1
    for s in range(1, 5):
        for b, blk in enumerate(getattr(model, f'layer{s}')):
            p, convs = f'layer{s}.{b}', block_convs(blk)
            zin, gin = tz, cur
            for i, c in enumerate(convs[:-1]):  # the block's inner convs: zero channels removed, constants kept
                grp = f'M{s}.{b}.{i}'
                g.add(f'{p}.{c}', blk.get_submodule(c), gin, grp, bn=blk.get_submodule('bn' + c[-1]),
                      bnkey=f'{p}.bn{c[-1]}')
                mc, mv = unit(f'{p}.{c}', zin)
                zin = mc & (torch.relu(mv) == 0)
                g.dead[grp] |= zin
                gin = grp
            if blk.downsample is not None:  # a projection shortcut starts a new stream; the previous one closes
                g.dead[cur] |= stream_zero
                new = f'S{n_streams}'
                n_streams += 1
                g.add(f'{p}.downsample.0', blk.downsample[0], cur, new, bn=blk.downsample[1],
                      bnkey=f'{p}.downsample.1')
                ic, iv = unit(f'{p}.downsample.0', tz)
                cur = new
            else:
                ic, iv = sc, sv
            last = convs[-1]
            g.add(f'{p}.{last}', blk.get_submodule(last), gin, cur, bn=blk.get_submodule('bn' + last[-1]),
                  bnkey=f'{p}.bn{last[-1]}')
            c2, v2 = unit(f'{p}.{last}', zin)
            sc, sv = c2 & ic, torch.relu(v2 + iv)
            tz = sc & (sv == 0)
            stream_zero = tz.clone() if blk.downsample is not None else stream_zero & tz
    g.dead[cur] |= stream_zero
    g.add('fc', model.fc, cur, 'f')
    head = _head_key(model, g, 'fc', 'f')
    if head:
        _fold_linear_chain(g, ['fc', head], tz)
    keep, zero_cols = g.keep_sets()
    sd = g.state_dict(keep, zero_cols)
    widths = {key: list(sd[key + '.weight'].shape[:2]) for key in g.layers}
    return sd, widths


def extract_module(model, config):
    """Physically pruned copy of a masked ``models.cifar`` network.

    model: a VGG / CifarResNet from ``models.cifar`` (masks enabled or not, module head or not), used in eval mode.
    config: its ``{'family': 'cifar', 'name': ..., 'kwargs': {...}}``.
    Returns (pruned_model in eval mode, pruned_config); ``models.build_model(pruned_config)`` rebuilds it.
    """
    from models import registry
    from models.cifar import VGG, CifarResNet
    from models.tv_resnet import TVResNet
    if isinstance(model, VGG):
        sd, widths = _extract_vgg(model)
    elif isinstance(model, CifarResNet):
        sd, widths = _extract_resnet(model)
    elif isinstance(model, TVResNet):
        sd, widths = _extract_tv_resnet(model)
    else:
        raise ValueError("extract_module: model must be a models.cifar VGG / CifarResNet or a models.tv_resnet "
                         f"ResNet, got {type(model).__name__}")
    kwargs = dict(config.get('kwargs') or {})
    kwargs['widths'] = widths
    kwargs['head_classes'] = model.module_head[1].out_features if hasattr(model, 'module_head') else None
    new_config = {'family': config['family'], 'name': config['name'], 'kwargs': kwargs}
    pruned = registry(config['family'])[config['name']](**kwargs)
    pruned.load_state_dict(sd)
    return pruned.eval(), new_config
