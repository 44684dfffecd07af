"""Datasets and loaders by name, from local files only (nothing is ever downloaded).

API (other scripts code against this):

- ``build_dataset(name, split, data_dir=None, img_size=32, augment=False, seed=0, *, num_classes=None, length=None,
  return_index=False)`` -> ``torch.utils.data.Dataset``. Items are ``(image, label)`` with ``image`` a float32
  tensor ``(3, img_size, img_size)`` (normalised with ``dataset_info(name)['mean'/'std']``) and ``label`` an int;
  with ``return_index=True`` items are ``(image, label, index)`` where ``index`` is the item's position in THIS
  dataset (``0 <= index < len(dataset)``); a DataLoader collates it to a LongTensor, so after a distributed
  evaluation every rank knows exactly which samples it saw (see ``real_labels_for`` / ``real_correct``).
  Every dataset has ``.targets`` (list of int labels, in item order) and ``.set_epoch(epoch)``.
  ``seed`` fixes the split (digits train/val/test, CIFAR val hold-out) and the augmentation stream; keep it fixed
  (default 0) to keep the same test set across runs.
  Augmentation is drawn from a generator seeded by (seed, epoch, index), so it does not depend on the number of
  processes, loader workers or the global RNG: 1 process and N processes see identical augmented images.
- ``dataset_info(name)`` -> dict(num_classes, classes (list of names or None), img_size (default), mean, std,
  splits (dict split -> size, or None where it depends on the local folder), layout (str)).
- ``DataError(ValueError)``: unknown name/split, missing or malformed folder (the message names the expected layout).
- ``build_loader(dataset, batch_size, shuffle=False, distributed=False, rank=0, world_size=1, seed=0,
  num_workers=0, drop_last=False, pin_memory=False, exact=None)`` -> DataLoader; see its docstring.
- ``set_epoch(loader, epoch)``: call once per epoch before iterating (sampler shuffle + augmentation stream).
- ImageNet ReaL: ``load_real_labels(path)``, ``real_labels_for(dataset, real)``, ``real_correct(pred, index, real)``.
- ``folder_classes(data_dir)`` -> the class names of a 'folder' dataset (its label order), read from the folder
  names alone, so a script knows ``num_classes`` before it builds a model.
- Superclasses: ``load_superclasses(mapping)`` -> ``{superclass: [class name, ...]}`` from a shipped CSV
  (``SUPERCLASS_MAPPINGS``: 'imagenet' = SeaM's 67 WordNet superclasses, 'restricted_imagenet' = MadryLab's 9; see
  ``data/superclasses/README.md``) or a user CSV path; ``superclass_classes(name, class_names, mapping,
  allow_partial=False)`` -> sorted class indices of a dataset whose class list is ``class_names`` (e.g. its
  ``.classes``, ImageFolder's wnid folder names); ``imagenet_class_index()`` -> ``{wnid: ImageNet-1k index}``;
  ``imagenet_label_map(classes, where)`` -> ``{folder label: ImageNet-1k index}`` for an imagenet folder holding
  only some wnid-named classes (None when its labels already are the 1,000 classes).
- Disjointness (defect inheritance needs source and target images disjoint): ``image_digests(data)``,
  ``find_overlap(a, b)``, ``check_disjoint(a, b, names=('source', 'target'), strict=True)``; see their docstrings.

Datasets:

- ``digits``: ``data/digits.npz`` (1,797 real 8x8 scikit-learn digits, licence in ``data/DIGITS_LICENSE.md``),
  pixels /16 -> [0, 1], bilinear resize to ``img_size``, 3 channels, normalised. Stratified seeded split, per class
  round(20%) test, round(10%) val, rest train: with seed 0 the sizes are train 1,259 / val 179 / test 359.
  ``augment=True``: small random affine (+-10 deg, scale 0.9..1.1, shift +-1/16 of the side); no flips (digits
  are not mirror-symmetric).
  ``part='source'|'target'`` (digits only) splits the images first into two disjoint halves by a seeded stratified
  split (per class round(50%) target, the rest source), then each half into its own train/val/test as above: the
  source half trains a base model, the target half is the fine-tuning data of a defect-inheritance experiment.
  With seed 0: source 630 / 90 / 179, target 629 / 90 / 179 (train / val / test; ``dataset_info('digits')
  ['part_splits']``). ``part=None`` (default) is the split above, unchanged.
- ``cifar10`` / ``cifar100``: torchvision's folder format under ``data_dir`` (``cifar-10-batches-py/`` or
  ``cifar-100-python/``). 'train' = official train minus a fixed seeded stratified 5,000-image hold-out = 'val';
  'test' = official test. ``augment=True``: random crop with 4-pixel padding + horizontal flip.
- ``imagenet``: ImageFolder ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``; 'val' and 'test'
  are both the official (labelled) validation set. Eval: resize to img_size/0.875 + center crop; train with
  ``augment=True``: RandomResizedCrop + horizontal flip.
- ``folder``: any torchvision ImageFolder tree under ``data_dir``, with imagenet's transforms and statistics.
  Either ``data_dir/train/<class>/*`` + ``data_dir/val/<class>/*`` (+ ``data_dir/test/<class>/*`` if present, else
  'test' = 'val'; the splits must hold the same class folders), or one ``data_dir/<class>/*`` tree split here like
  digits (seeded, per class round(20%) test, round(10%) val, the rest train; a class of fewer than 6 images has
  none in val, of fewer than 3 none in test). 'train', 'val' and 'test' are reserved: a tree with val/ or test/
  but no train/ is refused. Labels are positions in the sorted class-folder names (``folder_classes``); the
  dataset has ``.classes``, ``.paths`` (file of each item) and ``.filenames``. ``dataset_info('folder')`` has
  ``num_classes``/``classes`` None (they depend on the folder). Not in ``NAMES`` (the scripts' fixed-class choices).
- ``synthetic``: deterministic random images (class prototype + noise, learnable) for smoke tests;
  ``num_classes`` (default 10) and ``length`` (default train 1,000 / val 200 / test 200) are configurable.
"""
import csv
import hashlib
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ['DataError', 'build_dataset', 'task_indices', 'TaskSubset', 'CIFAR100_COARSE', 'dataset_info',
           'build_loader', 'set_epoch', 'ExactDistributedSampler', 'load_real_labels', 'real_labels_for',
           'real_correct', 'folder_classes', 'load_superclasses', 'superclass_classes', 'imagenet_class_index',
           'imagenet_label_map',
           'image_digests', 'find_overlap', 'check_disjoint', 'NAMES', 'SPLITS', 'PARTS', 'SUPERCLASS_MAPPINGS']

