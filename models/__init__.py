"""Network definitions, built by name from a plain config dict.

Every checkpoint the project writes stores ``{'family': ..., 'name': ..., 'kwargs': {...}}`` under ``'model'``, so
``build_model(ckpt['model'])`` rebuilds the exact network without pickled classes or ``eval`` of strings.
Families: 'vitae' (models/vitae.py), 'cifar' (models/cifar.py), 'torchvision' (ResNet-18/34/50/101 with SeaM mask
layers, models/tv_resnet.py), 'timm' (any timm model name, pretrained=False, with
structured MLPs by keyword: models/structured.py). ``family_of(name)`` finds a name's family and names the closest
matches of an unknown one.
"""
import importlib

# family name -> module holding a ``MODELS`` registry dict (name -> constructor). Imported lazily so that a script
# that only needs CIFAR models does not import timm and ViTAE code.
FAMILIES = {
    'vitae': 'models.vitae',
    'cifar': 'models.cifar',
    'torchvision': 'models.tv_resnet',  # torchvision ResNet-18/34/50/101 with SeaM mask layers
    'timm': 'models.structured',  # any timm model name (pretrained=False), structured MLPs by keyword
}


def registry(family):
    """The ``MODELS`` dict of one family (name -> constructor)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[family]).MODELS


def build_model(config):
    """Build a network from ``{'family': str, 'name': str, 'kwargs': dict}``."""
    if not isinstance(config, dict) or not {'family', 'name'} <= set(config):
        raise ValueError(f"a model config must be a dict with 'family', 'name' and 'kwargs', got {config!r}")
    models = registry(config['family'])
    name = config['name']
    if name not in models:
        if len(models) > 20:  # timm: a thousand names; say the closest ones
            from models.structured import close_matches
            near = close_matches(name, models)
            raise ValueError(f"unknown {config['family']} model {name!r}; closest: {', '.join(near) or 'none'}")
        raise ValueError(f"unknown {config['family']} model {name!r}; known: {', '.join(sorted(models))}")
    return models[name](**dict(config.get('kwargs') or {}))


def family_of(name, families=('vitae', 'timm')):
    """The first of ``families`` whose registry has ``name`` (default: a ViTAE variant, else any timm model; eval.py
    also looks in 'cifar' before timm, so this project's CIFAR vgg16_bn wins over timm's ImageNet one); ValueError
    naming the closest names otherwise."""
    for family in families:
        if name in registry(family):
            return family
    from models.structured import close_matches
    known = [n for family in families for n in registry(family)]
    small = [n for family in families if family != 'timm' for n in sorted(registry(family))]
    raise ValueError(f"unknown model {name!r} (not a {' / '.join(families)} model); closest: "
                     f"{', '.join(close_matches(name, known)) or 'none'}; this project's: {', '.join(small)}")


def parse_model_kwargs(items):
    """['patch_size=4', 'class_token=false', 'global_pool=avg'] -> {'patch_size': 4, 'class_token': False,
    'global_pool': 'avg'}: each value read as JSON (numbers, true/false/null, lists), else kept as a string."""
    import json
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'--model-kwargs takes KEY=VALUE items, got {item!r}')
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
