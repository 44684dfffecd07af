"""ViTAE basic (models/vitae.py): parity with the official architecture, structured-MLP switch, timm registry,
dense <-> Monarch conversions, activation checkpointing.

References used: the official parameter counts (4,882,792 / 24,009,096), fly's MonarchLinear shape rule written out
by hand below, a functional transcription of the official cell equations (F.conv2d / einsum, official tensor
layouts), and second code paths (densified model vs structured model, checkpointed vs plain backward).
Everything runs on the CPU at 32 px unless a test is about image size.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from layers import butterfly, monarch
from models import structured, vitae


@pytest.fixture(autouse=True)
def one_thread():
    """These small models run fastest single-threaded; restore the session's thread count afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

TINY_DENSE = 4_882_792
SMALL_DENSE = 24_009_096


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def fly_monarch_numel(n_in, n_out, nblocks, bias=True):
    """Parameter count of fly's MonarchLinear, from its shape rule (ceil-sized blocks; square factor on the
    smaller side)."""
    ib, ob = math.ceil(n_in / nblocks), math.ceil(n_out / nblocks)
    if ib < ob:
        count = nblocks * ib * ib + nblocks * ob * ib
    else:
        count = nblocks * ob * ib + nblocks * ob * ob
    return count + (n_out if bias else 0)


def tiny(**kw):
    kw.setdefault('impl', 'ref')  # never build kernels in these tests
    return vitae.vitae_basic_tiny(**kw)


# ------------------------------------------------------------------------------------------------ parity / shapes

def test_official_parameter_counts():
    model = vitae.vitae_basic_tiny()
    assert n_params(model) == TINY_DENSE
    assert all(p.requires_grad for p in model.parameters())
    # The performer's fixed random projection is state (saved) but not a parameter.
    assert 'layers.0.RC.attn.w' in model.state_dict()
    with torch.device('meta'):
        small = vitae.vitae_basic_small()
    assert n_params(small) == SMALL_DENSE


def test_official_module_names():
    # Official checkpoint keys (ViTAE-Transformer Image-Classification/vitae), so official weights load by name.
    keys = set(vitae.vitae_basic_tiny().state_dict())
    for key in ('layers.0.RC.PRM.convs.3.0.weight', 'layers.0.RC.PCM.3.running_var', 'layers.0.RC.attn.kqv.weight',
                'layers.0.RC.attn.mlp.2.bias', 'layers.1.RC.PRM.convs.2.0.bias', 'layers.2.RC.PRM.convs.1.0.weight',
                'layers.2.NC.6.attn.qkv.bias', 'layers.2.NC.6.PCM.6.weight', 'layers.2.NC.0.mlp.fc1.weight',
                'head.weight'):
        assert key in keys, key
    assert not any(k.startswith('layers.2.RC.attn') or k.startswith('layers.2.RC.PCM') for k in keys)