NAMES = ('digits', 'cifar10', 'cifar100', 'imagenet', 'synthetic')  # fixed class count: the scripts' --dataset choices
_ALL_NAMES = NAMES + ('folder',)
SPLITS = ('train', 'val', 'test')
PARTS = ('source', 'target')
SUPERCLASS_MAPPINGS = ('imagenet', 'restricted_imagenet')
_HERE = os.path.dirname(os.path.abspath(__file__))
_DIGITS_FILE = os.path.join(_HERE, 'digits.npz')
_SUPERCLASS_DIR = os.path.join(_HERE, 'superclasses')
_FOLDER_LAYOUT = ('DATA_DIR/train/<class>/*.jpg and DATA_DIR/val/<class>/*.jpg (optional DATA_DIR/test/<class>/; '
                  'without it test = val), or one DATA_DIR/<class>/*.jpg tree (split here: per class 20% test, '
                  '10% val)')
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
_CIFAR_FOLDERS = {'cifar10': ('cifar-10-batches-py', 'data_batch_1..5, test_batch, batches.meta'),
                  'cifar100': ('cifar-100-python', 'train, test, meta')}
_SYNTHETIC_LENGTH = {'train': 1000, 'val': 200, 'test': 200}


class DataError(ValueError):
    """A dataset cannot be built: unknown name/split, or a missing/malformed local folder."""


def dataset_info(name):
    """Static facts about a dataset (no files are read); for 'folder' the class list comes from ``folder_classes``."""
    if name == 'digits':
        return dict(num_classes=10, classes=[str(i) for i in range(10)], img_size=32,
                    mean=(0.3053,) * 3, std=(0.3760,) * 3,  # pixel statistics of all 1,797 images after /16
                    splits={'train': 1259, 'val': 179, 'test': 359}, layout='embedded data/digits.npz',
                    part_splits={'source': {'train': 630, 'val': 90, 'test': 179},  # build_dataset(part=...), seed 0
                                 'target': {'train': 629, 'val': 90, 'test': 179}})
    if name in _CIFAR_FOLDERS:
        folder, files = _CIFAR_FOLDERS[name]
        n = 10 if name == 'cifar10' else 100
        return dict(num_classes=n, classes=list(_CIFAR10_CLASSES) if n == 10 else None, img_size=32,
                    mean=(0.4914, 0.4822, 0.4465) if n == 10 else (0.5071, 0.4865, 0.4409),
                    std=(0.2470, 0.2435, 0.2616) if n == 10 else (0.2673, 0.2564, 0.2762),
                    splits={'train': 45000, 'val': 5000, 'test': 10000},
                    layout=f"DATA_DIR/{folder}/ holding {files} (torchvision's CIFAR format, python version)")
    if name == 'imagenet':
        return dict(num_classes=1000, classes=None, img_size=224, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                    splits=None, layout='DATA_DIR/train/<class>/*.JPEG and DATA_DIR/val/<class>/*.JPEG (ImageFolder)')
    if name == 'folder':  # classes: folder_classes(data_dir)
        return dict(num_classes=None, classes=None, img_size=224, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                    splits=None, layout=_FOLDER_LAYOUT)
    if name == 'synthetic':
        return dict(num_classes=10, classes=None, img_size=32, mean=(0.0,) * 3, std=(1.0,) * 3,
                    splits=dict(_SYNTHETIC_LENGTH), layout='generated in memory')
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(_ALL_NAMES)}")


