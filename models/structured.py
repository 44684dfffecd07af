"""Structured MLPs in any model: the MLP linears (and optionally the attention projections) of a network replaced by
Monarch, butterfly or pixelfly layers, freshly initialised or projected from the dense weights.

    from models.structured import convert, format_report
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10, img_size=32)
    report = convert(model, 'monarch', nblocks=4, init='dense', example_input=torch.zeros(1, 3, 32, 32))
    print(format_report(report))   # 24 layers replaced, parameters and FLOPs before -> after

Which layers (``find_slots``): every ``nn.Linear`` that is a direct child of an MLP block, i.e. of timm's ``Mlp``,
``GluMlp`` (and ``SwiGLUPacked``), ``SwiGLU``, ``GatedMlp``, ``GlobalResponseNormMlp`` or ViTAE's ``Mlp`` (a ViT /
DeiT block's ``mlp.fc1``/``fc2``; a Mixer block's token MLP ``mlp_tokens`` and channel MLP ``mlp_channels``); 1x1
convolutions (``use_conv=True``) stay. With ``attn=KIND`` also every ``nn.Linear`` that is a direct child of a module
whose class name ends in ``Attention`` (timm's and ViTAE's ``qkv``/``proj``, Swin's ``WindowAttention``). Heads,
patch embeddings, ViTAE's reduction-cell performers and gating units stay dense.

Kinds and their options (plain values, so they store in a checkpoint's config):
    'monarch'    layers.monarch.MonarchLinear(in, out, nblocks, impl)
    'butterfly'  layers.butterfly.Butterfly(in, out, impl)                           (nblocks 1, increasing strides)
    'pixelfly'   layers.butterfly.FlatBlockButterflyLinear(in, out, pixelfly_butterfly_size, pixelfly_n_factors,
                 pixelfly_block, pixelfly_lowrank)                                   (flat block butterfly + low rank)
A slot keeps its bias (or its absence), device and dtype.

Projection from dense (``init='dense'``, ``project_entries``, ``load_projected``), computed in float64:
    monarch   ``MonarchLinear.from_dense``: the Frobenius-closest Monarch matrix (exact for a Monarch matrix).
    pixelfly  without low rank: the dense weight restricted to the kept blocks (the Frobenius-closest matrix with
              that support). With rank r: U V = the best rank-r fit of the part outside the kept blocks, then the
              kept blocks = (W - U V) on them; one step of alternating projection, never worse than no low rank,
              not a global optimum (sparse + low rank has no closed form).
    butterfly ``Butterfly.from_dense``: the hierarchical butterfly factorisation (a truncated SVD of every rank-one
              sub-matrix, recursively over the factor levels). Exact for a butterfly matrix; otherwise a good
              projection, not a proven optimum (the deeper levels are greedy).

``convert`` returns a report: ``{'count', 'kind', 'attn', 'init', 'layers': [{'name', 'role', 'shape', 'from',
'to', 'params_before', 'params_after', 'flops_before', 'flops_after'}], 'params_before', 'params_after',
'flops_before', 'flops_after'}``. Parameters by ``models.flops.count_params``; FLOPs by ``models.flops.count_flops``
of one forward of ``example_input`` (per layer: its hooked count; totals: the whole network), so the report is
what eval.py and the flops module say; without ``example_input`` the FLOP entries are per token.

The ``timm`` model family (``MODELS``, used by ``models.build_model``): any name timm knows, built with
``pretrained=False``; the keywords ``mlp``, ``nblocks``, ``monarch_attn``, ``impl``, ``pixelfly_*`` are taken off and
applied by ``convert`` (fresh init, report kept as ``model.structured_report``), the rest go to
``timm.create_model`` (``img_size`` is dropped for a network that takes none, e.g. a convnet).
"""
import collections.abc
import difflib

import torch
import torch.nn as nn

from models.flops import count_flops, count_params, format_count

__all__ = ['KINDS', 'OPTION_DEFAULTS', 'make_linear', 'find_slots', 'project_entries', 'convert', 'combine_reports',
           'format_report',
           'load_projected', 'is_structured', 'MODELS', 'build_timm', 'close_matches']

KINDS = ('dense', 'monarch', 'butterfly', 'pixelfly')
OPTION_DEFAULTS = dict(nblocks=4, impl='auto', pixelfly_butterfly_size=8, pixelfly_n_factors=2, pixelfly_block=32,
                       pixelfly_lowrank=0)
