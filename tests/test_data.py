"""data/: splits, determinism, augmentation, layouts and errors, loaders, ReaL labels.

References are independent of the code under test: the raw digits.npz file, hand-made ImageFolder trees, counts
worked out by hand.
"""
import json
import os

import numpy as np
import pytest
import torch

import data
from data import DataError, build_dataset, build_loader, dataset_info

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'digits.npz')


@pytest.fixture(scope='module')
def raw_digits():
    with np.load(DIGITS) as f:
        return f['images'], f['labels']


@pytest.fixture(scope='module')
def digit_splits():
    return {s: build_dataset('digits', s, img_size=8) for s in ('train', 'val', 'test')}


def test_digits_splits_disjoint_complete_and_stratified(raw_digits, digit_splits):
    images, labels = raw_digits
    idx = {s: ds.indices for s, ds in digit_splits.items()}
    sets = {s: set(v) for s, v in idx.items()}
    assert all(len(sets[s]) == len(idx[s]) for s in idx)  # no duplicates inside a split
    assert not (sets['train'] & sets['val'] or sets['train'] & sets['test'] or sets['val'] & sets['test'])
    assert sets['train'] | sets['val'] | sets['test'] == set(range(1797))
    assert {s: len(v) for s, v in idx.items()} == dataset_info('digits')['splits']
    for s, frac in (('test', 0.2), ('val', 0.1)):
        per_class = np.bincount(labels[idx[s]], minlength=10)
        expected = np.bincount(labels, minlength=10) * frac
        assert np.all(np.abs(per_class - expected) <= 0.5 + 1e-9), (s, per_class, expected)
    # items trace back to the file: label and (at 8 px, where bilinear resizing is the identity) pixels
    info = dataset_info('digits')
    ds = digit_splits['val']
    for i in (0, 7, len(ds) - 1):
        x, y = ds[i]
        j = ds.indices[i]
        assert y == labels[j]
        ref = (torch.from_numpy(images[j].astype(np.float32)) / 16 - info['mean'][0]) / info['std'][0]
        assert x.shape == (3, 8, 8)
        for c in range(3):
            torch.testing.assert_close(x[c], ref, rtol=0, atol=1e-6)


def test_digits_split_deterministic_and_seeded(digit_splits):
    again = build_dataset('digits', 'test', img_size=8)
    assert again.indices == digit_splits['test'].indices
    other = build_dataset('digits', 'test', img_size=8, seed=1)
    assert other.indices != again.indices
    a, b = build_dataset('digits', 'train', img_size=32), build_dataset('digits', 'train', img_size=32)
    assert torch.equal(a[5][0], b[5][0]) and a[5][0].shape == (3, 32, 32)