def _sample_seed(seed, epoch, index):
    # One independent stream per (seed, epoch, sample): augmentation does not depend on who loads the sample.
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 1) * 2_147_483_647 + int(index) * 104_729 & (2 ** 62 - 1)


def _stratified_split(labels, fractions, seed):
    """Per class, shuffle with ``seed`` and cut off round(f * n_class) samples for each named fraction; the rest is
    'train'. Returns dict split -> sorted index array (disjoint, covering all samples)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ['train', *fractions]}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for split, f in fractions.items():
            n = int(round(f * len(idx)))
            out[split].append(idx[start:start + n])
            start += n
        out['train'].append(idx[start:])
    return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


class _Base(Dataset):
    epoch = 0
    return_index = False

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.targets)

    def _out(self, x, y, i):
        return (x, int(y), i) if self.return_index else (x, int(y))


class DigitsDataset(_Base):
    """The embedded digits, preprocessed once in memory: ``images01`` (n, 1, S, S) in [0, 1]."""

    def __init__(self, images01, targets, augment, seed, mean, std):
        self.images01, self.targets = images01, list(targets)
        self.augment, self.seed = augment, seed
        self.mean, self.std = mean[0], std[0]

    def __getitem__(self, i):
        x = self.images01[i]
        if self.augment:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, i))
            u = torch.rand(4, generator=g) * 2 - 1  # four U(-1, 1) draws
            angle, scale = math.radians(10.0) * u[0].item(), 1.0 + 0.1 * u[1].item()
            # affine_grid works in [-1, 1] coordinates (2 units per side): 0.125 units = 1/16 of the side.
            tx, ty = 0.125 * u[2].item(), 0.125 * u[3].item()
            c, s = math.cos(angle) / scale, math.sin(angle) / scale
            theta = torch.tensor([[[c, -s, tx], [s, c, ty]]], dtype=x.dtype)
            grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
            x = F.grid_sample(x[None], grid, mode='bilinear', padding_mode='zeros', align_corners=False)[0]
        x = ((x - self.mean) / self.std).expand(3, -1, -1).contiguous()
        return self._out(x, self.targets[i], i)


def _load_digits():
    try:
        with np.load(_DIGITS_FILE) as f:
            return f['images'], f['labels']
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read the embedded digits file {_DIGITS_FILE} ({e}); it should hold 'images' "
                        "(1797, 8, 8) uint8 and 'labels' (1797,) uint8 - restore it from git") from None


def _digits_indices(labels, split, seed, part):
    """Positions in digits.npz of ``split`` (of the whole set, or of its source/target half)."""
    fractions = {'test': 0.2, 'val': 0.1}
    if part is None:  # the original split: every run so far depends on it bit for bit
        return _stratified_split(labels, fractions, seed)[split]
    halves = _stratified_split(labels, {'target': 0.5}, seed)  # 'train' holds the rest: the source half
    half = halves['target' if part == 'target' else 'train']
    return half[_stratified_split(labels[half], fractions, seed)[split]]


def _digits(split, img_size, augment, seed, part=None):
    images, labels = _load_digits()
    idx = _digits_indices(labels, split, seed, part)
    x = torch.from_numpy(images[idx].astype(np.float32) / 16.0)[:, None]
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
    info = dataset_info('digits')
    ds = DigitsDataset(x.clamp_(0, 1), labels[idx].tolist(), augment, seed, info['mean'], info['std'])
    ds.indices = idx.tolist()  # positions in digits.npz (so tests and users can trace every item to the file)
    return ds


class SyntheticDataset(_Base):
    """Item i: label and noise drawn from a generator seeded by (seed, split, i); image = class prototype (a smooth
    random pattern) + noise. Learnable, deterministic, cheap at any size."""

    def __init__(self, split, img_size, seed, num_classes, length):
        self.img_size, self.num_classes = img_size, num_classes
        self.base = _sample_seed(seed, 1 + SPLITS.index(split), 0)
        g = torch.Generator().manual_seed(int(seed))
        self.protos = torch.randn(num_classes, 3, 4, 4, generator=g)  # upsampled per item (memory-light)
        self.targets = torch.randint(num_classes, (length,), generator=torch.Generator().manual_seed(self.base)).tolist()

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(_sample_seed(self.base, 0, i))  # fixed per item (no augmentation)
        y = self.targets[i]
        p = F.interpolate(self.protos[y][None], size=(self.img_size,) * 2, mode='bilinear', align_corners=False)[0]
        return self._out(p + 0.5 * torch.randn(p.shape, generator=g), y, i)


class TransformDataset(_Base):
    """A PIL-image dataset (torchvision CIFAR / ImageFolder, built with transform=None) restricted to ``indices``,
    with ``transform`` applied under a per-sample seeded RNG (torchvision's transforms draw from torch's global RNG,
    so it is forked and seeded around the call; the caller's RNG is left untouched)."""

    def __init__(self, base, indices, transform, augment, seed):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.augment, self.seed = augment, seed
        targets = base.targets
        self.targets = [int(targets[j]) for j in self.indices]

    def __getitem__(self, i):
        img, y = self.base[self.indices[i]]
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, self.epoch, i))
                x = self.transform(img)
        else:
            x = self.transform(img)
        return self._out(x, y, i)