_STRUCT_KWARGS = ('mlp', 'monarch_attn') + tuple(OPTION_DEFAULTS)


def _layer_classes():
    from layers.butterfly import Butterfly, FlatBlockButterflyLinear
    from layers.monarch import MonarchLinear
    return MonarchLinear, Butterfly, FlatBlockButterflyLinear


def is_structured(module):
    """True for a MonarchLinear, Butterfly or FlatBlockButterflyLinear."""
    return isinstance(module, _layer_classes())


def _options(opts):
    unknown = sorted(set(opts) - set(OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown structured-layer option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(OPTION_DEFAULTS)}")
    return dict(OPTION_DEFAULTS, **opts)


def make_linear(kind, in_features, out_features, bias=True, device=None, dtype=None, **opts):
    """A freshly initialised layer of ``kind`` in place of ``nn.Linear(in_features, out_features, bias)``."""
    o = _options(opts)
    if kind == 'dense':
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    if kind not in KINDS:
        raise ValueError(f"mlp kind must be one of {', '.join(KINDS)}, got {kind!r}")
    monarch, butterfly, pixelfly = _layer_classes()
    if kind == 'monarch':
        return monarch(in_features, out_features, nblocks=o['nblocks'], bias=bias, device=device, dtype=dtype,
                       impl=o['impl'])
    if kind == 'butterfly':
        return butterfly(in_features, out_features, bias=bias, device=device, dtype=dtype, impl=o['impl'])
    return pixelfly(in_features, out_features, o['pixelfly_butterfly_size'], o['pixelfly_n_factors'],
                    o['pixelfly_block'], o['pixelfly_lowrank'], bias=bias, device=device, dtype=dtype)


def _mlp_classes():
    from models.vitae import Mlp as VitaeMlp
    classes = [VitaeMlp]
    try:
        import timm.layers as tl
    except ImportError:  # timm absent: ViTAE's own MLPs only
        return tuple(classes)
    for name in ('Mlp', 'GluMlp', 'SwiGLU', 'GatedMlp', 'GlobalResponseNormMlp'):
        if hasattr(tl, name):
            classes.append(getattr(tl, name))
    return tuple(classes)


def find_slots(model, attn=False):
    """[(qualified name, nn.Linear, role)] that ``convert`` replaces, in module order; role 'mlp' or 'attn'."""
    mlps = _mlp_classes()
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, mlps):
            role = 'mlp'
        elif attn and type(module).__name__.endswith('Attention'):
            role = 'attn'
        else:
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Linear:
                out.append((f'{prefix}.{child_name}' if prefix else child_name, child, role))
    return out


# ------------------------------------------------------------------------------------------------ projection

def _pixelfly_entries(layer, weight, bias):
    w = weight.to(torch.float64)
    out_f, in_f = w.shape
    blk = layer.block
    padded = w.new_zeros(layer.out_ext, layer.in_ext)
    padded[:out_f, :in_f] = w
    entries = {}
    r = layer.lowrank_rank
    if r:
        keep = layer.layout.repeat_interleave(blk, 0).repeat_interleave(blk, 1)[:out_f, :in_f]
        u, s, vh = torch.linalg.svd(w * ~keep, full_matrices=False)
        k = min(r, s.numel())
        lu, lv = w.new_zeros(out_f, r), w.new_zeros(r, in_f)
        lu[:, :k] = u[:, :k] * s[:k].sqrt()
        lv[:k] = s[:k].sqrt()[:, None] * vh[:k]
        padded[:out_f, :in_f] -= lu @ lv  # the kept blocks then carry exactly W - U V
        entries.update(lowrank_u=lu, lowrank_v=lv)
    tiles = padded.reshape(layer.nb_out, blk, layer.nb_in, blk).permute(0, 2, 1, 3)
    entries['weight'] = tiles[layer.row_idx.cpu(), layer.col_idx.cpu()]
    if bias is not None:
        entries['bias'] = bias.to(torch.float64)
    return entries


