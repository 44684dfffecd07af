"""SeaM masks on torchvision ResNets (models/tv_resnet.py via layers.mask.convert_to_masks) and their extraction;
the generic converter (conv -> BN pairs by hooks) on timm / torchvision ResNets and the CIFAR nets; bake_masks."""
import copy

import pytest
import timm
import torch
import torchvision

from layers.mask import (GatedBatchNorm2d, MaskConv, MaskLinear, bake_masks, convert_to_masks, enable_model_masks,
                         find_conv_bn_pairs)
from models import build_model
from models.extract import extract_module
from models.seam import add_masks
from models.tv_resnet import conv_bn_pairs, streams

NAMES = ['resnet18', 'resnet50']


def _randomise_bn(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.mark.parametrize('name', NAMES)
def test_converted_resnet_equals_torchvision_and_loads_its_state_dict(name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    _randomise_bn(ref, torch.Generator().manual_seed(1))
    model = build_model({'family': 'torchvision', 'name': name, 'kwargs': {'num_classes': 10}}).eval()
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)  # a torchvision-format state dict loads as it is
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules())
    assert sum(isinstance(m, MaskConv) for m in model.modules()) == n_conv
    assert sum(isinstance(m, MaskLinear) for m in model.modules()) == 1
    assert sum(isinstance(m, GatedBatchNorm2d) for m in model.modules()) == n_conv
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(model(x), want)
        for gran in ('weight', 'channel', 'weight+channel'):  # all-ones masks change nothing
            m = build_model({'family': 'torchvision', 'name': name, 'kwargs': {'num_classes': 10}}).eval()
            m.load_state_dict(ref.state_dict())
            add_masks(m, gran)
            assert torch.equal(m(x), want), gran


def test_convert_to_masks_keeps_parameters_and_draws_no_random_numbers():
    net = torchvision.models.resnet18(weights=None)
    w = net.conv1.weight
    state = torch.get_rng_state()
    convert_to_masks(net, skip=('fc',))
    assert torch.equal(state, torch.get_rng_state())
    assert net.conv1.weight is w and type(net.fc) is torch.nn.Linear and isinstance(net.conv1, MaskConv)


def _random_masks(model, gen, p_channel=0.3, p_weight=0.3):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (MaskConv, MaskLinear)) and m.masks_enabled:
                if m.mask_granularity == 'channel':
                    m.weight_mask.copy_(torch.where(torch.rand(m.weight_mask.shape, generator=gen) < p_channel, -1., 1.))
                    continue
                m.weight_mask.copy_(torch.where(torch.rand(m.weight.shape, generator=gen) < p_weight, -1., 1.))
                # whole rows masked in this layer only: the channel is then a constant (its BN shift) here, while
                # other tensors of its stream may still carry it -- the case the stream analysis must get right
                rows = torch.rand(m.weight.shape[0], generator=gen) < p_channel
                m.weight_mask[rows] = -1.
                if m.channel_mask is not None:
                    m.channel_mask.copy_(torch.where(torch.rand(m.channel_mask.shape, generator=gen) < p_channel,
                                                     -1., 1.))


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('gran', ['weight+channel', 'channel'])
def test_extraction_of_random_masks_equals_masked_model_and_has_fewer_channels(name, gran):
    torch.manual_seed(0)
    cfg = {'family': 'torchvision', 'name': name, 'kwargs': {'num_classes': 10, 'head_classes': 3}}
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(2)
    _randomise_bn(model, gen)
    add_masks(model, gran)
    # tied streams: every writer of a residual stream holds the same gate Parameter
    gate = 'weight_mask' if gran == 'channel' else 'channel_mask'
    for writers, _ in streams(model):
        assert len({id(getattr(model.get_submodule(w), gate)) for w in writers}) == 1
    _random_masks(model, gen)
    model.eval()
    module, mcfg = extract_module(model, cfg)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), module(x)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    rebuilt = build_model(mcfg).eval()
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), got)
    widths = mcfg['kwargs']['widths']
    full = build_model(cfg)
    for key, (out, inp) in widths.items():  # really fewer channels, and never more
        w = full.get_submodule(key).weight
        assert out <= w.shape[0] and inp <= w.shape[1]
    assert widths['layer1.0.conv1'][0] < full.layer1[0].conv1.out_channels
    assert widths['layer4.0.downsample.0'][0] < full.layer4[0].downsample[0].out_channels
    assert sum(q.numel() for q in module.parameters()) < 0.9 * sum(q.numel() for q in full.parameters())


