"""The data side of a SeaM run of reengineer_seam.py: which datasets it reads, the task's classes, the source /
target disjointness check and the task loaders.

``DataSpec`` names a dataset together with the classes of the model that reads it (a folder holding part of ImageNet
keeps ImageNet's 1,000 class ids). ``source_spec(args)`` is the base model's data, ``task_spec(args, source)`` the
task's (the source itself, or for defect inheritance the target folder / digits' target half); ``task_classes``
resolves --target-class / --classes / --n-classes / --superclass; ``check_data`` builds every split before anything
is created and refuses a target image that is also a source image. Every user mistake is a one-line
``common.UserError``."""
import dataclasses
import os

import numpy as np

from common import UserError
from data import (CIFAR100_COARSE, SPLITS, TaskSubset, build_dataset, build_loader, check_disjoint, dataset_info,
                  folder_classes, imagenet_label_map, load_superclasses, superclass_classes, task_indices)

@dataclasses.dataclass
class DataSpec:
    """A dataset the script reads, with the classes of the model that reads it.

    ``nc``: the model's class count; ``names[c]``: the class folder of model class ``c`` (None where the folder
    holds no such class; ``names`` None for datasets without class folders); ``part``: digits' 'source' / 'target'
    half (None: all of digits)."""
    name: str
    data_dir: object = None
    part: object = None
    nc: int = 0
    names: object = None

    def present(self):
        """The model classes that have images here."""
        return list(range(self.nc)) if self.names is None else [c for c, n in enumerate(self.names) if n is not None]

    def describe(self):
        if self.name == 'digits':
            return 'digits' if self.part is None else f'digits {self.part} half'
        return f'{self.name} {self.data_dir}'


def build(spec, split, img_size, augment=False):
    """``split`` of ``spec``'s dataset with labels in the model's classes (a partial ImageNet: wnid -> index)."""
    ds = build_dataset(spec.name, split, spec.data_dir, img_size, augment=augment, seed=0, part=spec.part)
    if spec.name == 'imagenet':
        lmap = imagenet_label_map(ds.classes, os.path.join(spec.data_dir, 'train' if split == 'train' else 'val'))
        if lmap is not None:
            ds = TaskSubset(ds, range(len(ds)), lmap)
    return ds


def folder_spec(data_dir):
    names = folder_classes(data_dir)  # a missing or malformed folder -> one line naming the layout
    return DataSpec('folder', data_dir, None, len(names), names)


def source_spec(args):
    """The base model's data: its class count (folder: one class per class folder) and class names."""
    if args.dataset == 'folder':
        return folder_spec(args.data_dir)
    if args.dataset == 'imagenet':
        root = os.path.join(args.data_dir or '', 'train')
        if args.data_dir is None or not os.path.isdir(root):
            build_dataset('imagenet', 'train', args.data_dir)  # raises the precise one-line error
        from torchvision.datasets.folder import find_classes
        classes = find_classes(root)[0]  # ImageFolder's label order, read from the folder names alone
        lmap = imagenet_label_map(classes, root)
        names = list(classes) if lmap is None else [None] * 1000
        for j, c in (lmap or {}).items():
            names[c] = classes[j]
        return DataSpec('imagenet', args.data_dir, None, 1000, names)
    return DataSpec(args.dataset, args.data_dir, None, dataset_info(args.dataset)['num_classes'])


def task_spec(args, source):
    """The task's data: the base model's own, or for defect inheritance the target (--target-dir, or on digits the
    half the base model never saw)."""
    if args.task != 'defect':
        return source
    return folder_spec(args.target_dir) if args.target_dir else DataSpec('digits', None, 'target', 10)


def check_base_part(args, part):
    """Defect inheritance on digits needs a base model trained on the source half only."""
    if args.task == 'defect' and args.dataset == 'digits' and not args.target_dir and part != 'source':
        raise UserError(f"{args.pretrained} was trained on {'all digits' if part is None else 'the ' + part + ' half'}"
                        ' (or does not record its part), which holds the defect target images: train the base on '
                        'the source half with --train-base --task defect (its base.pt then serves as --pretrained)')


def check_data(args, source, target):
    """Every split builds (a missing or malformed folder: one line now, before any folder exists); for defect
    inheritance no target image may be a source image (by content, over all splits of both). Returns the
    disjointness record (None when the task reads the source data)."""
    src = [build(source, s, args.img_size) for s in SPLITS]
    if target is source:
        return None
    tgt = [build(target, s, args.img_size) for s in SPLITS]
    shared = check_disjoint(src, tgt, names=(f'source ({source.describe()})', f'target ({target.describe()})'))
    return dict(source=source.describe(), target=target.describe(), shared_images=shared,
                source_items=dict(zip(SPLITS, map(len, src))), target_items=dict(zip(SPLITS, map(len, tgt))))


