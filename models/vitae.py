"""ViTAE basic (Xu et al., "ViTAE: Vision Transformer Advanced by Exploring Intrinsic Inductive Bias", NeurIPS 2021)
in plain PyTorch, with switchable structured MLPs (Monarch, butterfly, pixelfly) for the Monarch paper's experiments.

Architecture (the official Image-Classification/vitae code of ViTAE-Transformer, re-implemented):

    image (B, 3, H, W)
    stage 0  ReductionCell: PRM (4 parallel 7x7 stride-4 convs, dilations 1..4, GELU, concatenated -> 256-d tokens)
             -> performer token attention (256 -> 64-d) + PCM (3 convs, strides 2,2,1) + MLP     grid H/4
    stage 1  ReductionCell: PRM (3 parallel 3x3 stride-2 convs, dilations 1..3) -> performer + PCM + MLP  grid H/8
    stage 2  ReductionCell without attention ("performer_less"): PRM only (dilations 1, 2)      grid H/16
             then `depth` NormalCells: x + DropPath(PCM(x)) + DropPath(MHSA(LN(x))), then x + DropPath(MLP(LN(x)))
    mean over tokens (no class token, no final norm) -> linear head

Parameter counts match the official code exactly (1000 classes, dense MLP): vitae_basic_tiny 4,882,792,
vitae_basic_6m 6,610,024, vitae_basic_13m 10,830,632 (the official name; that is what its official definition
builds), vitae_basic_small 24,009,096. Module names and shapes follow the official code
(``layers.{stage}.RC.PRM.convs.{i}.0``, ``layers.2.NC.{j}.mlp.fc1``, ``head`` ...), so an official dense state dict
should load with ``load_state_dict`` (not tried against a released checkpoint: nothing is downloaded here). The
performer's fixed random projection ``w`` is a persistent buffer (the official code makes it a frozen
``nn.Parameter``): same state-dict key, but it never reaches an optimizer, and
``sum(p.numel() for p in model.parameters())`` is the trainable count.

Image size. The official code hard-wires a square 224 px grid. Here every cell reads its token grid (H, W) from the
actual input, so any input whose height and width are positive multiples of 16 works (non-square too). ``img_size``
(a multiple of 16) is the size the model is built for and recorded in its config; it is checked, nothing else depends
on it. At 32 px the three reduction cells still downsample 4x, 2x, 2x: grids 8x8 -> 4x4 -> 2x2, so the normal cells
attend over 4 tokens and their 3x3 PCM convolutions see a zero-padded 2x2 map. That is the architecture unchanged
(and what the Monarch-vs-dense comparison on small images needs); we do not drop a reduction stage at small sizes.

Structured layers. ``mlp='dense'|'monarch'|'butterfly'|'pixelfly'`` chooses the class of BOTH linear layers of EVERY
normal-cell MLP (``nn.Linear``, ``layers.monarch.MonarchLinear``, ``layers.butterfly.Butterfly``,
``layers.butterfly.FlatBlockButterflyLinear``); ``monarch_attn=True`` also makes every normal cell's attention ``qkv``
and ``proj`` MonarchLinear (the Monarch paper replaces both). The reduction cells' performer layers stay dense (they
are the convolutional-stem part of ViTAE, and the hand-edited NormalCell.py of the user's notes touched only the
normal cells). Structured layers are imported only when asked for, so a dense model needs nothing from ``layers/``.
The layers are made by the converter every model uses (``models.structured.convert``), applied to each normal cell
while it is built, so that the random initialisation is drawn in the same order as when the cells built the layers
themselves (same seed, same model); ``model.structured_report`` is its report (layers replaced, parameters before and
after, FLOPs per token; ``structured.format_report`` prints it), None for a dense model.

Conversions:
    densify(model)                       -> dense-MLP model, structured weights replaced by their exact to_dense()
    project_to_monarch(dense, nblocks)   -> Monarch model, MLP weights = MonarchLinear.from_dense(dense weights)
    load_projected_state_dict(model, sd) -> loads a dense state dict into a structured model (projecting on the way)

Every model carries ``model.config = {'family': 'vitae', 'name': ..., 'kwargs': {...}}`` (plain values only), which
``models.build_model(model.config)`` turns back into the same architecture.

timm: importing this module registers the four variants with timm's registry, so after ``import models.vitae``
``timm.create_model('vitae_basic_tiny', mlp='monarch')`` works. timm's own keywords (pretrained_cfg, cache_dir, ...)
are dropped before they reach the model; ``pretrained=True`` raises (there are no hosted weights).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from models import structured

__all__ = ['MODELS', 'ARCHS', 'DEFAULT_KWARGS', 'ViTAE', 'NormalCell', 'ReductionCell', 'vitae_basic_tiny',
           'vitae_basic_6m', 'vitae_basic_13m', 'vitae_basic_small', 'densify', 'project_to_monarch',
           'load_projected_state_dict', 'linear_slots', 'register_timm_models']

# Variant table: the official ViTAE_basic_* definitions. Fixed for all four: downsampling 4, 2, 2; PRM kernels 7, 3, 3
# with dilations (1,2,3,4), (1,2,3), (1,2); one performer head in stages 0 and 1; stage 2's reduction cell is PRM only;
# all normal cells sit in stage 2.
ARCHS = {
    'vitae_basic_tiny': dict(embed_dims=(64, 64, 128), token_dims=(64, 64, 256), depth=7, heads=4, mlp_ratio=2.0,
                             group=64),
    'vitae_basic_6m': dict(embed_dims=(64, 64, 128), token_dims=(64, 64, 256), depth=10, heads=4, mlp_ratio=2.0,
                           group=64),
    'vitae_basic_13m': dict(embed_dims=(64, 64, 160), token_dims=(64, 64, 320), depth=11, heads=5, mlp_ratio=2.0,
                            group=64),
    'vitae_basic_small': dict(embed_dims=(64, 64, 192), token_dims=(96, 192, 384), depth=14, heads=6, mlp_ratio=3.0,
                              group=96),
}
DOWNSAMPLE = (4, 2, 2)
KERNELS = (7, 3, 3)
DILATIONS = ((1, 2, 3, 4), (1, 2, 3), (1, 2))
TOTAL_STRIDE = 16  # 4 * 2 * 2: input sides must be multiples of this

MLP_KINDS = ('dense', 'monarch', 'butterfly', 'pixelfly')
IMPLS = ('auto', 'ref', 'kernel')

# Constructor keywords and their defaults (all plain values, so a config dict stores in a checkpoint).
DEFAULT_KWARGS = dict(
    num_classes=1000,
    img_size=224,
    in_chans=3,
    drop_path_rate=0.1,
    mlp='dense',
    nblocks=4,
    monarch_attn=False,
    pixelfly_butterfly_size=8,
    pixelfly_n_factors=2,
    pixelfly_block=32,
    pixelfly_lowrank=0,
    drop_rate=0.0,            # dropout after the normal cells' MLP and attention projection (official default 0)
    attn_drop_rate=0.0,       # dropout on the attention probabilities (official default 0)
    performer_drop_rate=0.1,  # the reduction cells' performer dropouts (fixed to 0.1 in the official code)
    impl='auto',              # MonarchLinear / Butterfly kernel dispatch: 'auto' | 'ref' | 'kernel'
)


# ----------------------------------------------------------------------------------------------------------------
# building blocks

class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale survivors by 1/(1-p).

    x: (B, ...) -> (B, ...). Identity in eval mode or when p == 0.
    """

    def __init__(self, p=0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f'p={self.p}'


class PRM(nn.Module):
    """Pyramid reduction module: parallel dilated convolutions with the same stride, concatenated as tokens.

    x (B, C_in, H, W) -> tokens (B, (H/s)*(W/s), len(dilations)*embed_dim), grid (H/s, W/s); H, W multiples of s.
    Padding ceil(((k-1)*d + 1 - s) / 2) makes every branch produce the same H/s x W/s grid.
    """

    def __init__(self, in_chans, embed_dim, kernel_size, stride, dilations):
        super().__init__()
        self.stride = stride
        self.convs = nn.ModuleList()
        for d in dilations:
            pad = math.ceil(((kernel_size - 1) * d + 1 - stride) / 2)
            # Sequential(conv, GELU) keeps the official parameter names (convs.{i}.0.weight).
            self.convs.append(nn.Sequential(
                nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=pad, dilation=d),
                nn.GELU()))
        self.out_chans = embed_dim * len(dilations)

    def forward(self, x):
        # Concatenate branch-major along channels (channel index = branch * embed_dim + c), as the official code.
        y = torch.cat([branch(x) for branch in self.convs], dim=1)
        h, w = y.shape[-2:]
        return y.flatten(2).transpose(1, 2), (h, w)