def test_digits_resize_and_normalisation():
    ds = build_dataset('digits', 'train', img_size=32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert abs(x.mean().item()) < 0.15 and 0.8 < x.std().item() < 1.2  # normalised with the dataset statistics


def test_digits_augmentation_reproducible_per_epoch_and_index():
    ds = build_dataset('digits', 'train', img_size=32, augment=True)
    plain = build_dataset('digits', 'train', img_size=32)
    ds.set_epoch(3)
    a = ds[10][0]
    ds.set_epoch(3)
    assert torch.equal(a, ds[10][0])           # same (seed, epoch, index) -> same image, whatever the RNG state
    torch.manual_seed(123)
    assert torch.equal(a, ds[10][0])
    ds.set_epoch(4)
    assert not torch.equal(a, ds[10][0])       # a new epoch draws new transforms
    assert not torch.equal(a, plain[10][0])
    assert (a - plain[10][0]).abs().mean() < 0.5  # small shifts, not a different image
    assert ds[10][1] == plain[10][1]


def test_synthetic_deterministic_and_configurable():
    a = build_dataset('synthetic', 'train', img_size=16, num_classes=5, length=40)
    b = build_dataset('synthetic', 'train', img_size=16, num_classes=5, length=40)
    assert len(a) == 40 and set(a.targets) <= set(range(5))
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == b[3][1] and a[3][0].shape == (3, 16, 16)
    v = build_dataset('synthetic', 'val', img_size=16, num_classes=5, length=40)
    assert not torch.equal(a[3][0], v[3][0])
    assert len(build_dataset('synthetic', 'test')) == dataset_info('synthetic')['splits']['test']
    with pytest.raises(DataError, match='num_classes'):
        build_dataset('digits', 'train', num_classes=3)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_missing_or_malformed_folder(tmp_path, name):
    folder = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
    with pytest.raises(DataError, match=folder):
        build_dataset(name, 'train', data_dir=str(tmp_path))
    with pytest.raises(DataError, match='--data-dir'):
        build_dataset(name, 'train')
    (tmp_path / folder).mkdir()
    (tmp_path / folder / 'test_batch').write_bytes(b'not a pickle')
    with pytest.raises(DataError, match=folder):
        build_dataset(name, 'test', data_dir=str(tmp_path))
    assert not any(p.name.endswith('.tar.gz') for p in tmp_path.iterdir())  # nothing was downloaded


def test_unknown_name_and_split():
    with pytest.raises(DataError, match='digits, cifar10'):
        build_dataset('mnist', 'train')
    with pytest.raises(DataError, match='train, val, test'):
        build_dataset('digits', 'dev')
    with pytest.raises(DataError):
        dataset_info('mnist')
    assert issubclass(DataError, ValueError)


def _image_folder(root, classes, per_class):
    from PIL import Image
    names = []
    k = 0
    for split in ('train', 'val'):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for _ in range(per_class):
                k += 1
                name = f'ILSVRC2012_val_{(97 * k) % 1000:08d}.png'  # file names not in class order
                Image.fromarray(np.full((40, 48, 3), k % 255, np.uint8)).save(root / split / c / name)
                if split == 'val':
                    names.append((name, c))
    return names


def test_imagenet_folder_real_labels_and_index(tmp_path):
    names = _image_folder(tmp_path, ['n01', 'n02'], 3)
    with pytest.raises(DataError, match='train/<class>'):
        build_dataset('imagenet', 'val', data_dir=str(tmp_path / 'nope'))
    train = build_dataset('imagenet', 'train', data_dir=str(tmp_path), img_size=32, augment=True)
    val = build_dataset('imagenet', 'val', data_dir=str(tmp_path), img_size=32, return_index=True)
    assert len(train) == 6 and len(val) == 6 and train[0][0].shape == (3, 32, 32)
    x, y, i = val[4]
    assert i == 4 and y == val.targets[4]
    # real.json in sorted-filename order; give each image a distinctive label set derived from its name
    sorted_names = sorted(n for n, _ in names)
    real = [[int(n[-7:-4]) % 1000] if k % 3 else [] for k, n in enumerate(sorted_names)]
    path = tmp_path / 'real.json'
    path.write_text(json.dumps(real))
    aligned = data.real_labels_for(val, data.load_real_labels(str(path)))
    for k, fname in enumerate(val.filenames):
        assert aligned[k] == real[sorted_names.index(fname)]
    # real_correct against a hand-built expectation keyed by file name, never by the alignment under test:
    # sorted name k has label set real[k] ([] for k = 0, 3); predict its label for sorted names 1 and 2 and a
    # wrong class for name 4 and 5, so 2 of the 4 counted images are correct. Items are fed in reverse order.
    by_name = {n: (real[k][0] if k in (1, 2) else 999) for k, n in enumerate(sorted_names)}
    order = list(range(5, -1, -1))
    pred = torch.tensor([by_name[val.filenames[i]] for i in order])
    correct, counted = data.real_correct(pred, torch.tensor(order), aligned)
    assert (correct, counted) == (2, 4)
    path.write_text(json.dumps({'a': 1}))
    with pytest.raises(DataError, match='ReaL'):
        data.load_real_labels(str(path))
    with pytest.raises(DataError, match='50,000'):
        data.real_labels_for(val, [[1]] * 5)


@pytest.mark.parametrize('world', [1, 2, 3, 4])
def test_exact_eval_sampler_covers_each_sample_once(world):
    ds = build_dataset('synthetic', 'val', img_size=16, length=23, return_index=True)
    seen = []
    for rank in range(world):
        loader = build_loader(ds, 4, distributed=world > 1, rank=rank, world_size=world)
        for x, y, idx in loader:
            seen += idx.tolist()
    assert sorted(seen) == list(range(23))


def test_train_sampler_union_of_ranks_equals_single_process():
    ds = build_dataset('synthetic', 'train', img_size=16, length=50, return_index=True)
    single = build_loader(ds, 8, shuffle=True, drop_last=True, seed=3)
    ranks = [build_loader(ds, 4, shuffle=True, drop_last=True, distributed=True, rank=r, world_size=2, seed=3)
             for r in range(2)]
    for epoch in (0, 1):
        for ld in [single, *ranks]:
            data.set_epoch(ld, epoch)
        one = [b[2].tolist() for b in single]
        two = [b0[2].tolist() + b1[2].tolist() for b0, b1 in zip(*ranks)]
        assert len(one) == len(two) == 50 // 8
        assert [sorted(a) for a in one] == [sorted(b) for b in two]
    assert one != [list(range(k, k + 8)) for k in range(0, 48, 8)]  # shuffled


def test_loader_does_not_touch_global_rng():
    ds = build_dataset('synthetic', 'train', img_size=16, length=16)
    torch.manual_seed(0)
    a = torch.rand(1)
    torch.manual_seed(0)
    for _ in build_loader(ds, 4, shuffle=True, drop_last=True):
        pass
    assert torch.equal(a, torch.rand(1))