# ------------------------------------------------------------------------------------------------ the task
def check_present(spec, ids, flag):
    missing = [c for c in ids if spec.names is not None and spec.names[c] is None]
    if missing:
        raise UserError(f'{flag}: class(es) {missing} have no class folder in {spec.data_dir} (it holds '
                        f'{len(spec.present())} of the {spec.nc} classes); pick classes it holds')


def superclass_task(args, spec):
    """--superclass: a CIFAR-100 coarse class, or a superclass of --superclass-csv looked up by class-folder name
    (wnid), so a folder holding part of ImageNet resolves too. Returns (classes, report fields)."""
    if spec.name == 'cifar100':
        if not args.superclass.isdigit() or not 0 <= int(args.superclass) < 20:
            raise UserError(f'--superclass must be in 0..19 (CIFAR-100 has 20 superclasses), got {args.superclass!r}')
        return [c for c in range(100) if CIFAR100_COARSE[c] == int(args.superclass)], dict(superclass=int(args.superclass))
    if spec.names is None:
        raise UserError(f'--superclass needs --dataset cifar100 (its 20 coarse classes, by index) or imagenet / '
                        f'folder (named superclasses of --superclass-csv); {spec.name} has none')
    mapping = args.superclass_csv or 'imagenet'
    groups = load_superclasses(mapping)
    key = int(args.superclass) if args.superclass.isdigit() else args.superclass
    ids = {n: c for c, n in enumerate(spec.names) if n is not None}
    found = superclass_classes(key, list(ids), groups, allow_partial=True)  # unknown name / none here: one line
    name = key if isinstance(key, str) else list(groups)[key]
    missing, where = [w for w in groups[name] if w not in ids], f'{spec.describe()}'
    if missing and not args.superclass_partial:
        raise UserError(f'superclass {name!r}: {len(missing)} of its {len(groups[name])} classes have no class folder '
                        f'in {where} ({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""}); give a folder '
                        f'holding all of them, or pass --superclass-partial to use the {len(found)} present')
    classes = sorted(ids[list(ids)[p]] for p in found)
    if len(classes) < 2:
        raise UserError(f'superclass {name!r} has {len(classes)} class in {where} ({spec.names[classes[0]]}); a '
                        'multi-class task needs >= 2: choose another superclass or --classes')
    if missing:
        print(f'superclass {name!r}: using the {len(classes)} of its {len(groups[name])} classes in {where}; '
              f'missing {len(missing)}: {", ".join(missing)}', flush=True)
    return classes, dict(superclass=dict(name=name, mapping=mapping, wnids=[spec.names[c] for c in classes],
                                         missing=missing))


def task_classes(args, spec):
    """(the task's class ids among ``spec``'s model classes, extra report fields). The module's label of class
    classes[i] is i (binary: [target], labels 0 = target, 1 = other)."""
    nc, present = spec.nc, spec.present()
    if args.task == 'binary':
        if args.target_class is None or not 0 <= args.target_class < nc:
            raise UserError(f'--target-class must be in 0..{nc - 1} for {args.dataset}, got {args.target_class}')
        check_present(spec, [args.target_class], '--target-class')
        return [args.target_class], {}
    if args.superclass is not None:
        return superclass_task(args, spec)
    if args.classes is not None:
        try:
            classes = [int(c) for c in args.classes.split(',')]
        except ValueError:
            raise UserError(f'--classes must be comma-separated integers, got {args.classes!r}') from None
        if len(set(classes)) != len(classes) or not all(0 <= c < nc for c in classes) or len(classes) < 2:
            raise UserError(f'--classes needs >= 2 distinct ids in 0..{nc - 1}, got {args.classes!r}')
        check_present(spec, classes, '--classes')
        return classes, {}
    if args.n_classes is not None:
        if not 2 <= args.n_classes <= len(present):
            raise UserError(f'--n-classes must be in 2..{len(present)}, got {args.n_classes}')
        pick = np.random.default_rng(args.seed).permutation(len(present))[:args.n_classes]
        return sorted(np.asarray(present)[pick].tolist()), {}
    if args.task == 'defect':
        return present, {}
    raise UserError('--task multiclass needs --superclass NAME|I, --classes A,B,C or --n-classes K')


def loader(spec, args, split, classes=None, augment=False, shuffle=False, remap=True):
    """A loader of ``split``: the whole dataset (classes=None) or the task's subset, labels mapped to the module's
    outputs (remap=False keeps the model's labels, for scoring the original model)."""
    ds = build(spec, split, args.img_size, augment)
    if classes is not None:
        kind = 'binary' if args.task == 'binary' else 'multiclass'  # defect tasks use a class subset
        idx, lmap = task_indices(ds.targets, kind, classes, spec.nc, args.seed)
        ds = TaskSubset(ds, idx, lmap if remap else None)
    return build_loader(ds, args.batch_size, shuffle=shuffle, seed=args.seed)