class TokenPerformer(nn.Module):
    """Single-head performer attention (FAVOR+ positive random features) that maps dim -> in_dim, plus an MLP.

    In a reduction cell it is used piecewise (attn, then the cell adds its PCM, then mlp). Shapes: attn takes
    (B, T, dim) and returns (B, T, in_dim).
    """

    def __init__(self, dim, in_dim, kernel_ratio=0.5, drop=0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(drop))
        self.m = int(in_dim * kernel_ratio)
        # Fixed random features: m orthonormal rows scaled by sqrt(m). A buffer (not trained, saved in the state dict
        # so that a checkpoint reproduces the same attention).
        w = torch.empty(self.m, in_dim)
        nn.init.orthogonal_(w)
        self.register_buffer('w', w * math.sqrt(self.m))

    def _features(self, x):
        # phi(x) = exp(w x - |x|^2 / 2) / sqrt(m): E[phi(q) . phi(k)] = exp(q . k). x (B, T, e) -> (B, T, m).
        return torch.exp(x @ self.w.float().t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(self.m)

    def attn(self, x):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # official order: k, q, v
        # exp() of unnormalised dot products overflows in 16-bit: compute the kernel part in float32, autocast off.
        with torch.autocast(device_type=x.device.type, enabled=False):
            kp, qp, vf = self._features(k.float()), self._features(q.float()), v.float()
            denom = qp @ kp.sum(dim=1).unsqueeze(-1)                       # (B, T, 1)
            y = (qp @ (kp.transpose(1, 2) @ vf)) / (denom + self.epsilon)  # (B, T, emb)
        # v is the skip connection (dim changes from dim to in_dim, so x itself cannot be).
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReductionCell(nn.Module):
    """Downsampling cell: PRM tokens -> performer attention, plus a parallel conv branch (PCM), plus MLP.

    forward(x, hw): x is an image (B, C, H, W) or tokens (B, H*W, C) on grid hw=(H, W);
    returns tokens (B, (H/s)*(W/s), token_dim) and the new grid. With ``attention=False`` (the official
    'performer_less' type) it is the PRM alone and token_dim = embed_dim * len(dilations).
    """

    def __init__(self, in_chans, embed_dim, token_dim, stride, kernel_size, dilations, attention=True,
                 performer_drop=0.1):
        super().__init__()
        self.PRM = PRM(in_chans, embed_dim, kernel_size, stride, dilations)
        if attention:
            # PCM strides: 2 per factor of 2 in the reduction, then 1s (4 -> 2, 2, 1; 2 -> 2, 1, 1).
            strides = [2 if stride >> (i + 1) else 1 for i in range(3)]
            self.PCM = nn.Sequential(
                nn.Conv2d(in_chans, embed_dim, 3, stride=strides[0], padding=1),
                nn.SiLU(),
                nn.Conv2d(embed_dim, embed_dim, 3, stride=strides[1], padding=1),
                nn.BatchNorm2d(embed_dim),
                nn.SiLU(),
                nn.Conv2d(embed_dim, token_dim, 3, stride=strides[2], padding=1),
                nn.SiLU())
            self.attn = TokenPerformer(self.PRM.out_chans, token_dim, drop=performer_drop)
        else:
            self.PCM = None
            self.attn = None
        self.out_dim = token_dim if attention else self.PRM.out_chans

    def forward(self, x, hw):
        if x.dim() == 3:
            b, n, c = x.shape
            x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        tokens, grid = self.PRM(x)
        if self.attn is None:
            return tokens, grid
        y = self.attn.attn(self.attn.norm1(tokens))
        y = y + self.PCM(x).flatten(2).transpose(1, 2)
        y = y + self.attn.mlp(self.attn.norm2(y))
        return y, grid


class Attention(nn.Module):
    """Multi-head self-attention. x (B, N, dim) -> (B, N, dim). qkv/proj are nn.Linear or any drop-in."""

    def __init__(self, dim, num_heads, qkv, proj, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = qkv
        self.attn_drop = attn_drop
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(head_dim)) v, the official math, via the fused kernel.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. x (B, N, dim) -> (B, N, dim); fc1/fc2 are any Linear drop-in."""

    def __init__(self, fc1, fc2, drop=0.0):
        super().__init__()
        self.fc1 = fc1
        self.act = nn.GELU()
        self.fc2 = fc2
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _slot_linear(kind, n_in, n_out):
    """The linear a normal cell starts with in a slot of ``kind``: a plain nn.Linear for 'dense'; for a structured
    kind an uninitialised placeholder (``torch.nn.utils.skip_init``: built on the meta device, so it draws no random
    numbers) that ``structured.convert`` replaces straight away."""
    if kind == 'dense':
        return nn.Linear(n_in, n_out)
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, device=torch.get_default_device())


class NormalCell(nn.Module):
    """Transformer block with a parallel convolution module. forward(x (B, H*W, dim), hw) -> (B, H*W, dim).

    mlp, attn: the kinds of the MLP's fc1/fc2 and of the attention's qkv/proj ('dense' or a
    ``models.structured.KINDS`` kind), made by ``structured.convert`` with ``options`` (its keywords: nblocks, impl,
    pixelfly_*). ``structured_reports``: the converter's reports for this cell (empty when all dense).
    """

    def __init__(self, dim, num_heads, mlp_ratio, group, drop_path, mlp='dense', attn='dense', options=None,
                 drop=0.0, attn_drop=0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.structured_reports = []
        # Each part is converted as soon as it exists (attention, then MLP, then the PCM is built), not the finished
        # model: the structured layers then draw their random initialisation exactly where the cell used to build
        # them (qkv, proj, fc1, fc2, PCM; a dense slot draws its own nn.Linear init in its place), so a seed gives
        # the same model as before and the recorded training runs stay reproducible.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv=_slot_linear(attn, dim, 3 * dim), proj=_slot_linear(attn, dim, dim),
                              attn_drop=attn_drop, proj_drop=drop)
        if attn != 'dense':
            self._convert('dense', attn, options)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(_slot_linear(mlp, dim, hidden), _slot_linear(mlp, hidden, dim), drop=drop)
        if mlp != 'dense':
            self._convert(mlp, None, options)
        self.PCM = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1, groups=group),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, dim, 3, padding=1, groups=group),
            nn.BatchNorm2d(dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1, groups=group),
            nn.SiLU())

    def _convert(self, mlp, attn, options):
        """Replace the placeholders built so far (``_slot_linear``) by fresh ``mlp`` / ``attn`` layers."""
        try:
            self.structured_reports.append(structured.convert(self, mlp, attn=attn, init='fresh', **(options or {})))
        except ValueError as e:
            kind = attn or mlp
            hint = _option_hint(kind, options or {})
            raise ValueError(f'mlp={kind!r} cannot build a normal-cell layer ({hint}): {e}') from e

    def forward(self, x, hw):
        b, n, c = x.shape
        conv = self.PCM(x.transpose(1, 2).reshape(b, c, hw[0], hw[1])).flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(conv)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """One stage: a reduction cell and its normal cells (named RC and NC as in the official code)."""

    def __init__(self, rc, ncs):
        super().__init__()
        self.RC = rc
        self.NC = nn.ModuleList(ncs)


class _FrozenBatchNormStats:
    """Recompute context for activation checkpointing: BatchNorm keeps normalising with batch statistics (so the
    recomputed activations are identical) but must not fold that batch into its running estimates a second time.
    momentum 0 makes the update running*(1-0) + batch*0 == running exactly; the step counter is restored."""

    def __init__(self, module):
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved = []

    def __enter__(self):
        self.saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                      for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, (momentum, steps) in zip(self.bns, self.saved):
            m.momentum = momentum
            if steps is not None:
                m.num_batches_tracked.copy_(steps)
        return False


class ViTAE(nn.Module):
    """ViTAE basic. forward(images (B, in_chans, H, W)) -> logits (B, num_classes); H, W multiples of 16.

    Build it with one of the variant functions (``MODELS[name](**kwargs)``), which also validates the arguments.
    """

    def __init__(self, embed_dims, token_dims, depth, heads, mlp_ratio, group, num_classes=1000, in_chans=3,
                 drop_path_rate=0.1, mlp='dense', attn='dense', structured_options=None, drop_rate=0.0,
                 attn_drop_rate=0.0, performer_drop_rate=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.grad_checkpointing = False
        # Stochastic depth grows linearly over the blocks (device='cpu': also right under a 'meta' device context).
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        stages = []
        chans = in_chans
        for i in range(3):
            rc = ReductionCell(chans, embed_dims[i], token_dims[i], DOWNSAMPLE[i], KERNELS[i], DILATIONS[i],
                               attention=i < 2, performer_drop=performer_drop_rate)
            if rc.out_dim != token_dims[i]:
                raise ValueError(f'stage {i}: PRM gives {rc.out_dim} channels but token_dims[{i}]={token_dims[i]}')
            ncs = [NormalCell(token_dims[i], heads, mlp_ratio, group, dpr[j], mlp=mlp, attn=attn,
                              options=structured_options, drop=drop_rate, attn_drop=attn_drop_rate)
                   for j in range(depth)] if i == 2 else []
            stages.append(BasicLayer(rc, ncs))
            chans = token_dims[i]
        self.layers = nn.ModuleList(stages)
        self.num_features = token_dims[-1]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # Official init: truncated normal(0.02) for every nn.Linear, LayerNorm to identity; convolutions and the
        # structured layers keep their own defaults.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable=True):
        """Recompute each normal cell in the backward pass instead of storing its activations (timm's API)."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self):
        return set()

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)
        if hasattr(self, 'config'):
            self.config['kwargs']['num_classes'] = num_classes

    def normal_cells(self):
        """All NormalCell modules, in order."""
        return [nc for layer in self.layers for nc in layer.NC]

    def forward_features(self, x):
        """images (B, C, H, W) -> tokens (B, (H/16)*(W/16), num_features)."""
        if x.dim() != 4 or x.shape[-1] % TOTAL_STRIDE or x.shape[-2] % TOTAL_STRIDE or min(x.shape[-2:]) == 0:
            raise ValueError(f'ViTAE expects images (B, C, H, W) with H and W positive multiples of {TOTAL_STRIDE}, '
                             f'got shape {tuple(x.shape)}')
        hw = tuple(x.shape[-2:])
        for layer in self.layers:
            x, hw = layer.RC(x, hw)
            for nc in layer.NC:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(
                        nc, x, hw, use_reentrant=False,
                        context_fn=lambda nc=nc: (contextlib.nullcontext(), _FrozenBatchNormStats(nc)))
                else:
                    x = nc(x, hw)
        return x

    def forward_head(self, x):
        return self.head(x.mean(dim=1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------------
# construction and validation

def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')


def _check_rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f'{name} must be a number in [0, 1), got {value!r}')


def _resolve_kwargs(name, kwargs):
    """Defaults filled in and every argument validated; returns a plain dict (safe to store in a checkpoint)."""
    unknown = sorted(set(kwargs) - set(DEFAULT_KWARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for {name}; "
                         f"known: {', '.join(DEFAULT_KWARGS)}")
    kw = dict(DEFAULT_KWARGS, **kwargs)
    _check_int('num_classes', kw['num_classes'], 0)
    _check_int('in_chans', kw['in_chans'], 1)
    _check_int('img_size', kw['img_size'], 1)
    if kw['img_size'] % TOTAL_STRIDE:
        raise ValueError(f"img_size must be a multiple of {TOTAL_STRIDE} (the reduction cells downsample 4x, 2x, 2x), "
                         f"got {kw['img_size']}")
    for key in ('drop_path_rate', 'drop_rate', 'attn_drop_rate', 'performer_drop_rate'):
        _check_rate(key, kw[key])
        kw[key] = float(kw[key])
    if kw['mlp'] not in MLP_KINDS:
        raise ValueError(f"mlp must be one of {', '.join(MLP_KINDS)}, got {kw['mlp']!r}")
    if not isinstance(kw['monarch_attn'], bool):
        raise ValueError(f"monarch_attn must be True or False, got {kw['monarch_attn']!r}")
    if kw['impl'] not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {kw['impl']!r}")
    _check_int('nblocks', kw['nblocks'], 1)
    _check_int('pixelfly_butterfly_size', kw['pixelfly_butterfly_size'], 1)
    _check_int('pixelfly_n_factors', kw['pixelfly_n_factors'], 1)
    _check_int('pixelfly_block', kw['pixelfly_block'], 1)
    _check_int('pixelfly_lowrank', kw['pixelfly_lowrank'], 0)
    arch = ARCHS[name]
    dim = arch['token_dims'][-1]
    hidden = int(dim * arch['mlp_ratio'])
    # Monarch blocks must tile the layer exactly: a padded Monarch layer computes on zeros and its parameter count no
    # longer means what a reader expects. (qkv is dim -> 3*dim, so dividing dim suffices for the attention.)
    if kw['mlp'] == 'monarch' and (dim % kw['nblocks'] or hidden % kw['nblocks']):
        raise ValueError(f"nblocks={kw['nblocks']} does not fit the {dim}->{hidden}->{dim} MLP of {name}: "
                         f"nblocks must divide both {dim} and {hidden}")
    if kw['monarch_attn'] and dim % kw['nblocks']:
        raise ValueError(f"nblocks={kw['nblocks']} does not fit the {dim}-wide attention of {name} "
                         f"(monarch_attn=True): nblocks must divide {dim}")
    return kw


def _option_hint(kind, options):
    """Which of our keywords a layer's error message is about."""
    if kind == 'pixelfly':  # the layer names its own arguments; say which of ours they are
        return ('pixelfly_butterfly_size, pixelfly_n_factors, pixelfly_block, pixelfly_lowrank are the layer\'s '
                'butterfly_size, n_factors, block, lowrank_rank')
    return f"nblocks={options.get('nblocks')}" if kind == 'monarch' else 'no arguments to change'


def _build(name, kwargs):
    kw = _resolve_kwargs(name, kwargs)
    arch = ARCHS[name]
    attn = 'monarch' if kw['monarch_attn'] else 'dense'
    options = {k: kw[k] for k in structured.OPTION_DEFAULTS}
    model = ViTAE(arch['embed_dims'], arch['token_dims'], arch['depth'], arch['heads'], arch['mlp_ratio'],
                  arch['group'], num_classes=kw['num_classes'], in_chans=kw['in_chans'],
                  drop_path_rate=kw['drop_path_rate'], mlp=kw['mlp'], attn=attn, structured_options=options,
                  drop_rate=kw['drop_rate'], attn_drop_rate=kw['attn_drop_rate'],
                  performer_drop_rate=kw['performer_drop_rate'])
    model.config = {'family': 'vitae', 'name': name, 'kwargs': kw}
    parts = [(f'layers.{i}.NC.{j}', rep) for i, layer in enumerate(model.layers) for j, nc in enumerate(layer.NC)
             for rep in nc.structured_reports]
    model.structured_report = structured.combine_reports(model, parts, kw['mlp'], None if attn == 'dense' else attn)
    return model


def vitae_basic_tiny(**kwargs):
    """ViTAE-T (4.9M params dense, 1000 classes): 7 normal cells of width 256, 4 heads, MLP ratio 2.
    Keywords and defaults: see DEFAULT_KWARGS."""
    return _build('vitae_basic_tiny', kwargs)


def vitae_basic_6m(**kwargs):
    """ViTAE-6M: 10 normal cells of width 256, 4 heads, MLP ratio 2. Keywords: see DEFAULT_KWARGS."""
    return _build('vitae_basic_6m', kwargs)


def vitae_basic_13m(**kwargs):
    """ViTAE-13M: 11 normal cells of width 320, 5 heads, MLP ratio 2. Keywords: see DEFAULT_KWARGS."""
    return _build('vitae_basic_13m', kwargs)


def vitae_basic_small(**kwargs):
    """ViTAE-S (24.0M params dense, 1000 classes): 14 normal cells of width 384, 6 heads, MLP ratio 3.
    Keywords: see DEFAULT_KWARGS."""
    return _build('vitae_basic_small', kwargs)


MODELS = {
    'vitae_basic_tiny': vitae_basic_tiny,
    'vitae_basic_6m': vitae_basic_6m,
    'vitae_basic_13m': vitae_basic_13m,
    'vitae_basic_small': vitae_basic_small,
}


# ----------------------------------------------------------------------------------------------------------------
# conversions between dense and structured models

_SLOTS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')


def linear_slots(model):
    """[(qualified name, module)] of every normal-cell linear layer that ``mlp`` / ``monarch_attn`` can replace."""
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, NormalCell):
            for slot in _SLOTS:
                out.append((f'{prefix}.{slot}', module.get_submodule(slot)))
    return out


def _check_vitae(model, what):
    if not isinstance(model, ViTAE) or not isinstance(getattr(model, 'config', None), dict):
        raise ValueError(f'{what} must be a ViTAE model built by models.vitae (got {type(model).__name__})')


def densify(model):
    """A new ViTAE with mlp='dense', monarch_attn=False whose replaced layers hold the exact dense matrices of
    ``model``'s structured layers (``to_dense()``, bias carried over) and every other weight and buffer copied.
    Outputs are equal up to float rounding. Same device, dtype and train/eval mode as ``model``."""
    _check_vitae(model, 'densify(model)')
    cfg = model.config
    kwargs = dict(cfg['kwargs'], mlp='dense', monarch_attn=False)
    state = {}
    replaced = set()
    with torch.no_grad():
        for name, module in linear_slots(model):
            if isinstance(module, nn.Linear):
                continue
            weight = module.to_dense()
            state[name + '.weight'] = weight.detach().clone()
            bias = getattr(module, 'bias', None)
            state[name + '.bias'] = (bias.detach().clone() if bias is not None
                                     else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            replaced.add(name + '.')
        for key, value in model.state_dict().items():
            if not any(key.startswith(p) for p in replaced):
                state[key] = value
    dense = _build(cfg['name'], kwargs)
    target = dense.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f'densify: {key} has shape {tuple(value.shape)} (from to_dense()), '
                             f'the dense model needs {tuple(target[key].shape)}')
    ref = next(model.parameters())
    dense.to(device=ref.device, dtype=ref.dtype)
    dense.load_state_dict(state, strict=True)
    dense.train(model.training)
    dense.grad_checkpointing = model.grad_checkpointing
    return dense


def load_projected_state_dict(model, state_dict, allow_partial=False):
    """Load ``state_dict`` into ``model``; for each structured layer of the model whose weights the state dict holds
    in dense form (``<name>.weight`` (out, in) and ``<name>.bias``), load their projection
    (``models.structured.project_entries``: for Monarch ``MonarchLinear.from_dense``, the Frobenius-closest Monarch
    matrix, the Monarch paper's dense-to-sparse fine-tuning init; pixelfly: the kept blocks + a low-rank fit of
    the rest; butterfly: ``Butterfly.from_dense``, the hierarchical butterfly factorisation). Everything else must
    match by name and shape: a state dict that does not fit raises ValueError with the counts and first few problem
    keys (``allow_partial``: load what fits). Returns ``model``."""
    _check_vitae(model, 'load_projected_state_dict(model, ...)')
    if not isinstance(state_dict, dict):
        raise ValueError(f'state_dict must be a dict of tensors, got {type(state_dict).__name__}')
    name = f"{model.config['name']} (mlp={model.config['kwargs']['mlp']!r})"
    structured.load_projected(model, state_dict, allow_partial=allow_partial, name=name)
    return model


def project_to_monarch(dense, nblocks=4, monarch_attn=False, name=None, **kwargs):
    """A Monarch-MLP ViTAE initialised from a dense one: every MLP weight (and, with ``monarch_attn``, the attention
    qkv/proj) is ``MonarchLinear.from_dense`` of the dense weight, everything else is copied.

    dense: a ViTAE model (any mlp: a structured one is densified first) or a dense ViTAE state dict; a state dict
    needs ``name`` (e.g. 'vitae_basic_tiny'), and ``num_classes`` is read from its head unless given.
    kwargs: further constructor arguments for the new model (e.g. drop_path_rate, impl); by default those of
    ``dense``'s config. Returns the new model (on the CPU for a state dict, else on ``dense``'s device)."""
    if isinstance(dense, nn.Module):
        _check_vitae(dense, 'project_to_monarch(dense, ...)')
        if dense.config['kwargs']['mlp'] != 'dense' or dense.config['kwargs']['monarch_attn']:
            dense = densify(dense)
        name = dense.config['name'] if name is None else name
        base = dict(dense.config['kwargs'])
        state = dense.state_dict()
        ref = next(dense.parameters())
    elif isinstance(dense, dict):
        if name not in MODELS:
            raise ValueError(f"project_to_monarch from a state dict needs name= one of {', '.join(MODELS)}, "
                             f'got {name!r}')
        state = dense
        base = {}
        head = state.get('head.weight')
        if head is not None:
            base['num_classes'] = int(head.shape[0])
        ref = None
    else:
        raise ValueError(f'dense must be a ViTAE model or a state dict, got {type(dense).__name__}')
    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(MODELS)}, got {name!r}")
    base.update(kwargs)
    base.update(mlp='monarch', nblocks=nblocks, monarch_attn=monarch_attn)
    model = MODELS[name](**base)
    load_projected_state_dict(model, state)
    if ref is not None:
        model.to(device=ref.device, dtype=ref.dtype)
        model.train(dense.training)
    return model


# ----------------------------------------------------------------------------------------------------------------
# timm registry

# Keywords timm.create_model passes to every entrypoint; they describe hub weights, not the architecture.
_TIMM_ONLY_KWARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'pretrained_model_args',
                     'pretrained_strict')


