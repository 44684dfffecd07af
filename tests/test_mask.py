"""layers/mask.py: hand-computed forward / STE gradients, frozen weights, weight_ratio, bake_masks, state dicts,
conv -> BatchNorm pairing by hooks and BN gating."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from layers.mask import (GatedBatchNorm2d, MaskConv, MaskLinear, bake_masks, binarize, convert_to_masks,
                         enable_model_masks, find_conv_bn_pairs, gate_batchnorm, gate_batchnorms, kept_counts,
                         weight_ratio)


def _linear_case(ste='seam'):
    lin = MaskLinear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 2.], [3., 4.]]))
        lin.bias.copy_(torch.tensor([0.5, -1.]))
    lin.enable_masks(ste=ste)
    with torch.no_grad():
        lin.weight_mask.copy_(torch.tensor([[1.5, -1.], [0.5, 0.]]))  # kept: (0,0), (1,0); 0 is dropped (> 0 rule)
        lin.bias_mask.copy_(torch.tensor([1., -2.]))                  # kept: bias 0
    return lin


def test_linear_forward_hand_computed():
    lin = _linear_case()
    y = lin(torch.tensor([[2., -1.]]))
    # y0 = 1*2 + 0.5 ; y1 = 3*2 (bias 1 masked)
    assert torch.equal(y, torch.tensor([[2.5, 6.0]]))


def test_linear_mask_grad_seam_ste_clamps_gradient():
    lin = _linear_case('seam')
    lin(torch.tensor([[2., -1.]])).sum().backward()
    # d sum(y) / d binmask_ij = x_j * W_ij = [[2, -2], [6, -4]], then hardtanh-clamped to [-1, 1] (SeaM's backward)
    assert torch.equal(lin.weight_mask.grad, torch.tensor([[1., -1.], [1., -1.]]))
    # d sum(y) / d binmask_bias_i = b_i = [0.5, -1] (inside the clamp)
    assert torch.equal(lin.bias_mask.grad, torch.tensor([0.5, -1.]))


def test_linear_mask_grad_hardtanh_derivative_ste():
    lin = _linear_case('hardtanh')
    lin(torch.tensor([[2., -1.]])).sum().backward()
    # grad * 1[|m| <= 1]: mask (0,0) = 1.5 lies outside, the rest passes unclamped
    assert torch.equal(lin.weight_mask.grad, torch.tensor([[0., -2.], [6., -4.]]))
    # bias mask 1 = -2 lies outside
    assert torch.equal(lin.bias_mask.grad, torch.tensor([0.5, 0.]))


def test_frozen_weights_get_no_grad():
    lin = _linear_case()
    conv = MaskConv(1, 2, 2).enable_masks()
    lin(torch.randn(3, 2)).sum().backward()
    conv(torch.randn(1, 1, 3, 3)).sum().backward()
    for layer in (lin, conv):
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
        assert layer.weight.grad is None and layer.bias.grad is None
        assert layer.weight_mask.grad is not None


def test_conv_forward_and_grad_hand_computed():
    conv = MaskConv(1, 1, 2, bias=True)
    w = torch.tensor([[[[1., 2.], [3., 4.]]]])
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.fill_(0.25)
    conv.enable_masks()
    with torch.no_grad():
        conv.weight_mask.copy_(torch.tensor([[[[1., -1.], [-0.3, 2.]]]]))  # keeps w00 = 1 and w11 = 4
    x = torch.arange(9.).reshape(1, 1, 3, 3)
    y = conv(x)
    # out[i, j] = 1 * x[i, j] + 4 * x[i+1, j+1] + 0.25
    expected = torch.tensor([[[[0 + 16, 1 + 20], [3 + 28, 4 + 32]]]]) + 0.25
    assert torch.equal(y, expected)
    y.sum().backward()
    # d sum(out) / d binmask_pq = w_pq * sum_{i,j} x[i+p, j+q]; sums over windows: [[8, 12], [20, 24]]
    raw = w[0, 0] * torch.tensor([[8., 12.], [20., 24.]])
    assert torch.equal(conv.weight_mask.grad[0, 0], raw.clamp(-1, 1))
    assert torch.equal(conv.bias_mask.grad, torch.tensor([1.]))  # 4 outputs * 0.25 = 1.0, inside the clamp


def test_weight_ratio_exact_and_gradient():
    model = nn.Sequential(MaskLinear(3, 2), nn.ReLU(), MaskLinear(2, 1, bias=False))
    enable_model_masks(model)
    with torch.no_grad():
        model[0].weight_mask.copy_(torch.tensor([[1., -1., 1.], [-1., -1., 0.]]))  # 2 of 6 kept
        model[0].bias_mask.copy_(torch.tensor([1., 0.2]))                          # 2 of 2 kept
        model[2].weight_mask.copy_(torch.tensor([[-0.5, 3.]]))                     # 1 of 2 kept
    r = weight_ratio(model)
    assert r.item() == pytest.approx(5 / 10, abs=0)
    assert kept_counts(model) == (5, 10)
    r.backward()
    # d ratio / d mask = 1/10 for every element (1/N passes the clamp)
    for p in (model[0].weight_mask, model[0].bias_mask, model[2].weight_mask):
        assert torch.allclose(p.grad, torch.full_like(p, 0.1))


def test_weight_ratio_seam_formula_on_random_masks():
    torch.manual_seed(0)
    model = nn.Sequential(MaskConv(3, 4, 3), MaskLinear(5, 6))
    enable_model_masks(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    masks = [p.flatten() for n, p in model.named_parameters() if n.endswith('_mask')]
    ref = (torch.cat(masks) > 0).float().mean()  # SeaM: mean of the binarised concatenation
    assert torch.equal(weight_ratio(model), ref)


def test_channel_mode_drops_filter_and_bias():
    torch.manual_seed(0)
    conv = MaskConv(2, 3, 3, padding=1)
    ref = nn.Conv2d(2, 3, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    conv.enable_masks('channel')
    assert conv.weight_mask.shape == (3, 1, 1, 1) and conv.bias_mask is None
    with torch.no_grad():
        conv.weight_mask[1] = -1.0
    x = torch.randn(2, 2, 5, 5)
    y, y_ref = conv(x), ref(x)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))  # bias gated too
    assert torch.allclose(y[:, [0, 2]], y_ref[:, [0, 2]], atol=1e-6)
    # each channel score stands for 2*3*3 weights + 1 bias: 2 of 3 channels kept
    assert kept_counts(conv) == (38, 57)
    assert weight_ratio(nn.Sequential(conv)).item() == pytest.approx(2 / 3)


def test_weight_plus_channel_mode_hand_computed():
    lin = MaskLinear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 2.], [3., 4.], [5., 6.]]))
        lin.bias.copy_(torch.tensor([0.5, -1., 2.]))
    lin.enable_masks('weight+channel')
    assert lin.weight_mask.shape == (3, 2) and lin.bias_mask.shape == (3,) and lin.channel_mask.shape == (3, 1)
    with torch.no_grad():
        lin.weight_mask.copy_(torch.tensor([[1., -1.], [1., 1.], [-1., 1.]]))
        lin.bias_mask.copy_(torch.tensor([1., 1., -1.]))
        lin.channel_mask.copy_(torch.tensor([[1.], [-1.], [1.]]))  # neuron 1 gated off: weights and bias
    y = lin(torch.tensor([[2., -1.]]))
    # y0 = 1*2 + 0.5; y1 = 0 (gate); y2 = 6*(-1) (bias 2 masked)
    assert torch.equal(y, torch.tensor([[2.5, 0.0, -6.0]]))
    # kept: row 0 -> w00 + b0; row 1 -> nothing (its own masks are on, the gate is off); row 2 -> w21
    assert kept_counts(lin) == (3, 9)
    assert weight_ratio(nn.Sequential(lin)).item() == pytest.approx(3 / 9)
    fresh = MaskLinear(2, 3)
    fresh.load_state_dict(lin.state_dict())  # the granularity is recovered from the keys
    assert fresh.mask_granularity == 'weight+channel' and torch.equal(fresh(torch.ones(1, 2)), lin(torch.ones(1, 2)))


def test_weight_ratio_with_per_layer_cost_hand_computed():
    a, b = MaskLinear(2, 2, bias=False), MaskLinear(3, 1, bias=False)
    model = nn.Sequential(a, b)
    enable_model_masks(model)
    with torch.no_grad():
        a.weight_mask.copy_(torch.tensor([[1., -1.], [-1., -1.]]))  # 1 of 4 kept
        b.weight_mask.copy_(torch.tensor([[1., 1., -1.]]))          # 2 of 3 kept
    assert weight_ratio(model).item() == pytest.approx(3 / 7)
    # a costs 10 per element (e.g. 10 output pixels), b 1 (missing from the dict): (10*1 + 2) / (10*4 + 3)
    assert weight_ratio(model, {'0': 10.0}).item() == pytest.approx(12 / 43)
    weight_ratio(model, {'0': 10.0}).backward()
    # d ratio / d kept_j = cost_j / total cost, passed straight through the STE (hardtanh leaves it unchanged)
    assert torch.allclose(a.weight_mask.grad, torch.full((2, 2), 10 / 43))
    assert torch.allclose(b.weight_mask.grad, torch.full((1, 3), 1 / 43))


def test_bake_masks_equals_masked_model_and_leaves_no_masks():
    torch.manual_seed(0)
    model = nn.Sequential(MaskConv(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          MaskLinear(4 * 6 * 6, 5))
    enable_model_masks(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('_mask'):
                p.uniform_(-1, 1)
    model.eval()
    baked = bake_masks(model)
    assert type(baked[0]) is nn.Conv2d and type(baked[4]) is nn.Linear
    assert not any('mask' in k for k in baked.state_dict())
    x = torch.randn(2, 3, 6, 6)
    # independent reference: plain functional ops on weight * (mask > 0)
    c = model[0]
    h = torch.nn.functional.conv2d(x, c.weight * (c.weight_mask > 0), c.bias * (c.bias_mask > 0), padding=1)
    h = torch.relu(model[1](h)).flatten(1)
    lin = model[4]
    ref = h @ (lin.weight * (lin.weight_mask > 0)).T + lin.bias * (lin.bias_mask > 0)
    assert torch.allclose(baked(x), ref, atol=1e-5)
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert isinstance(model[0], MaskConv) and model[0].masks_enabled  # original untouched


def test_plain_state_dicts_load_and_mask_state_dicts_roundtrip():
    torch.manual_seed(0)
    plain_lin, plain_conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3)
    lin, conv = MaskLinear(4, 3), MaskConv(2, 3, 3)
    lin.load_state_dict(plain_lin.state_dict())
    conv.load_state_dict(plain_conv.state_dict())
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv2d)
    x, xi = torch.randn(2, 4), torch.randn(1, 2, 5, 5)
    assert torch.equal(lin(x), plain_lin(x)) and torch.equal(conv(xi), plain_conv(xi))
    conv.enable_masks()
    with torch.no_grad():
        conv.weight_mask.uniform_(-1, 1)
    fresh = MaskConv(2, 3, 3)
    fresh.load_state_dict(conv.state_dict())  # masks are created on load
    assert fresh.masks_enabled and torch.equal(fresh(xi), conv(xi))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match='granularity'):
        MaskLinear(2, 2).enable_masks('block')
    with pytest.raises(ValueError, match='ste'):
        binarize(torch.ones(2), ste='sign')
    with pytest.raises(ValueError, match='no layer with masks'):
        weight_ratio(nn.Sequential(MaskLinear(2, 2)))


def test_file_works_copied_alone(tmp_path):
    shutil.copy(Path(__file__).resolve().parents[1] / 'layers' / 'mask.py', tmp_path / 'mask.py')
    code = ("import torch, mask; m = mask.MaskLinear(3, 2).enable_masks(); "
            "r = mask.weight_ratio(torch.nn.Sequential(m)); r.backward(); print(float(r))")
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '1.0'


class _Tricky(nn.Module):
    """Every case the pairing must get right, one per BatchNorm (the expected pairs are written by hand below)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)            # conv -> bn: a pair
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)                       # conv -> relu_ -> bn: not
        self.c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)                       # conv + x -> bn: not
        self.d, self.bn_d = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)                       # bn called twice, same conv
        self.e, self.f, self.bn_ef = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # twice, two convs
        self.g, self.bn_g = nn.Conv2d(4, 4, 1), _ScaledBN(4)                             # BN subclass: not
        self.h, self.bn_h1, self.bn_h2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)  # one conv, 2 BNs
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn_a(self.a(x))
        x = self.bn_b(self.relu(self.b(x)))
        x = self.bn_c(self.c(x) + x)
        x = self.bn_d(self.d(x)) + self.bn_d(self.d(x * 2))
        x = self.bn_ef(self.e(x)) + self.bn_ef(self.f(x))
        x = self.bn_g(self.g(x))
        y = self.h(x)
        return self.bn_h2(y) + self.bn_h1(y)