def _cifar(name, split, data_dir, img_size, augment, seed):
    import torchvision
    from torchvision import transforms as T
    info = dataset_info(name)
    folder = _CIFAR_FOLDERS[name][0]
    if data_dir is None:
        raise DataError(f"{name} needs a data folder (--data-dir DIR) laid out as {info['layout']}")
    if os.path.basename(os.path.normpath(data_dir)) == folder:  # accept the inner folder too
        data_dir = os.path.dirname(os.path.normpath(data_dir))
    cls = torchvision.datasets.CIFAR10 if name == 'cifar10' else torchvision.datasets.CIFAR100
    try:
        base = cls(data_dir, train=split != 'test', download=False)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"{name} not found or corrupted under {data_dir!r} ({type(e).__name__}); "
                        f"expected {info['layout'].replace('DATA_DIR', data_dir.rstrip('/'))} - nothing is "
                        "downloaded, fetch it yourself") from None
    if split == 'test':
        indices = range(len(base))
    else:
        indices = _stratified_split(base.targets, {'val': 5000 / len(base)}, seed)[split]
    tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    if img_size != 32:
        tf.append(T.Resize(img_size, antialias=True))
    tf += [T.ToTensor(), T.Normalize(info['mean'], info['std'])]
    return TransformDataset(base, indices, T.Compose(tf), augment, seed)


def _imagenet(split, data_dir, img_size, augment, seed):
    import torchvision
    info = dataset_info('imagenet')
    layout = info['layout'] if data_dir is None else info['layout'].replace('DATA_DIR', data_dir.rstrip('/'))
    sub = 'train' if split == 'train' else 'val'
    if data_dir is None or not os.path.isdir(os.path.join(data_dir, sub)):
        raise DataError(f"imagenet {split} folder missing: expected {layout} (pass --data-dir DIR)")
    try:
        base = torchvision.datasets.ImageFolder(os.path.join(data_dir, sub))
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise DataError(f"imagenet folder {os.path.join(data_dir, sub)!r} is malformed "
                        f"({str(e).splitlines()[0][:80]}); expected {layout}") from None
    train_aug = augment and split == 'train'
    ds = TransformDataset(base, range(len(base.samples)), _imagefolder_transform(img_size, train_aug), train_aug, seed)
    ds.filenames = [os.path.basename(p) for p, _ in base.samples]  # dataset order (by class, then by name)
    ds.classes = base.classes
    return ds