def project_entries(layer, weight, bias=None):
    """{parameter name: tensor} for the structured ``layer`` that best represents the dense ``weight`` (out, in)
    and ``bias`` (see the module docstring), in the layer's dtype and device. ValueError for a weight of another
    shape or a layer that is not structured."""
    monarch, butterfly, pixelfly = _layer_classes()
    n_in = getattr(layer, 'in_features', getattr(layer, 'in_size', None))
    n_out = getattr(layer, 'out_features', getattr(layer, 'out_size', None))
    if weight.ndim != 2 or tuple(weight.shape) != (n_out, n_in):
        raise ValueError(f'a dense weight of shape {tuple(weight.shape)} cannot be projected into a '
                         f'{type(layer).__name__} {n_in}->{n_out} (needs ({n_out}, {n_in}))')
    ref = next(layer.parameters())
    with torch.no_grad():
        if isinstance(layer, monarch):
            # float64: an exact Monarch matrix comes back to float32 rounding
            proj = monarch.from_dense(weight.detach().to('cpu', torch.float64), nblocks=layer.nblocks,
                                      bias=None if bias is None else bias.detach().to('cpu', torch.float64),
                                      impl='ref')
            entries = {k: v.detach() for k, v in proj.named_parameters()}
        elif isinstance(layer, pixelfly):
            entries = _pixelfly_entries(layer, weight.detach().cpu(), None if bias is None else bias.detach().cpu())
        elif isinstance(layer, butterfly):
            # the layer's own options (direction, blocks, complex); float64, like Monarch's
            wide = torch.complex128 if weight.is_complex() or layer.complex else torch.float64
            proj = butterfly.from_dense(weight.detach().to('cpu', wide),
                                        bias=False if bias is None else bias.detach().to('cpu', wide),
                                        nblocks=layer.nblocks, increasing_stride=layer.increasing_stride,
                                        complex=layer.complex, impl='ref')
            entries = {k: v.detach() for k, v in proj.named_parameters()}
        else:
            raise ValueError(f'{type(layer).__name__} is not a structured layer')
    return {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in entries.items()}


# ------------------------------------------------------------------------------------------------ conversion

def _flops_by_module(model, example_input):
    if example_input is None:
        return None
    return count_flops(model, example_input)


def _per_token_flops(m):
    if isinstance(m, nn.Linear):
        return 2 * m.weight.numel() + (0 if m.bias is None else m.bias.numel())
    return int(m.flops(1))


def convert(model, mlp='monarch', attn=None, init='fresh', example_input=None, **opts):
    """Replace the MLP linears of ``model`` (in place) by ``mlp`` layers and, with ``attn`` a kind, the attention
    linears by ``attn`` layers. ``init``: 'fresh' (each layer's own initialisation) or 'dense' (projected from the
    replaced weights). ``opts``: nblocks, impl, pixelfly_* (see OPTION_DEFAULTS). Returns the report (module
    docstring). A layer that cannot be built raises ValueError naming it; the model is then left unchanged."""
    if mlp not in KINDS or (attn is not None and attn not in KINDS):
        raise ValueError(f"mlp and attn must be one of {', '.join(KINDS)} (attn may be None), got {mlp!r}, {attn!r}")
    if init not in ('fresh', 'dense'):
        raise ValueError(f"init must be 'fresh' or 'dense', got {init!r}")
    opts = _options(opts)
    slots = [(n, m, r) for n, m, r in find_slots(model, attn=attn is not None)
             if (mlp if r == 'mlp' else attn) != 'dense']
    before = _flops_by_module(model, example_input)
    params_before = count_params(model)
    new = {}
    for name, lin, role in slots:
        kind = mlp if role == 'mlp' else attn
        try:
            layer = make_linear(kind, lin.in_features, lin.out_features, bias=lin.bias is not None,
                                device=lin.weight.device, dtype=lin.weight.dtype, **opts)
            if init == 'dense':
                entries = project_entries(layer, lin.weight, lin.bias)
                with torch.no_grad():
                    for pname, value in entries.items():
                        getattr(layer, pname).copy_(value)
        except ValueError as e:
            raise ValueError(f'{name} ({lin.in_features}->{lin.out_features}): {e}') from None
        layer.train(lin.training)
        new[name] = layer
    layers = []
    for name, lin, role in slots:
        parent_name, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new[name])
    after = _flops_by_module(model, example_input)
    for name, lin, role in slots:
        layer = new[name]
        layers.append({
            'name': name, 'role': role, 'shape': (lin.in_features, lin.out_features), 'from': 'Linear',
            'to': type(layer).__name__,
            'params_before': count_params(lin), 'params_after': count_params(layer),
            'flops_before': before['by_module'].get(name, 0) if before else _per_token_flops(lin),
            'flops_after': after['by_module'].get(name, 0) if after else _per_token_flops(layer)})
    report = dict(count=len(slots), kind=mlp, attn=attn, init=init, options=opts, layers=layers,
                  params_before=params_before, params_after=count_params(model),
                  flops_before=before['total'] if before else sum(x['flops_before'] for x in layers),
                  flops_after=after['total'] if after else sum(x['flops_after'] for x in layers),
                  flops_unit='per forward of example_input' if before else 'per token, replaced layers only')
    return report