def _timm_entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        if pretrained:
            raise ValueError(f'{name}: there are no pretrained weights to download (this project never downloads); '
                             'create it with pretrained=False and load a checkpoint yourself')
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        device = kwargs.pop('device', None)
        dtype = kwargs.pop('dtype', None)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = MODELS[name](**kwargs)
        if dtype is not None:
            model.to(dtype=dtype)
        img = model.config['kwargs']['img_size']
        # What timm's data helpers (resolve_data_config) read: the official ViTAE evaluation settings.
        model.pretrained_cfg = model.default_cfg = dict(
            architecture=name, num_classes=model.num_classes, input_size=(model.config['kwargs']['in_chans'], img, img),
            crop_pct=0.9, interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            classifier='head')
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = MODELS[name].__doc__
    entrypoint._vitae_entrypoint = True  # marks our registration, so that re-imports do not re-register
    return entrypoint


def register_timm_models():
    """Register the variants with timm (idempotent: an existing registration of ours is kept, so re-imports and
    reloads do not trigger timm's 'Overwriting ... in registry' warning). Returns the registered names."""
    try:
        from timm.models import register_model
        from timm.models._registry import _model_entrypoints
    except ImportError:  # timm absent: the models still work, only timm.create_model does not know them
        return []
    for name in MODELS:
        existing = _model_entrypoints.get(name)
        if existing is not None and getattr(existing, '_vitae_entrypoint', False):
            continue
        register_model(_timm_entrypoint(name))
    return list(MODELS)


register_timm_models()