def _imagefolder_transform(img_size, train_aug):
    """imagenet's and folder's transform: RandomResizedCrop + flip for training, else resize to img_size/0.875 and
    centre-crop; then ImageNet normalisation."""
    from torchvision import transforms as T
    if train_aug:
        tf = [T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        tf = [T.Resize(int(math.floor(img_size / 0.875)), antialias=True), T.CenterCrop(img_size)]
    return T.Compose(tf + [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])


# ---------------------------------------------------------------- 'folder': any ImageFolder tree

def _folder_roots(data_dir):
    """(split -> folder, layout message, whether the splits are drawn here from one DATA_DIR/<class>/ tree)."""
    if data_dir is None:
        raise DataError(f"folder needs a data folder (--data-dir DIR) laid out as {_FOLDER_LAYOUT}")
    layout = _FOLDER_LAYOUT.replace('DATA_DIR', str(data_dir).rstrip('/') or '/')
    if not os.path.isdir(data_dir):
        raise DataError(f"image folder {str(data_dir)!r} does not exist or is not a directory; expected {layout}")
    has = {s: os.path.isdir(os.path.join(data_dir, s)) for s in SPLITS}
    if has['train']:
        if not has['val']:
            raise DataError(f"image folder {str(data_dir)!r} has train/ but no val/; expected {layout}")
        return {s: os.path.join(data_dir, s if has[s] else 'val') for s in SPLITS}, layout, False
    if has['val'] or has['test']:  # e.g. a lone ImageNet val/: its class folders would be read as one class
        found = '/ and '.join(s for s in ('val', 'test') if has[s])
        raise DataError(f"image folder {str(data_dir)!r} has {found}/ but no train/; expected {layout}")
    return dict.fromkeys(SPLITS, str(data_dir)), layout, True


def _class_folders(root, layout):
    # the class list torchvision's ImageFolder uses (find_classes): sorted names of the sub-directories
    names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not names:
        raise DataError(f"no class folders in {root!r} (images must sit in one folder per class); expected {layout}")
    return names


def _name_some(names, k=3):
    return ', '.join(list(names)[:k]) + (f', ... ({len(names)} in all)' if len(names) > k else '')


def folder_classes(data_dir):
    """Class names of the 'folder' dataset under ``data_dir`` (sorted class-folder names; label i = name i), read
    from the folder names only (no image is opened). train/, val/ and test/ must hold the same class folders.
    Raises DataError naming the expected layout."""
    roots, layout, _ = _folder_roots(data_dir)
    listed = {s: _class_folders(roots[s], layout) for s in SPLITS}
    for split in ('val', 'test'):
        if listed[split] != listed['train']:
            train, other = set(listed['train']), set(listed[split])
            raise DataError(f"{roots['train']!r} and {roots[split]!r} hold different class folders (only in train/: "
                            f"{_name_some(sorted(train - other)) or 'none'}; only in {split}/: "
                            f"{_name_some(sorted(other - train)) or 'none'}); every split needs the same classes")
    return listed['train']


def _scan_folder(root, layout):
    """torchvision ImageFolder of ``root`` (no transform); every class folder must hold at least one image."""
    import torchvision
    from torchvision.datasets.folder import IMG_EXTENSIONS
    try:
        base = torchvision.datasets.ImageFolder(root, allow_empty=True)  # empty classes: our own message below
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise DataError(f"image folder {root!r} is malformed ({str(e).splitlines()[0][:80]}); expected {layout}") \
            from None
    counts = np.bincount(np.asarray(base.targets, dtype=np.int64), minlength=len(base.classes))
    empty = [c for c, n in zip(base.classes, counts) if n == 0]
    if empty:
        raise DataError(f"{len(empty)} class folder(s) in {root!r} hold no image ({_name_some(empty)}); image files "
                        f"end in {', '.join(IMG_EXTENSIONS)}")
    return base


def _folder(split, data_dir, img_size, augment, seed):
    classes = folder_classes(data_dir)  # layout and identical class lists across the splits
    roots, layout, drawn = _folder_roots(data_dir)
    base = _scan_folder(roots[split], layout)
    if drawn:
        parts = _stratified_split(base.targets, {'test': 0.2, 'val': 0.1}, seed)
        empty = [s for s in SPLITS if len(parts[s]) == 0]
        if empty:
            raise DataError(f"{str(data_dir)!r}: {len(base.samples)} images in {len(classes)} classes leave the "
                            f"{empty[0]} split empty (per class round(20%) go to test, round(10%) to val); add "
                            "images or give DATA_DIR/train/ and DATA_DIR/val/")
        indices = parts[split]
    else:
        indices = range(len(base.samples))
    train_aug = augment and split == 'train'
    ds = TransformDataset(base, indices, _imagefolder_transform(img_size, train_aug), train_aug, seed)
    ds.classes = list(classes)
    ds.paths = [base.samples[j][0] for j in ds.indices]  # the file of each item, in item order
    ds.filenames = [os.path.basename(p) for p in ds.paths]
    return ds


def build_dataset(name, split, data_dir=None, img_size=32, augment=False, seed=0, *, num_classes=None,
                  length=None, return_index=False, part=None):
    """Build a dataset by name; see the module docstring."""
    dataset_info(name)  # validates the name
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {name}; choose one of: {', '.join(SPLITS)}")
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive int, got {img_size!r}")
    if num_classes is not None and name != 'synthetic':
        has = 'takes its classes from the folder' if name == 'folder' else f"has {dataset_info(name)['num_classes']}"
        raise DataError(f"num_classes can only be set for 'synthetic'; {name} {has}")
    if length is not None and name != 'synthetic':
        raise DataError(f"length can only be set for 'synthetic', not for {name}")
    if part is not None and (name != 'digits' or part not in PARTS):
        raise DataError(f"part={part!r}: only digits has parts ({', '.join(PARTS)}); for image folders keep source "
                        "and target images in two folders and check them with data.check_disjoint")
    if name == 'digits':
        ds = _digits(split, img_size, augment, seed, part)
    elif name in _CIFAR_FOLDERS:
        ds = _cifar(name, split, data_dir, img_size, augment, seed)
    elif name == 'imagenet':
        ds = _imagenet(split, data_dir, img_size, augment, seed)
    elif name == 'folder':
        ds = _folder(split, data_dir, img_size, augment, seed)
    else:
        n_cls = 10 if num_classes is None else int(num_classes)
        n = _SYNTHETIC_LENGTH[split] if length is None else int(length)
        if n_cls < 2 or n < 1:
            raise DataError(f"synthetic needs num_classes >= 2 and length >= 1, got {n_cls} and {n}")
        ds = SyntheticDataset(split, img_size, seed, n_cls, n)
    ds.return_index = bool(return_index)
    return ds


def task_indices(targets, task, classes, num_classes, seed):
    """A SeaM sub-task of a dataset: (indices into it, {original label: task label}).

    binary: every image of ``classes[0]`` plus as many negatives drawn (seeded) from the other classes, labelled
    0 = target, 1 = other (SeaM's construction); multiclass: every image of ``classes``, labelled by position.
    reengineer_seam.py (training) and eval.py (scoring) both draw the subset here, so they always agree.
    """
    t = np.asarray(targets)
    if task == 'binary':
        pos = np.flatnonzero(t == classes[0])
        neg = np.random.default_rng(seed).permutation(np.flatnonzero(t != classes[0]))[:len(pos)]
        return np.concatenate([pos, neg]), {c: int(c != classes[0]) for c in range(num_classes)}
    return np.flatnonzero(np.isin(t, classes)), {c: i for i, c in enumerate(classes)}


# CIFAR-100 fine label -> coarse (superclass) label, the standard 20-superclass grouping
CIFAR100_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
                   0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4,
                   18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19,
                   5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


class TaskSubset(Dataset):
    """Items ``indices`` of ``base`` with labels remapped by ``label_map`` (None keeps the original label): items
    ``(x, label)``, or ``(x, label, position in this subset)`` with ``return_index=True`` (for exact distributed
    evaluation). ``targets`` and ``set_epoch`` follow the base dataset."""

    def __init__(self, base, indices, label_map=None, return_index=False):
        self.base, self.indices, self.label_map = base, [int(i) for i in indices], label_map
        self.return_index = return_index
        self.targets = [base.targets[i] if label_map is None else label_map[base.targets[i]] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __getitem__(self, i):
        x = self.base[self.indices[i]][0]
        return (x, self.targets[i], i) if self.return_index else (x, self.targets[i])


class ExactDistributedSampler(Sampler):
    """Evaluation sampler: rank r gets indices r, r + W, r + 2W, ... - every sample goes to exactly one rank, no
    padding duplicates (ranks may get lengths differing by one; sum counts with ``all_reduce`` for exact metrics)."""

    def __init__(self, dataset, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.n, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.n, self.world_size))

    def set_epoch(self, epoch):  # same interface as DistributedSampler
        pass


def build_loader(dataset, batch_size, shuffle=False, distributed=False, rank=0, world_size=1, seed=0,
                 num_workers=0, drop_last=False, pin_memory=False, exact=None):
    """DataLoader over this rank's share.

    Training (``shuffle=True`` or ``exact=False``): a ``DistributedSampler(num_replicas=world_size if distributed
    else 1, shuffle, seed)`` - also for one process, so the global sample order of 1 process with batch B equals
    the union of N processes with batch B/N each (rank r takes every N-th index of the same permutation).
    ``drop_last`` drops the last incomplete batch. Evaluation (default when ``shuffle=False`` and
    ``drop_last=False``, or ``exact=True``): ``ExactDistributedSampler`` - each sample on exactly one rank.
    Call ``set_epoch(loader, epoch)`` at the start of every epoch. The loader has its own seeded generator, so
    creating an iterator never consumes the global torch RNG.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not distributed:
        rank, world_size = 0, 1
    if exact is None:
        exact = not shuffle and not drop_last
    if exact:
        sampler = ExactDistributedSampler(dataset, rank, world_size)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(int(seed)))


def set_epoch(loader, epoch):
    """Reshuffle the sampler and move the augmentation stream to ``epoch`` (before iterating the loader)."""
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)


# ---------------------------------------------------------------- ImageNet ReaL labels (Beyer et al., 2020)

def load_real_labels(path, num_classes=1000):
    """Read ``real.json``: a list with one entry per ImageNet val image, in sorted-filename order
    (ILSVRC2012_val_00000001.JPEG first), each a list of valid class indices (possibly empty = no valid label).
    Returns ``list[list[int]]``; raises DataError for a missing or malformed file."""
    try:
        with open(path) as f:
            real = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read ReaL labels {path!r} ({str(e).splitlines()[0][:80]}); expected real.json: a "
                        "JSON list of lists of class indices, one per val image in sorted-filename order") from None
    if not isinstance(real, list) or not all(
            isinstance(r, list) and all(isinstance(c, int) and 0 <= c < num_classes for c in r) for r in real):
        raise DataError(f"{path!r} is not a ReaL label file: expected a JSON list of lists of ints in "
                        f"[0, {num_classes}), one per val image")
    return real


def real_labels_for(dataset, real):
    """Align ReaL labels to an imagenet val dataset built by ``build_dataset('imagenet', 'val', ...)``:
    returns ``aligned`` with ``aligned[i]`` = the valid labels of ``dataset``'s item ``i`` (ImageFolder orders
    items by class folder, ReaL by file name, so item i's file name is looked up in the sorted list)."""
    names = getattr(dataset, 'filenames', None)
    if names is None:
        raise DataError("ReaL labels need an imagenet val dataset built by data.build_dataset('imagenet', 'val', ...)")
    if len(real) != len(names):
        raise DataError(f"ReaL file has {len(real)} entries but the val folder has {len(names)} images; "
                        "ReaL needs the full 50,000-image ImageNet val set")
    position = {n: k for k, n in enumerate(sorted(names))}
    return [real[position[n]] for n in names]


def real_correct(pred, index, aligned):
    """ReaL counts for one batch: ``pred`` (B,) predicted classes, ``index`` (B,) item indices from a
    ``return_index=True`` dataset, ``aligned`` from ``real_labels_for``. Returns ``(correct, counted)`` ints;
    images with an empty ReaL list are not counted. Sum both over batches and ranks, then divide."""
    correct = counted = 0
    for p, i in zip(pred.tolist(), index.tolist()):
        labels = aligned[i]
        if labels:
            counted += 1
            correct += int(p in labels)
    return correct, counted


# ---------------------------------------------------------------- named superclasses (SeaM multi-class tasks)

def _csv_rows(path):
    """(header, [(line number, fields)]) of a CSV whose '#' lines are comments; DataError if unreadable."""
    try:
        with open(path, newline='') as f:
            lines = [(k, line) for k, line in enumerate(f, start=1)
                     if line.strip() and not line.lstrip().startswith('#')]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read superclass file {str(path)!r} ({e}); pass one of "
                        f"{', '.join(SUPERCLASS_MAPPINGS)} or a CSV with the columns superclass,wnid") from None
    rows = [(k, [c.strip() for c in next(csv.reader([line]))]) for k, line in lines]
    if not rows:
        raise DataError(f"superclass file {str(path)!r} has no header row: expected columns superclass,wnid")
    return rows[0][1], rows[1:]