class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_find_conv_bn_pairs_hand_listed_cases_and_restores_modes():
    torch.manual_seed(0)
    net = _Tricky().train()
    net.bn_a.eval()  # a mixed-mode model (SeaM's fix_bn) must come back exactly as it was
    before = {n: m.training for n, m in net.named_modules()}
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    pairs = find_conv_bn_pairs(net, torch.zeros(1, 3, 5, 5))
    assert pairs == [('a', 'bn_a'), ('d', 'bn_d'), ('h', 'bn_h2'), ('h', 'bn_h1')]  # order of the BNs' first calls
    assert {n: m.training for n, m in net.named_modules()} == before
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())  # no running statistic moved
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # hooks removed
    with pytest.raises(ValueError, match='example must be'):
        find_conv_bn_pairs(net, [1.0])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def _bn_random(bn, gen):
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=gen))
    bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    if bn.affine:
        bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=gen) + 1.0)


@pytest.mark.parametrize('gran', ['channel', 'weight+channel'])
def test_convert_with_example_gates_bn_after_conv_exactly(gran):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1, bias=False),
                        nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _bn_random(m, gen)
    net.eval()
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        h_ref = net[:2](x)  # the unconverted first conv + BN
    convert_to_masks(net, example=torch.zeros(1, 3, 4, 4))
    assert [type(m) for m in net] == [MaskConv, GatedBatchNorm2d, nn.ReLU, MaskConv, GatedBatchNorm2d, nn.Flatten,
                                      MaskLinear]
    assert list(net.state_dict()) == list(plain)
    enable_model_masks(net, gran)
    gate = 'weight_mask' if gran == 'channel' else 'channel_mask'
    with torch.no_grad():
        getattr(net[0], gate)[[1, 4]] = -1.0
        h = net[:2](x)
    # independent reference: the unconverted conv + BN, with channels 1 and 4 replaced by exact zeros
    want = h_ref.clone()
    want[:, [1, 4]] = 0
    assert torch.equal(h, want)
    # without the gate the BN would turn the zeroed conv output into its (nonzero) shift
    shift = net[1].bias - net[1].running_mean * net[1].weight / torch.sqrt(net[1].running_var + net[1].eps)
    assert (shift[[1, 4]].abs() > 1e-3).all()