def combine_reports(model, parts, mlp, attn=None):
    """One report for ``model`` (``convert``'s format, kinds ``mlp`` and ``attn``) from ``convert`` reports of its
    submodules: ``parts`` is [(qualified name of the submodule, its report)], all made with the same init, options
    and FLOP unit (e.g. ViTAE's normal cells, converted part by part while the model is built). Layer names become
    model-qualified; ``params_after`` is the model's count and ``params_before`` that plus what the replaced layers
    saved; FLOPs are summed over the parts (so, as for ``convert`` without ``example_input``, per token of the
    replaced layers only). None when ``parts`` is empty."""
    if not parts:
        return None
    first = parts[0][1]
    for prefix, rep in parts:
        if any(rep[k] != first[k] for k in ('init', 'options', 'flops_unit')):
            raise ValueError(f'combine_reports: {prefix} was converted with other settings than {parts[0][0]}')
    layers = [dict(x, name=f"{prefix}.{x['name']}") for prefix, rep in parts for x in rep['layers']]
    after = count_params(model)
    return dict(count=len(layers), kind=mlp, attn=attn, init=first['init'], options=first['options'], layers=layers,
                params_before=after + sum(x['params_before'] - x['params_after'] for x in layers), params_after=after,
                flops_before=sum(rep['flops_before'] for _, rep in parts),
                flops_after=sum(rep['flops_after'] for _, rep in parts), flops_unit=first['flops_unit'])


def format_report(report):
    """A few lines for the console: what was replaced, parameters and FLOPs before -> after."""
    def ratio(a, b):
        return f'{b / a:.3f}x' if a else '-'
    roles = collections.Counter(x['role'] for x in report['layers'])
    kinds = f"mlp={report['kind']}" + (f", attn={report['attn']}" if report['attn'] else '')
    lines = [f"structured layers ({kinds}, init={report['init']}): {report['count']} replaced "
             f"({', '.join(f'{n} {r}' for r, n in sorted(roles.items())) or 'none'})",
             f"  params {report['params_before']:,} -> {report['params_after']:,} "
             f"({ratio(report['params_before'], report['params_after'])}); FLOPs {report['flops_unit']} "
             f"{format_count(report['flops_before'])} -> {format_count(report['flops_after'])} "
             f"({ratio(report['flops_before'], report['flops_after'])})"]
    return '\n'.join(lines)