def _mapping_path(mapping):
    return os.path.join(_SUPERCLASS_DIR, f'{mapping}.csv') if mapping in SUPERCLASS_MAPPINGS else mapping


def load_superclasses(mapping='imagenet'):
    """Superclasses from a CSV: a shipped name in ``SUPERCLASS_MAPPINGS`` or the path of a user file with (at
    least) the columns ``superclass`` and ``wnid`` (the class folder name; other columns are ignored, '#' lines
    are comments). Returns ``{superclass: [class name, ...]}`` in file order; for 'imagenet' position k of the dict
    is SeaM's ``--target_superclass_idx k``. A class may be in several superclasses, but only once in each.
    Raises DataError for a missing or malformed file."""
    path = _mapping_path(mapping)
    header, rows = _csv_rows(path)
    if 'superclass' not in header or 'wnid' not in header:
        raise DataError(f"superclass file {str(path)!r}: the header {','.join(header)!r} lacks superclass and/or wnid "
                        "(expected e.g. superclass,wnid,index,name)")
    i_sc, i_cls = header.index('superclass'), header.index('wnid')
    groups = {}
    for line, fields in rows:
        sc = fields[i_sc] if i_sc < len(fields) else ''
        cls = fields[i_cls] if i_cls < len(fields) else ''
        if not sc or not cls:
            raise DataError(f"superclass file {str(path)!r} line {line}: empty superclass or wnid field")
        members = groups.setdefault(sc, [])
        if cls in members:
            raise DataError(f"superclass file {str(path)!r} line {line}: {cls} listed twice in superclass {sc!r}")
        members.append(cls)
    if not groups:
        raise DataError(f"superclass file {str(path)!r} holds a header but no rows")
    return groups