def test_script_reengineers_a_torchvision_resnet18_and_extracts_it(tmp_path):
    """reengineer_seam.py --model resnet18 end to end on digits: base, weight+channel masks, extraction, report."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, 'reengineer_seam.py', '--model', 'resnet18', '--img-size', '16',
                        '--train-base', '--base-epochs', '1', '--task', 'binary', '--target-class', '0', '--epochs',
                        '3', '--mask-granularity', 'weight+channel', '--penalty', 'flops', '--latency-iters', '1',
                        '--threads', '1', '--output', str(tmp_path)], cwd=root, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / '001' / 'report.json').read_text())
    assert rep['extracted_max_abs_diff'] < 1e-4
    assert rep['params_extracted'] <= rep['params_original']
    mod = torch.load(tmp_path / '001' / 'module.pt', weights_only=True)
    assert mod['model']['family'] == 'torchvision'
    net = build_model(mod['model'])
    net.load_state_dict(mod['state_dict'])
    base = torch.load(tmp_path / '001' / 'base.pt', weights_only=True)
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    tv.load_state_dict(base['state_dict'])  # the base checkpoint is a torchvision-format state dict


# ------------------------------------------------------------------------ the generic converter on any CNN
def _resnet_pairs_by_hand(model):
    """conv1 -> bn1, layerS.B.convZ -> layerS.B.bnZ, layerS.B.downsample.0 -> .1: written from the module names of a
    timm / torchvision ResNet (both name them this way), not from a forward pass."""
    pairs = [('conv1', 'bn1')]
    for s in range(1, 5):
        for b, blk in enumerate(getattr(model, f'layer{s}')):
            p = f'layer{s}.{b}'
            pairs += [(f'{p}.conv{z}', f'{p}.bn{z}') for z in (1, 2, 3) if hasattr(blk, f'conv{z}')]
            if blk.downsample is not None:
                pairs.append((f'{p}.downsample.0', f'{p}.downsample.1'))
    return pairs


def _make(lib, name):
    torch.manual_seed(0)
    if lib == 'timm':
        net = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        net = getattr(torchvision.models, name)(weights=None, num_classes=10)
    _randomise_bn(net, torch.Generator().manual_seed(1))  # BN(0) != 0, so a missing gate shows
    return net.eval()


CNNS = [('timm', 'resnet18'), ('timm', 'resnet50'), ('torchvision', 'resnet18'), ('torchvision', 'resnet50')]
EXAMPLE = torch.zeros(1, 3, 32, 32)


@pytest.mark.parametrize('lib,name', CNNS)
def test_converter_on_timm_and_torchvision_resnets(lib, name):
    ref = _make(lib, name)
    net = copy.deepcopy(ref)
    convert_to_masks(net, example=EXAMPLE)
    pairs = find_conv_bn_pairs(net, EXAMPLE)
    assert pairs == _resnet_pairs_by_hand(ref)
    if lib == 'torchvision':
        assert pairs == conv_bn_pairs(ref) == find_conv_bn_pairs(ref, EXAMPLE)
    n_conv = sum(type(m) is torch.nn.Conv2d for m in ref.modules())
    assert sum(type(m) is MaskConv for m in net.modules()) == n_conv == len(pairs)
    assert sum(type(m) is GatedBatchNorm2d for m in net.modules()) == n_conv
    assert sum(type(m) is torch.nn.BatchNorm2d for m in net.modules()) == 0
    # state dicts: the original loads strictly, and the converted one (masks off) has exactly its keys and tensors
    sd = net.state_dict()
    assert list(sd) == list(ref.state_dict())
    assert all(torch.equal(v, sd[k]) for k, v in ref.state_dict().items())
    fresh = copy.deepcopy(net)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(net(x), want)
        for gran in ('weight', 'channel', 'weight+channel'):  # all-ones masks change nothing, bit for bit
            m = enable_model_masks(copy.deepcopy(net), gran)
            assert torch.equal(m(x), want), gran


def _bn_outputs(net, names, x):
    got, hs = {}, []
    for n in names:
        hs.append(net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.clone())))
    with torch.no_grad():
        net(x)
    for h in hs:
        h.remove()
    return got


@pytest.mark.parametrize('lib,name', CNNS)
@pytest.mark.parametrize('gran', ['channel', 'weight+channel'])
def test_gated_channels_are_exactly_zero_after_their_bn(lib, name, gran):
    ref = _make(lib, name)
    net = enable_model_masks(convert_to_masks(copy.deepcopy(ref), example=EXAMPLE), gran)
    ungated = enable_model_masks(convert_to_masks(copy.deepcopy(ref)), gran)  # the old path: no BN gating
    gate = 'weight_mask' if gran == 'channel' else 'channel_mask'
    convs, bns = ('layer2.0.conv1', 'layer3.0.downsample.0'), ('layer2.0.bn1', 'layer3.0.downsample.1')
    off = {}
    with torch.no_grad():
        for c in convs:
            for model in (net, ungated):
                mask = getattr(model.get_submodule(c), gate)
                off[c] = torch.arange(mask.shape[0]) % 3 == 1
                mask[off[c]] = -1.0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    want, got, old = _bn_outputs(ref, bns[:1], x), _bn_outputs(net, bns, x), _bn_outputs(ungated, bns, x)
    for c, b in zip(convs, bns):
        assert torch.equal(got[b][:, off[c]], torch.zeros_like(got[b][:, off[c]])), b
        assert (old[b][:, off[c]] != 0).all(), b  # the constant BN shift, without the gate
    # the first gated BN sees an unchanged input, so its kept channels equal the unconverted model's exactly
    b, c = bns[0], convs[0]
    assert torch.equal(got[b][:, ~off[c]], want[b][:, ~off[c]])


@pytest.mark.parametrize('lib,name', [('timm', 'resnet18'), ('torchvision', 'resnet50')])
def test_bake_masks_on_a_converted_resnet_is_plain_and_equal(lib, name):
    ref = _make(lib, name)
    net = enable_model_masks(convert_to_masks(copy.deepcopy(ref), example=EXAMPLE), 'weight+channel')
    _random_masks(net, torch.Generator().manual_seed(6))
    net.eval()
    baked = bake_masks(net)
    assert {type(m).__module__.split('.')[0] for m in baked.modules()} <= {'torch', 'timm', 'torchvision'}
    assert not any(isinstance(m, (MaskConv, MaskLinear, GatedBatchNorm2d)) or hasattr(m, '_gate_conv')
                   for m in baked.modules())
    assert list(baked.state_dict()) == list(ref.state_dict())
    plain = copy.deepcopy(ref)
    plain.load_state_dict(baked.state_dict(), strict=True)  # the baked weights are an ordinary checkpoint
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = net(x)
        for m in (baked, plain):
            assert (m(x) - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize('name', ['vgg16_bn', 'resnet20'])
def test_cifar_nets_take_the_same_converter_path(name):
    net = build_model({'family': 'cifar', 'name': name, 'kwargs': {'num_classes': 10, 'head_classes': 2}})
    gated = [(m._gate_conv[0], m) for m in net.modules() if isinstance(m, GatedBatchNorm2d)]
    names = {m: n for n, m in net.named_modules()}
    if name == 'vgg16_bn':  # features.i (conv) -> features.i+1 (BN), written out from VGG16_CFG's layout
        idx = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
        want = [(f'features.{i}', f'features.{i + 1}') for i in idx]
    else:
        want = [('conv1', 'bn1')]
        for s in (1, 2, 3):
            for b in range(3):
                want += [(f'layer{s}.{b}.conv1', f'layer{s}.{b}.bn1'), (f'layer{s}.{b}.conv2', f'layer{s}.{b}.bn2')]
                if s > 1 and b == 0:
                    want.append((f'layer{s}.0.downsample.0', f'layer{s}.0.downsample.1'))
    assert [(names[c], names[b]) for c, b in gated] == want
    assert not hasattr(__import__('models.cifar', fromlist=['x']), 'channel_gate')
    assert type(net.module_head[1]) is torch.nn.Linear  # the head stays plain