def load_projected(model, state_dict, allow_partial=False, name=None):
    """Load ``state_dict`` into ``model``; where the model has a structured layer and the state dict holds a dense
    ``<layer>.weight`` (out, in) (+ ``.bias``) instead of its own parameters, load their projection
    (``project_entries``). Everything else must match by name and shape, else ValueError with the counts and the
    first few keys; with ``allow_partial`` the fitting entries are loaded and the rest left as they are.
    Returns ``{'projected': [layer names], 'missing': [...], 'unexpected': [...], 'mismatched': [...]}``."""
    if not isinstance(state_dict, collections.abc.Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError('state_dict must be a dict of tensors')
    what = name or type(model).__name__
    target = model.state_dict()
    new, consumed, projected = {}, set(), []
    for mname, module in model.named_modules():
        wkey = f'{mname}.weight'
        if not is_structured(module) or wkey not in state_dict or state_dict[wkey].ndim != 2:
            continue
        own = [f'{mname}.{p}' for p, _ in module.named_parameters(recurse=False)]
        if any(k in state_dict for k in own if k not in (wkey, f'{mname}.bias')) or \
                (wkey in target and target[wkey].ndim == 2):
            continue  # the state dict holds this layer's own structured parameters
        try:
            entries = project_entries(module, state_dict[wkey], state_dict.get(f'{mname}.bias'))
        except ValueError as e:
            if allow_partial:
                continue
            raise ValueError(f'the state dict does not fit {what}: {mname}: {e}') from None
        projected.append(mname)
        consumed.update({wkey, f'{mname}.bias'})
        new.update({f'{mname}.{k}': v for k, v in entries.items()})
        # structural buffers (pixelfly's block layout) follow from the layer's options, not from the weights
        for bname, _ in module.named_buffers(recurse=False):
            key = f'{mname}.{bname}'
            if key in target:
                new[key] = target[key]
    for key, value in state_dict.items():
        if key not in consumed:
            new[key] = value
    missing = [k for k in target if k not in new]
    unexpected = [k for k in new if k not in target]
    mismatched = [f'{k} {tuple(new[k].shape)} vs {tuple(target[k].shape)}' for k in new
                  if k in target and tuple(new[k].shape) != tuple(target[k].shape)]
    problems = describe_key_problems(missing, unexpected, mismatched)
    if problems and not allow_partial:
        raise ValueError(f'the state dict does not fit {what}: {problems}; pass matching --model/--mlp flags '
                         '(or --allow-partial to load what fits)')
    bad = set(unexpected) | {m.split(' ')[0] for m in mismatched}
    model.load_state_dict({k: v for k, v in new.items() if k not in bad}, strict=not problems)
    return dict(projected=projected, missing=missing, unexpected=unexpected, mismatched=mismatched)


def describe_key_problems(missing, unexpected, mismatched, first=3):
    """'2 missing (a, b), 1 unexpected (c), ...' or '' when all fit."""
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('with another shape', mismatched)):
        if keys:
            more = ', ...' if len(keys) > first else ''
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:first])}{more})")
    return '; '.join(parts)


# ------------------------------------------------------------------------------------------------ timm family

def close_matches(name, names, n=5):
    """Up to ``n`` names of ``names`` closest to ``name`` (difflib), for 'did you mean' errors."""
    return difflib.get_close_matches(name, list(names), n=n, cutoff=0.6)


def build_timm(name, **kwargs):
    """``timm.create_model(name, pretrained=False, **kwargs)`` with the structured keywords (module docstring)
    applied by ``convert`` (fresh init). ``model.config`` records the family, name and every keyword."""
    import timm
    import models.vitae  # noqa: F401  (registers the ViTAE variants with timm)
    struct = {k: kwargs.pop(k) for k in _STRUCT_KWARGS if k in kwargs}
    mlp = struct.pop('mlp', 'dense')
    monarch_attn = struct.pop('monarch_attn', False)
    if not isinstance(monarch_attn, bool):
        raise ValueError(f'monarch_attn must be True or False, got {monarch_attn!r}')
    opts = _options(struct)
    if 'pretrained' in kwargs:
        raise ValueError('the timm family never downloads weights: leave pretrained out and load a file')
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if 'img_size' not in kwargs or 'img_size' not in str(e):
            raise
        # a network without a fixed input size (convnets): it takes none, any size works
        kwargs = {k: v for k, v in kwargs.items() if k != 'img_size'}
        model = timm.create_model(name, pretrained=False, **kwargs)
    report = None
    if mlp != 'dense' or monarch_attn:
        report = convert(model, mlp, attn='monarch' if monarch_attn else None, init='fresh', **opts)
        if report['count'] == 0:
            raise ValueError(f'{name} has no MLP block the converter knows (timm Mlp/GluMlp/SwiGLU/GatedMlp); '
                             'use mlp=dense')
    model.structured_report = report
    model.config = {'family': 'timm', 'name': name,
                    'kwargs': dict(kwargs, mlp=mlp, monarch_attn=monarch_attn, **opts)}
    return model


class _TimmModels(collections.abc.Mapping):
    """name -> constructor for every model timm knows (looked up live; nothing is downloaded)."""

    def __contains__(self, name):
        import timm
        return isinstance(name, str) and timm.is_model(name)

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        return lambda **kw: build_timm(name, **kw)

    def __iter__(self):
        import timm
        return iter(timm.list_models())

    def __len__(self):
        import timm
        return len(timm.list_models())


MODELS = _TimmModels()