def superclass_classes(name, class_names, mapping='imagenet', allow_partial=False):
    """Sorted class indices, in a dataset whose class list is ``class_names`` (e.g. ``ds.classes``: ImageFolder's
    wnid folder names), of the superclass ``name`` (a str, or an int = position in the mapping: SeaM's index).
    ``mapping``: a dict from ``load_superclasses`` or what it takes. Every class of the superclass must be in
    ``class_names`` (DataError naming the missing ones), unless ``allow_partial=True``, which keeps the present ones
    (at least one). An unknown name is a DataError listing the known ones."""
    groups = mapping if isinstance(mapping, dict) else load_superclasses(mapping)
    names = list(groups)
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not 0 <= name < len(names):
            raise DataError(f"superclass index {name} out of range: this mapping has {len(names)} superclasses "
                            f"(0..{len(names) - 1})")
        name = names[name]
    if name not in groups:
        raise DataError(f"unknown superclass {name!r}; known: {', '.join(names)}")
    position = {c: i for i, c in enumerate(class_names)}
    if len(position) != len(class_names):
        raise ValueError('class_names holds duplicates; pass the class list of one dataset (e.g. ds.classes)')
    members = groups[name]
    missing = [c for c in members if c not in position]
    present = sorted(position[c] for c in members if c in position)
    if not present:
        raise DataError(f"superclass {name!r}: none of its {len(members)} classes ({_name_some(members)}) is in "
                        f"this dataset's {len(position)} classes")
    if missing and not allow_partial:
        raise DataError(f"superclass {name!r}: {len(missing)} of its {len(members)} classes are not in this dataset "
                        f"({_name_some(missing)}); give a folder holding all of them, or allow_partial=True to use "
                        f"the {len(present)} present")
    return present


def imagenet_class_index():
    """``{wnid: ImageNet-1k class index}`` for the 1,000 classes (from the shipped imagenet.csv): the label a
    1000-class pretrained model uses for a class, also when a folder holds only some of the classes."""
    header, rows = _csv_rows(_mapping_path('imagenet'))
    i_cls, i_idx = header.index('wnid'), header.index('index')
    return {fields[i_cls]: int(fields[i_idx]) for _, fields in rows}