def test_gate_batchnorms_by_name_and_rejects_a_wrong_bn():
    net = nn.Sequential(MaskConv(2, 3, 1), nn.BatchNorm2d(3), MaskConv(3, 4, 1), nn.BatchNorm2d(4))
    gate_batchnorms(net, [('0', '1'), ('2', '3')])
    assert type(net[1]) is GatedBatchNorm2d and net[3]._gate_conv[0] is net[2]
    assert list(net.state_dict()) == list(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1),
                                                        nn.BatchNorm2d(4)).state_dict())
    with pytest.raises(ValueError, match='BatchNorm2d\\(4\\)'):
        gate_batchnorm(net[2], nn.BatchNorm2d(3))


def _gated_net(gen, affine=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, affine=affine), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _bn_random(m, gen)
    convert_to_masks(net, example=torch.zeros(1, 3, 5, 5))
    return net


@pytest.mark.parametrize('gran', ['channel', 'weight+channel'])
@pytest.mark.parametrize('affine', [True, False])
def test_bake_masks_is_plain_and_zeroes_gated_bn_channels(gran, affine):
    gen = torch.Generator().manual_seed(5)
    net = _gated_net(gen, affine)
    enable_model_masks(net, gran)
    with torch.no_grad():
        for n, q in net.named_parameters():
            if n.endswith('_mask'):
                q.copy_(torch.where(torch.rand(q.shape, generator=gen) < 0.3, -1.0, 1.0))
        gate = 'weight_mask' if gran == 'channel' else 'channel_mask'
        getattr(net[0], gate).copy_(torch.tensor([1., -1., 1., -1., 1., 1.]).view(6, 1, 1, 1))
    net.eval()
    baked = bake_masks(net)
    # truly plain: only torch's own classes, no hidden reference to a mask layer
    assert [type(m) for m in baked] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
                                        nn.Flatten, nn.Linear]
    assert not any(hasattr(m, '_gate_conv') for m in baked.modules())
    assert not any('mask' in k for k in baked.state_dict())
    if affine:  # the gated-off channels' BN scale and shift are 0, the others untouched
        assert torch.equal(baked[1].weight[[1, 3]], torch.zeros(2)) and torch.equal(baked[1].bias[[1, 3]],
                                                                                   torch.zeros(2))
        assert torch.equal(baked[1].weight[[0, 2, 4, 5]], net[1].weight[[0, 2, 4, 5]])
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        h = baked[:2](x)
        assert torch.equal(h[:, [1, 3]], torch.zeros_like(h[:, [1, 3]]))
        want, got = net(x), baked(x)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())
    # train mode (batch statistics): still the same forward, gated channels still exactly 0
    net.train(), baked.train()
    with torch.no_grad():
        want, got, h = net(x), baked(x), baked[:2](x)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())
    assert torch.equal(h[:, [1, 3]], torch.zeros_like(h[:, [1, 3]]))
    assert type(net[1]) is GatedBatchNorm2d and net[0].masks_enabled  # original untouched


def test_bake_masks_weight_granularity_keeps_bn_values():
    net = _gated_net(torch.Generator().manual_seed(7))
    enable_model_masks(net, 'weight')
    baked = bake_masks(net.eval())
    assert type(baked[1]) is nn.BatchNorm2d
    for k in ('weight', 'bias', 'running_mean', 'running_var'):
        assert torch.equal(getattr(baked[1], k), getattr(net[1], k))


def test_converter_and_bake_work_copied_alone(tmp_path):
    shutil.copy(Path(__file__).resolve().parents[1] / 'layers' / 'mask.py', tmp_path / 'mask.py')
    code = ("import torch, mask; nn = torch.nn; "
            "net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)); "
            "mask.convert_to_masks(net, example=torch.zeros(1, 3, 5, 5)); "
            "print(mask.find_conv_bn_pairs(net, torch.zeros(1, 3, 5, 5))); "
            "mask.enable_model_masks(net, 'channel'); b = mask.bake_masks(net.eval()); "
            "print(sorted({type(m).__name__ for m in b.modules()}))")
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split('\n')[:2] == ["[('0', '1'), ('2', '3')]", "['BatchNorm2d', 'Conv2d', 'Sequential']"]
