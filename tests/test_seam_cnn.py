"""SeaM masks on torchvision ResNets (models/tv_resnet.py via layers.mask.convert_to_masks) and their extraction."""
import pytest
import torch
import torchvision

from layers.mask import GatedBatchNorm2d, MaskConv, MaskLinear, convert_to_masks
from models import build_model
from models.extract import extract_module
from models.seam import add_masks
from models.tv_resnet import streams

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