@pytest.mark.parametrize('size,batch', [(32, 2), (64, 2), (224, 1)])
def test_forward_shapes(size, batch):
    torch.manual_seed(0)
    model = tiny(num_classes=10, img_size=size).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(batch, 3, size, size))
        out = model(torch.randn(batch, 3, size, size))
    assert tokens.shape == (batch, (size // 16) ** 2, 256)
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


def test_non_square_and_bad_input_size():
    model = tiny(num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 64)).shape == (1, 3)
        with pytest.raises(ValueError, match='multiples of 16'):
            model(torch.randn(1, 3, 40, 40))


# ------------------------------------------------------------------ a functional transcription of the official cells

def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _official_performer_attn(tp, x):
    """Token_performer.attn of the official code (single head, einsum form)."""
    emb, m = tp.emb, tp.w.shape[0]
    k, q, v = torch.split(F.linear(x, tp.kqv.weight, tp.kqv.bias), emb, dim=-1)

    def prm_exp(t):
        xd = (t * t).sum(dim=-1, keepdim=True).repeat(1, 1, m) / 2
        return torch.exp(torch.einsum('bti,mi->btm', t, tp.w) - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    d = torch.einsum('bti,bi->bt', qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum('bin,bim->bnm', v, kp)
    y = torch.einsum('bti,bni->btn', qp, kptv) / (d.repeat(1, 1, emb) + 1e-8)
    return v + F.linear(y, tp.proj.weight, tp.proj.bias)


def _official_stage0(rc, img):
    """ReductionCell(performer, downsample 4, kernel 7, dilations 1..4) of the official code, eval mode."""
    outs = []
    for i, dil in enumerate((1, 2, 3, 4)):
        pad = math.ceil((6 * dil + 1 - 4) / 2)
        conv = rc.PRM.convs[i][0]
        outs.append(F.gelu(F.conv2d(img, conv.weight, conv.bias, stride=4, padding=pad, dilation=dil)).unsqueeze(-1))
    y = torch.cat(outs, dim=-1)
    b, c, hh, ww, nb = y.shape
    prm = y.permute(0, 4, 1, 2, 3).flatten(3).reshape(b, nb * c, hh * ww).permute(0, 2, 1)
    p = rc.PCM  # conv s2, SiLU, conv s2, BN, SiLU, conv s1, SiLU
    conv = F.silu(F.conv2d(img, p[0].weight, p[0].bias, stride=2, padding=1))
    conv = F.silu(_bn(F.conv2d(conv, p[2].weight, p[2].bias, stride=2, padding=1), p[3]))
    conv = F.silu(F.conv2d(conv, p[5].weight, p[5].bias, stride=1, padding=1))
    tp = rc.attn
    x = _official_performer_attn(tp, F.layer_norm(prm, (prm.shape[-1],), tp.norm1.weight, tp.norm1.bias, 1e-5))
    x = x + conv.permute(0, 2, 3, 1).reshape(*x.shape)
    hmid = F.layer_norm(x, (x.shape[-1],), tp.norm2.weight, tp.norm2.bias, 1e-5)
    return x + F.linear(F.gelu(F.linear(hmid, tp.mlp[0].weight, tp.mlp[0].bias)), tp.mlp[2].weight, tp.mlp[2].bias)


def _official_normal_cell(nc, x, heads, group):
    b, n, c = x.shape
    side = int(math.sqrt(n))
    img = x.view(b, side, side, c).permute(0, 3, 1, 2)
    p = nc.PCM  # conv, BN, SiLU, conv, BN, SiLU, conv, SiLU (all 3x3, grouped)
    conv = F.silu(_bn(F.conv2d(img, p[0].weight, p[0].bias, padding=1, groups=group), p[1]))
    conv = F.silu(_bn(F.conv2d(conv, p[3].weight, p[3].bias, padding=1, groups=group), p[4]))
    conv = F.silu(F.conv2d(conv, p[6].weight, p[6].bias, padding=1, groups=group))
    conv = conv.permute(0, 2, 3, 1).reshape(b, n, c)
    h = F.layer_norm(x, (c,), nc.norm1.weight, nc.norm1.bias, 1e-6)
    qkv = F.linear(h, nc.attn.qkv.weight, nc.attn.qkv.bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    a = F.linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c), nc.attn.proj.weight, nc.attn.proj.bias)
    x = x + a + conv
    h = F.layer_norm(x, (c,), nc.norm2.weight, nc.norm2.bias, 1e-6)
    return x + F.linear(F.gelu(F.linear(h, nc.mlp.fc1.weight, nc.mlp.fc1.bias)), nc.mlp.fc2.weight, nc.mlp.fc2.bias)


def test_cells_match_official_equations():
    torch.manual_seed(0)
    model = tiny(num_classes=5)
    # Non-trivial BatchNorm statistics, so that the eval-mode BN path is really exercised.
    with torch.no_grad():
        model.train()
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        rc0 = model.layers[0].RC
        ours, grid = rc0(img, (32, 32))
        assert grid == (8, 8)
        torch.testing.assert_close(ours, _official_stage0(rc0, img), rtol=1e-4, atol=1e-5)
        x = torch.randn(2, 16, 256)
        nc = model.layers[2].NC[0]
        torch.testing.assert_close(nc(x, (4, 4)), _official_normal_cell(nc, x, heads=4, group=64),
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ structured MLP switch

def _dense_mlp_numel(dim, hidden):
    return (dim * hidden + hidden) + (hidden * dim + dim)


def test_monarch_parameter_count_is_sum_of_monarch_shapes():
    depth, dim, hidden = 7, 256, 512
    for nblocks in (4, 8):
        model = tiny(mlp='monarch', nblocks=nblocks)
        expected = TINY_DENSE - depth * _dense_mlp_numel(dim, hidden) + depth * (
            fly_monarch_numel(dim, hidden, nblocks) + fly_monarch_numel(hidden, dim, nblocks))
        assert n_params(model) == expected
        assert n_params(model) < TINY_DENSE
    assert n_params(tiny(mlp='monarch', nblocks=4)) == 3_735_912
    # monarch_attn also replaces qkv (256 -> 768) and proj (256 -> 256).
    model = tiny(mlp='monarch', nblocks=4, monarch_attn=True)
    attn_dense = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    attn_monarch = fly_monarch_numel(dim, 3 * dim, 4) + fly_monarch_numel(dim, dim, 4)
    assert n_params(model) == 3_735_912 - depth * (attn_dense - attn_monarch)


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize('mlp', ['dense', 'monarch', 'butterfly', 'pixelfly'])
def test_mlp_switch_reaches_every_normal_cell(mlp):
    if mlp == 'dense':
        cls = nn.Linear
    elif mlp == 'monarch':
        cls = monarch.MonarchLinear
    else:
        cls = butterfly.Butterfly if mlp == 'butterfly' else butterfly.FlatBlockButterflyLinear
    model = tiny(mlp=mlp)
    cells = model.normal_cells()
    assert len(cells) == 7
    for nc in cells:
        assert type(nc.mlp.fc1) is cls and type(nc.mlp.fc2) is cls
        assert type(nc.attn.qkv) is nn.Linear and type(nc.attn.proj) is nn.Linear
    if mlp != 'dense':
        assert _count(model, cls) == 2 * len(cells)
    # The reduction cells and the head are never touched: 2 performers x 4 Linear + head.
    assert sum(_count(layer.RC, nn.Linear) for layer in model.layers) == 8
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def _reference_path(monkeypatch, seed, **kw):
    """ViTAE-Tiny built the way the mlp= switch built it before it went through ``models.structured.convert``: each
    normal cell constructs its linears in place with ``structured.make_linear`` (qkv, proj, fc1, fc2), then its PCM.
    This is the pre-change NormalCell constructor, kept here as the reference the converter path must reproduce bit
    for bit (it ignores the cell arguments that say how to build the linears; the kinds come from ``kw``)."""
    kw = dict(kw, impl='ref')
    mlp, attn = kw.get('mlp', 'dense'), 'monarch' if kw.get('monarch_attn') else 'dense'
    opts = {k: kw.get(k, v) for k, v in structured.OPTION_DEFAULTS.items()}

    def make(kind, n_in, n_out):
        return structured.make_linear(kind, n_in, n_out, **opts)

    class ReferenceCell(vitae.NormalCell):
        def __init__(self, dim, num_heads, mlp_ratio, group, drop_path, *how, drop=0.0, attn_drop=0.0, **how_kw):
            nn.Module.__init__(self)
            hidden = int(dim * mlp_ratio)
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = vitae.Attention(dim, num_heads, qkv=make(attn, dim, 3 * dim), proj=make(attn, dim, dim),
                                        attn_drop=attn_drop, proj_drop=drop)
            self.drop_path = vitae.DropPath(drop_path) if drop_path > 0 else nn.Identity()
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = vitae.Mlp(make(mlp, dim, hidden), make(mlp, hidden, dim), drop=drop)
            self.PCM = nn.Sequential(
                nn.Conv2d(dim, hidden, 3, padding=1, groups=group), nn.BatchNorm2d(hidden), nn.SiLU(),
                nn.Conv2d(hidden, dim, 3, padding=1, groups=group), nn.BatchNorm2d(dim), nn.SiLU(),
                nn.Conv2d(dim, dim, 3, padding=1, groups=group), nn.SiLU())
            self.structured_reports = []  # the new cell's interface (not compared): the old cell had none

    with monkeypatch.context() as m:
        m.setattr(vitae, 'NormalCell', ReferenceCell)
        torch.manual_seed(seed)
        model = vitae.vitae_basic_tiny(**kw)
    return model, torch.get_rng_state()


@pytest.mark.parametrize('kw', [
    dict(mlp='dense'), dict(mlp='monarch'), dict(mlp='monarch', nblocks=8, monarch_attn=True),
    dict(mlp='dense', monarch_attn=True), dict(mlp='butterfly'), dict(mlp='pixelfly', pixelfly_lowrank=4)])
def test_mlp_switch_initialises_like_the_reference_path(kw, monkeypatch):
    """Same seed, same state dict (torch.equal, every key in order) and the same RNG state afterwards (so data
    shuffling that follows is unchanged too): the recorded training runs stay reproducible."""
    ref, ref_rng = _reference_path(monkeypatch, 11, num_classes=10, img_size=32, **kw)
    torch.manual_seed(11)
    model = tiny(num_classes=10, img_size=32, **kw)
    assert torch.equal(torch.get_rng_state(), ref_rng)
    a, b = ref.state_dict(), model.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert n_params(model) == n_params(ref)
    kinds = [type(m).__name__.replace('ReferenceCell', 'NormalCell') for m in ref.modules()]
    assert kinds == [type(m).__name__ for m in model.modules()]


def test_monarch_attn_reaches_every_attention():
    model = tiny(mlp='dense', monarch_attn=True, nblocks=8)
    assert _count(model, monarch.MonarchLinear) == 2 * 7
    for nc in model.normal_cells():
        assert isinstance(nc.attn.qkv, monarch.MonarchLinear) and isinstance(nc.attn.proj, monarch.MonarchLinear)
        assert (nc.attn.qkv.in_features, nc.attn.qkv.out_features, nc.attn.qkv.nblocks) == (256, 768, 8)
        assert type(nc.mlp.fc1) is nn.Linear


# -------------------------------------------------------------------------------------------- registry / config

def test_models_registry_and_config_roundtrip():
    assert set(vitae.MODELS) == {'vitae_basic_tiny', 'vitae_basic_6m', 'vitae_basic_13m', 'vitae_basic_small'}
    config = {'family': 'vitae', 'name': 'vitae_basic_tiny',
              'kwargs': {'num_classes': 10, 'img_size': 32, 'mlp': 'monarch', 'nblocks': 8, 'impl': 'ref'}}
    model = models.build_model(config)
    assert model.config['name'] == 'vitae_basic_tiny'
    assert model.config['kwargs']['nblocks'] == 8 and model.config['kwargs']['drop_path_rate'] == 0.1
    for value in model.config['kwargs'].values():
        assert value is None or isinstance(value, (bool, int, float, str))
    rebuilt = models.build_model(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_timm_create_model():
    import timm
    model = timm.create_model('vitae_basic_tiny', pretrained=False, mlp='monarch', num_classes=10, impl='ref')
    assert isinstance(model, vitae.ViTAE)
    assert model.config['kwargs']['mlp'] == 'monarch' and model.num_classes == 10
    assert not any('pretrained' in k or k == 'cache_dir' for k in model.config['kwargs'])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('vitae_basic_tiny', pretrained=True)
    # Registering again (what a re-import or reload does) must neither warn nor replace the entrypoint.
    before = {name: timm.models.model_entrypoint(name) for name in vitae.MODELS}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        vitae.register_timm_models()
    assert all(timm.models.model_entrypoint(name) is fn for name, fn in before.items())
    assert set(vitae.MODELS) <= set(timm.list_models('vitae_basic_*'))


# -------------------------------------------------------------------------------------------------- conversions

def _perturb_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def test_densify_equals_monarch_model():
    torch.manual_seed(0)
    model = tiny(mlp='monarch', nblocks=4, monarch_attn=True).eval()
    _perturb_batchnorm(model)
    dense = vitae.densify(model)
    assert dense.config['kwargs']['mlp'] == 'dense' and dense.config['kwargs']['monarch_attn'] is False
    assert n_params(dense) == TINY_DENSE
    assert not dense.training
    slots = dict(vitae.linear_slots(model))
    for name, layer in vitae.linear_slots(dense):
        assert type(layer) is nn.Linear
        torch.testing.assert_close(layer.bias, slots[name].bias, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mlp', ['butterfly', 'pixelfly'])
def test_densify_other_structured_mlps(mlp):
    torch.manual_seed(5)
    model = tiny(mlp=mlp, pixelfly_lowrank=4).eval()
    dense = vitae.densify(model)
    assert n_params(dense) == TINY_DENSE
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)
    fresh, projected = tiny(mlp=mlp, pixelfly_lowrank=4).eval(), tiny(mlp=mlp, pixelfly_lowrank=4).eval()
    vitae.load_projected_state_dict(projected, dense.state_dict())
    with torch.no_grad():
        if mlp == 'butterfly':  # a butterfly matrix comes back exactly (hierarchical factorisation)
            torch.testing.assert_close(projected(x), model(x), rtol=1e-5, atol=1e-5)
        else:  # pixelfly with low rank: closer than a fresh layer (tests/test_structured.py checks the projection)
            assert (projected(x) - model(x)).abs().max() < (fresh(x) - model(x)).abs().max()


def test_project_densified_monarch_recovers_it():
    torch.manual_seed(1)
    model = tiny(mlp='monarch', nblocks=4).eval()
    _perturb_batchnorm(model)
    dense = vitae.densify(model)
    back = vitae.project_to_monarch(dense, nblocks=4)
    assert back.config['kwargs'] == model.config['kwargs']
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)
        # Monarch factors are not unique (blocks can trade scale); the matrices are.
        for (name, a), (_, b) in zip(vitae.linear_slots(back), vitae.linear_slots(model)):
            if not isinstance(a, nn.Linear):
                torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-4, atol=1e-6)


def test_project_dense_state_dict():
    torch.manual_seed(2)
    dense = tiny(num_classes=7, mlp='dense')
    state = dense.state_dict()
    model = vitae.project_to_monarch(state, nblocks=8, name='vitae_basic_tiny', impl='ref')
    assert model.config['kwargs']['num_classes'] == 7 and model.config['kwargs']['nblocks'] == 8
    # Everything except the MLPs is copied bit for bit.
    for key, value in model.state_dict().items():
        if '.mlp.fc' not in key:
            assert torch.equal(value, state[key]), key
    # Each MLP weight is replaced by a Monarch matrix closer to it than a fresh random Monarch layer.
    for name, layer in vitae.linear_slots(model):
        if '.mlp.' in name:
            w = state[name + '.weight']
            err = (layer.to_dense() - w).norm()
            rand = monarch.MonarchLinear(layer.in_features, layer.out_features, nblocks=8)
            assert err < (rand.to_dense() - w).norm()
            assert torch.equal(layer.bias, state[name + '.bias'])


def test_load_projected_state_dict_rejects_wrong_architecture():
    small_state = vitae.vitae_basic_6m(num_classes=10).state_dict()  # 10 normal cells instead of 7
    model = tiny(num_classes=10, mlp='monarch')
    with pytest.raises(ValueError, match=r'does not fit vitae_basic_tiny.*unexpected \(layers.2.NC.7'):
        vitae.load_projected_state_dict(model, small_state)
    other = vitae.vitae_basic_13m(num_classes=10).state_dict()  # width 320 instead of 256
    with pytest.raises(ValueError, match='does not fit'):
        vitae.load_projected_state_dict(model, other)
    with pytest.raises(ValueError, match='name'):
        vitae.project_to_monarch(small_state, nblocks=4)


# ---------------------------------------------------------------------------------------- activation checkpointing

def test_grad_checkpointing_matches_plain_backward():
    torch.manual_seed(3)
    plain = tiny(num_classes=4, drop_path_rate=0.2)
    ckpt = tiny(num_classes=4, drop_path_rate=0.2)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 3])
    for model in (plain, ckpt):
        torch.manual_seed(4)  # same dropout / drop-path draws
        F.cross_entropy(model.train()(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # BatchNorm running statistics are updated once, not again during recomputation.
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize('kwargs,match', [
    ({'mlp': 'sparse'}, 'mlp must be one of'),
    ({'mlp': 'monarch', 'nblocks': 3}, 'nblocks=3 does not fit'),
    ({'mlp': 'monarch', 'nblocks': 0}, 'nblocks must be an integer'),
    ({'monarch_attn': True, 'nblocks': 6}, 'nblocks=6 does not fit'),
    ({'img_size': 40}, 'img_size must be a multiple of 16'),
    ({'num_classes': -1}, 'num_classes'),
    ({'drop_path_rate': 1.5}, 'drop_path_rate'),
    ({'monarch_attn': 'yes'}, 'monarch_attn'),
    ({'impl': 'cuda'}, 'impl must be one of'),
    ({'pretrained_cfg': {}}, 'unknown argument.*pretrained_cfg'),
    ({'mlp': 'pixelfly', 'pixelfly_n_factors': 5}, 'pixelfly_n_factors.*n_factors'),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vitae.vitae_basic_tiny(**kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match='vitae_basic_tiny'):
        models.build_model({'family': 'vitae', 'name': 'vitae_huge', 'kwargs': {}})
