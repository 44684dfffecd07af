"""models/structured.py: the converter on timm ViT / DeiT / Mixer and on ViTAE, projection from dense weights, the
parameter / FLOP report, state-dict loading with projection, the timm model family.

References: the MLP linears named by hand from each architecture's definition; dense models whose MLP weights are
hand-built Monarch (or pixelfly) matrices, so the converted model must give the dense model's logits; fly's
MonarchLinear shape rule written out by hand; FLOPs per layer from the token counts of each architecture (a ViT's
channel MLP sees batch x (patches + 1) rows, a Mixer's token MLP batch x channels rows); the parameter counts
recorded in tests/test_vitae.py and BENCHMARKS.md. Tiny models at 32 px.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.mlp_mixer import MlpMixer

import models
from layers.butterfly import Butterfly, FlatBlockButterflyLinear
from layers.monarch import MonarchLinear
from models import structured, vitae
from models.flops import count_flops, count_params

torch.set_num_threads(1)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def fly_monarch_numel(n_in, n_out, nblocks, bias=True):
    ib, ob = math.ceil(n_in / nblocks), math.ceil(n_out / nblocks)
    count = nblocks * ib * ib + nblocks * ob * ib if ib < ob else nblocks * ob * ib + nblocks * ob * ob
    return count + (n_out if bias else 0)


def vit():
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=2)


def deit():
    return timm.create_model('deit_tiny_patch16_224', pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=2)


def mixer():
    model = MlpMixer(num_classes=10, img_size=32, patch_size=4, num_blocks=2, embed_dim=64)
    nn.init.normal_(model.head.weight, std=0.1)  # timm zero-initialises the head: all logits would be 0
    return model


# name -> (constructor, MLP linears by hand, attention linears by hand, rows each MLP linear sees per image)
ARCHS = {
    'vit': (vit, [f'blocks.{i}.mlp.{f}' for i in range(2) for f in ('fc1', 'fc2')],
            [f'blocks.{i}.attn.{f}' for i in range(2) for f in ('qkv', 'proj')], lambda n: 16 + 1),
    'deit': (deit, [f'blocks.{i}.mlp.{f}' for i in range(2) for f in ('fc1', 'fc2')],
             [f'blocks.{i}.attn.{f}' for i in range(2) for f in ('qkv', 'proj')], lambda n: 16 + 1),
    'mixer': (mixer, [f'blocks.{i}.{m}.{f}' for i in range(2) for m in ('mlp_tokens', 'mlp_channels')
                      for f in ('fc1', 'fc2')], [],
              lambda n: 64 if 'mlp_tokens' in n else 64),  # token MLP: 64 channel rows; channel MLP: 64 patches
}


def _set_monarch_weights(model, names, nblocks, seed):
    """Give each named nn.Linear a weight that is exactly a Monarch matrix (random factors, fly layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            lin = model.get_submodule(name)
            m = MonarchLinear(lin.in_features, lin.out_features, nblocks=nblocks, impl='ref')
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            lin.weight.copy_(m.to_dense())


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_converter_replaces_exactly_the_mlp_linears(arch):
    make, mlp_names, attn_names, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = make().eval()
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    report = structured.convert(model, 'monarch', nblocks=4, impl='ref')
    assert [x['name'] for x in report['layers']] == mlp_names and report['count'] == len(mlp_names)
    for n in linears:
        cls = MonarchLinear if n in mlp_names else nn.Linear
        assert type(model.get_submodule(n)) is cls, n
    assert model(X).shape == (2, 10)
    if attn_names:
        model = make().eval()
        report = structured.convert(model, 'butterfly', attn='monarch', nblocks=4, impl='ref')
        got = {x['name']: x['to'] for x in report['layers']}
        assert got == {**{n: 'Butterfly' for n in mlp_names}, **{n: 'MonarchLinear' for n in attn_names}}
        assert type(model.head) is nn.Linear and model(X).shape == (2, 10)


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_from_dense_reproduces_a_monarch_representable_model(arch):
    make, mlp_names, attn_names, _ = ARCHS[arch]
    torch.manual_seed(1)
    dense = make().eval()
    _set_monarch_weights(dense, mlp_names + attn_names, nblocks=4, seed=2)
    model = copy.deepcopy(dense)
    structured.convert(model, 'monarch', attn='monarch' if attn_names else None, nblocks=4, init='dense', impl='ref')
    with torch.no_grad():
        ref, out = dense(X), model(X)
    assert (out - ref).abs().max() < 1e-5
    # a fresh Monarch init is far from it: the equality above is the projection's doing
    fresh = copy.deepcopy(dense)
    structured.convert(fresh, 'monarch', nblocks=4, init='fresh', impl='ref')
    with torch.no_grad():
        assert (fresh(X) - ref).abs().max() > 1e-2


def _set_butterfly_weights(model, names, seed):
    """Give each named nn.Linear a weight that is exactly a Butterfly layer's matrix (random twiddles, the layer's
    padding and stacks), taken by feeding the identity through the layer."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in names:
            lin = model.get_submodule(name)
            b = Butterfly(lin.in_features, lin.out_features, bias=False, impl='ref')
            lin.weight.copy_(b(torch.eye(lin.in_features)).T)


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_from_dense_reproduces_a_butterfly_representable_model(arch):
    make, mlp_names, _, _ = ARCHS[arch]
    torch.manual_seed(8)
    dense = make().eval()
    _set_butterfly_weights(dense, mlp_names, seed=9)
    model = copy.deepcopy(dense)
    report = structured.convert(model, 'butterfly', init='dense', impl='ref')
    assert [x['to'] for x in report['layers']] == ['Butterfly'] * len(mlp_names)
    with torch.no_grad():
        ref, out = dense(X), model(X)
        assert (out - ref).abs().max() < 1e-5
        for name in mlp_names:  # the biases come over as they are
            assert torch.equal(model.get_submodule(name).bias, dense.get_submodule(name).bias)
    fresh = copy.deepcopy(dense)
    structured.convert(fresh, 'butterfly', init='fresh', impl='ref')
    with torch.no_grad():
        assert (fresh(X) - ref).abs().max() > 1e-2


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_report_matches_models_flops(arch):
    make, mlp_names, _, rows = ARCHS[arch]
    torch.manual_seed(3)
    dense = make().eval()
    model = copy.deepcopy(dense)
    report = structured.convert(model, 'monarch', nblocks=4, init='dense', impl='ref', example_input=X[:1])
    assert report['params_before'] == count_params(dense)
    assert report['params_after'] == count_params(model)
    assert report['flops_before'] == count_flops(dense, X[:1])['total']
    assert report['flops_after'] == count_flops(model, X[:1])['total']
    saved = 0
    for layer in report['layers']:
        lin = dense.get_submodule(layer['name'])
        n_in, n_out = lin.in_features, lin.out_features
        assert layer['params_before'] == n_in * n_out + n_out
        assert layer['params_after'] == fly_monarch_numel(n_in, n_out, 4)
        r = rows(layer['name'])
        assert layer['flops_before'] == r * (2 * n_in * n_out + n_out)
        assert layer['flops_after'] == r * (2 * (fly_monarch_numel(n_in, n_out, 4) - n_out) + n_out)
        saved += layer['flops_before'] - layer['flops_after']
    assert report['flops_before'] - report['flops_after'] == saved  # nothing else changed
    assert report['params_before'] - report['params_after'] == sum(
        x['params_before'] - x['params_after'] for x in report['layers'])
    text = structured.format_report(report)
    assert f"{len(mlp_names)} replaced" in text and f"{report['params_after']:,}" in text


def test_vitae_switch_equals_the_converter():
    """ViTAE's mlp= switch builds what convert() makes of the dense model: same keys, shapes, classes, counts and
    report (tests/test_vitae.py checks that its initialisation is the pre-converter one, bit for bit)."""
    for kind, attn, kw in (('monarch', None, {}), ('monarch', 'monarch', {}), ('butterfly', None, {}),
                           ('pixelfly', None, {'pixelfly_lowrank': 4})):
        built = vitae.vitae_basic_tiny(mlp=kind, monarch_attn=attn is not None, impl='ref', **kw)
        conv = vitae.vitae_basic_tiny(mlp='dense', impl='ref')
        report = structured.convert(conv, kind, attn=attn, impl='ref', **kw)
        assert report['count'] == 7 * (2 if attn is None else 4)
        a, b = built.state_dict(), conv.state_dict()
        assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
        assert [type(m) for m in built.modules()] == [type(m) for m in conv.modules()]
        assert count_params(built) == count_params(conv)
        # the switch's report is the converter's report of the dense model (per token: no example input)
        assert built.structured_report == report
        assert report['params_before'] == 4_882_792  # the official dense count
    assert vitae.vitae_basic_tiny(mlp='dense').structured_report is None
    # the counts recorded in tests/test_vitae.py (1000 classes) and BENCHMARKS.md (10 classes)
    conv = vitae.vitae_basic_tiny(mlp='dense', impl='ref')
    assert structured.convert(conv, 'monarch', impl='ref')['params_after'] == 3_735_912
    conv = vitae.vitae_basic_tiny(mlp='dense', num_classes=10, img_size=32, impl='ref')
    report = structured.convert(conv, 'monarch', impl='ref')
    assert (report['params_before'], report['params_after']) == (4_628_362, 3_481_482)


def test_pixelfly_projection():
    torch.manual_seed(4)
    # no low rank: a block-sparse matrix with the layer's support comes back exactly
    src = FlatBlockButterflyLinear(64, 128, 8, 2, 8)
    fresh = FlatBlockButterflyLinear(64, 128, 8, 2, 8)
    entries = structured.project_entries(fresh, src.to_dense(), src.bias)
    torch.testing.assert_close(entries['weight'], src.weight, rtol=0, atol=1e-6)
    # with low rank: sparse + rank-2 is fitted better than by the blocks alone, and the kept blocks are exact
    src = FlatBlockButterflyLinear(64, 128, 8, 2, 8, lowrank_rank=2)
    w = src.to_dense().detach()
    lr = FlatBlockButterflyLinear(64, 128, 8, 2, 8, lowrank_rank=2)
    with torch.no_grad():
        for k, v in structured.project_entries(lr, w, None).items():
            getattr(lr, k).copy_(v)
    keep = lr.layout.repeat_interleave(8, 0).repeat_interleave(8, 1)
    torch.testing.assert_close(lr.to_dense()[keep], w[keep], rtol=0, atol=1e-5)
    blocks_only = (w * ~keep).norm()
    assert (lr.to_dense() - w).norm() < 0.9 * blocks_only


def test_butterfly_projection_entries():
    """project_entries follows the layer's own options (direction, blocks, complex) and gives its dtype."""
    torch.manual_seed(10)
    src = Butterfly(24, 50, increasing_stride=False, impl='ref')
    w = src.to_dense().detach()
    for layer in (Butterfly(24, 50, increasing_stride=False, impl='ref'),
                  Butterfly(24, 50, nblocks=2, impl='ref'),  # block 1 is the decreasing one
                  Butterfly(24, 50, increasing_stride=False, complex=True, impl='ref')):
        entries = structured.project_entries(layer, w, src.bias)
        assert {k: (v.shape, v.dtype) for k, v in entries.items()} == {
            k: (v.shape, v.dtype) for k, v in layer.named_parameters()}
        with torch.no_grad():
            for k, v in entries.items():
                getattr(layer, k).copy_(v)
            x = torch.randn(3, 24)
            assert (layer(x) - src(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r'needs \(50, 24\)'):
        structured.project_entries(Butterfly(24, 50), w.T, None)


def test_load_projected_fits_or_names_the_keys():
    torch.manual_seed(5)
    dense = vit().eval()
    model = vit().eval()
    structured.convert(model, 'pixelfly', pixelfly_block=16, impl='ref')
    res = structured.load_projected(model, dense.state_dict())
    assert res['projected'] == ARCHS['vit'][1] and not (res['missing'] or res['unexpected'] or res['mismatched'])
    for k, v in dense.state_dict().items():
        if '.mlp.' not in k:
            assert torch.equal(model.state_dict()[k], v), k
    other = deit().state_dict()
    other['head.weight'] = torch.zeros(5, 192)
    other['extra.weight'] = torch.zeros(1)
    del other['cls_token']
    with pytest.raises(ValueError) as e:
        structured.load_projected(model, other, name='vit')
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('the state dict does not fit vit: ')
    assert '1 missing (cls_token)' in msg and '1 unexpected (extra.weight)' in msg
    assert '1 with another shape (head.weight (5, 192) vs (10, 192))' in msg
    head = model.head.weight.clone()
    res = structured.load_projected(model, other, allow_partial=True)
    assert res['missing'] == ['cls_token'] and torch.equal(model.head.weight, head)
    mixer_sd = mixer().state_dict()
    with pytest.raises(ValueError, match=r'\d+ missing .*\d+ unexpected'):
        structured.load_projected(model, mixer_sd)


def test_timm_family_builds_and_rebuilds():
    cfg = {'family': 'timm', 'name': 'deit_tiny_patch16_224',
           'kwargs': dict(num_classes=10, img_size=32, patch_size=8, depth=2, mlp='monarch', nblocks=4, impl='ref')}
    torch.manual_seed(6)
    model = models.build_model(cfg)
    assert model.config['family'] == 'timm' and model.config['kwargs']['mlp'] == 'monarch'
    assert model.structured_report['count'] == 4
    torch.manual_seed(7)
    again = models.build_model(model.config)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(X), model.eval()(X), rtol=0, atol=0)
    conv = models.build_model({'family': 'timm', 'name': 'test_convnext', 'kwargs': dict(num_classes=3, img_size=32)})
    assert 'img_size' not in conv.config['kwargs'] and conv(X).shape == (2, 3)  # a convnet takes no img_size
    with pytest.raises(ValueError, match="closest: .*vit_tiny_patch16_224"):
        models.build_model({'family': 'timm', 'name': 'vit_tiny_patch16', 'kwargs': {}})
    with pytest.raises(ValueError, match="closest: .*mixer_b16_224.*this project.s: vitae_basic_13m"):
        models.family_of('mixer_b16')
