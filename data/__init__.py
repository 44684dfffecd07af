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

Datasets:

- ``digits``: ``data/digits.npz`` (1,797 real 8x8 scikit-learn digits, licence in ``data/DIGITS_LICENSE.md``),
  pixels /16 -> [0, 1], bilinear resize to ``img_size``, 3 channels, normalised. Stratified seeded split, per class
  round(20%) test, round(10%) val, rest train: with seed 0 the sizes are train 1,259 / val 179 / test 359.
  ``augment=True``: small random affine (+-10 deg, scale 0.9..1.1, shift +-1/16 of the side); no flips (digits
  are not mirror-symmetric).
- ``cifar10`` / ``cifar100``: torchvision's folder format under ``data_dir`` (``cifar-10-batches-py/`` or
  ``cifar-100-python/``). 'train' = official train minus a fixed seeded stratified 5,000-image hold-out = 'val';
  'test' = official test. ``augment=True``: random crop with 4-pixel padding + horizontal flip.
- ``imagenet``: ImageFolder ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``; 'val' and 'test'
  are both the official (labelled) validation set. Eval: resize to img_size/0.875 + center crop; train with
  ``augment=True``: RandomResizedCrop + horizontal flip.
- ``synthetic``: deterministic random images (class prototype + noise, learnable) for smoke tests;
  ``num_classes`` (default 10) and ``length`` (default train 1,000 / val 200 / test 200) are configurable.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ['DataError', 'build_dataset', 'task_indices', 'TaskSubset', 'CIFAR100_COARSE', 'dataset_info',
           'build_loader', 'set_epoch', 'ExactDistributedSampler', 'load_real_labels', 'real_labels_for',
           'real_correct', 'NAMES', 'SPLITS']

NAMES = ('digits', 'cifar10', 'cifar100', 'imagenet', 'synthetic')
SPLITS = ('train', 'val', 'test')
_DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits.npz')
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
_CIFAR_FOLDERS = {'cifar10': ('cifar-10-batches-py', 'data_batch_1..5, test_batch, batches.meta'),
                  'cifar100': ('cifar-100-python', 'train, test, meta')}
_SYNTHETIC_LENGTH = {'train': 1000, 'val': 200, 'test': 200}


class DataError(ValueError):
    """A dataset cannot be built: unknown name/split, or a missing/malformed local folder."""


def dataset_info(name):
    """Static facts about a dataset (no files are read)."""
    if name == 'digits':
        return dict(num_classes=10, classes=[str(i) for i in range(10)], img_size=32,
                    mean=(0.3053,) * 3, std=(0.3760,) * 3,  # pixel statistics of all 1,797 images after /16
                    splits={'train': 1259, 'val': 179, 'test': 359}, layout='embedded data/digits.npz')
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
    if name == 'synthetic':
        return dict(num_classes=10, classes=None, img_size=32, mean=(0.0,) * 3, std=(1.0,) * 3,
                    splits=dict(_SYNTHETIC_LENGTH), layout='generated in memory')
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)}")


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


def _digits(split, img_size, augment, seed):
    try:
        with np.load(_DIGITS_FILE) as f:
            images, labels = f['images'], f['labels']
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read the embedded digits file {_DIGITS_FILE} ({e}); it should hold 'images' "
                        "(1797, 8, 8) uint8 and 'labels' (1797,) uint8 - restore it from git") from None
    idx = _stratified_split(labels, {'test': 0.2, 'val': 0.1}, seed)[split]
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
    from torchvision import transforms as T
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
    if augment and split == 'train':
        tf = [T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        tf = [T.Resize(int(math.floor(img_size / 0.875)), antialias=True), T.CenterCrop(img_size)]
    tf += [T.ToTensor(), T.Normalize(info['mean'], info['std'])]
    ds = TransformDataset(base, range(len(base.samples)), T.Compose(tf), augment and split == 'train', seed)
    ds.filenames = [os.path.basename(p) for p, _ in base.samples]  # dataset order (by class, then by name)
    ds.classes = base.classes
    return ds


def build_dataset(name, split, data_dir=None, img_size=32, augment=False, seed=0, *, num_classes=None,
                  length=None, return_index=False):
    """Build a dataset by name; see the module docstring."""
    dataset_info(name)  # validates the name
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {name}; choose one of: {', '.join(SPLITS)}")
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive int, got {img_size!r}")
    if num_classes is not None and name != 'synthetic':
        raise DataError(f"num_classes can only be set for 'synthetic'; {name} has {dataset_info(name)['num_classes']}")
    if length is not None and name != 'synthetic':
        raise DataError(f"length can only be set for 'synthetic', not for {name}")
    if name == 'digits':
        ds = _digits(split, img_size, augment, seed)
    elif name in _CIFAR_FOLDERS:
        ds = _cifar(name, split, data_dir, img_size, augment, seed)
    elif name == 'imagenet':
        ds = _imagenet(split, data_dir, img_size, augment, seed)
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