def imagenet_label_map(classes, where='the imagenet folder'):
    """``{folder label: ImageNet-1k class index}`` for an imagenet split whose class folders (``classes``, its
    ``.classes`` in label order) are wnids, so a folder holding only some classes is labelled as a 1000-class model
    sees it; None when the folder labels already are the 1,000 classes (all 1,000 folders, wnids or not). A partial
    folder with other names is a DataError (its classes are unknown)."""
    index = imagenet_class_index()
    if all(c in index for c in classes):
        lmap = {j: index[c] for j, c in enumerate(classes)}
        return None if all(j == k for j, k in lmap.items()) else lmap
    if len(classes) == 1000:
        return None
    odd = [c for c in classes if c not in index]
    raise DataError(f"{where} holds {len(classes)} class folders, {len(odd)} of them not ImageNet wnids (e.g. "
                    f"{odd[0]!r}), so their ImageNet classes are unknown: name the folders by wnid (n01440764, ...) or "
                    "read them as a 'folder' dataset (classes = the folders)")


# ---------------------------------------------------------------- disjoint source and target images

def _file_sha1(path):
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _array_sha1(a):
    a = np.ascontiguousarray(a)  # dtype and shape are hashed too: equal bytes of different arrays differ
    return hashlib.sha1(f'{a.dtype.str}{a.shape}'.encode() + a.tobytes()).hexdigest()


def _folder_images(root):
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not os.path.isdir(root):
        raise DataError(f"{str(root)!r} is not a directory of images")
    found = [os.path.join(d, n) for d, subdirs, files in sorted(os.walk(root)) for n in sorted(files)
             if n.lower().endswith(IMG_EXTENSIONS)]
    if not found:
        raise DataError(f"no image files under {str(root)!r} (image files end in {', '.join(IMG_EXTENSIONS)})")
    return found


def _image_sources(data):
    """Per image of ``data``: ('file', path) or (description, raw array)."""
    if isinstance(data, (list, tuple)):
        return [src for d in data for src in _image_sources(d)]
    if isinstance(data, (str, os.PathLike)):
        return [('file', p) for p in _folder_images(data)]
    if isinstance(data, TaskSubset):
        inner = _image_sources(data.base)  # cheap: paths or views, nothing is read yet
        return [inner[i] for i in data.indices]
    if isinstance(data, DigitsDataset):
        images = _load_digits()[0]
        return [(f'digits.npz image {j}', images[j]) for j in data.indices]  # the raw 8x8 pixels, any img_size
    if isinstance(data, TransformDataset):
        if hasattr(data.base, 'samples'):  # ImageFolder (imagenet, folder)
            return [('file', data.base.samples[j][0]) for j in data.indices]
        if isinstance(getattr(data.base, 'data', None), np.ndarray):  # torchvision CIFAR: raw uint8 images
            return [(f'{type(data.base).__name__} image {j}', data.base.data[j]) for j in data.indices]
    raise ValueError(f"cannot digest the images of a {type(data).__name__}: pass a dataset of data.build_dataset "
                     "(digits, cifar10/100, imagenet, folder), a TaskSubset of one, an image folder path, or a list")


def image_digests(data):
    """``[(sha1 hex digest, description), ...]``, one per image of ``data`` in item order: the sha1 of the file's
    bytes for folder datasets (imagenet, folder, a folder path: every image file under it), of the raw pixel array
    for in-memory ones (digits: the 8x8 uint8 image in digits.npz, so the digest does not depend on img_size;
    CIFAR: the 32x32x3 uint8 image). ``data`` may be a list of those. Reads every file once."""
    return [(_file_sha1(what) if kind == 'file' else _array_sha1(what), what if kind == 'file' else kind)
            for kind, what in _image_sources(data)]


def find_overlap(a, b):
    """``[(image of a, image of b), ...]`` (descriptions: file paths, 'digits.npz image j') for every image of ``b``
    whose content digest equals one of ``a``'s; [] when they share no image. Images are compared by content, so a
    copy under another name or in another folder counts; images of the same kind are compared (file bytes with
    file bytes, raw arrays with raw arrays)."""
    seen = {}
    for digest, what in image_digests(a):
        seen.setdefault(digest, what)
    return [(seen[digest], what) for digest, what in image_digests(b) if digest in seen]


def check_disjoint(a, b, names=('source', 'target'), strict=True):
    """Defect inheritance needs the target (fine-tuning) images disjoint from the source (pretraining) ones:
    returns the number of images of ``b`` also in ``a`` (see ``find_overlap``); with ``strict`` (default) a shared
    image is a DataError naming the count and the first three pairs. ``a``/``b``: datasets, folder paths or lists of
    them (e.g. the three splits of each side)."""
    pairs = find_overlap(a, b)
    if pairs and strict:
        shown = '; '.join(f'{x} = {y}' for x, y in pairs[:3])
        raise DataError(f"{len(pairs)} {names[1]} image(s) are also {names[0]} images (same content): {shown}"
                        f"{'; ...' if len(pairs) > 3 else ''}; remove them from one side")
    return len(pairs)
