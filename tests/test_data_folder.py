"""data/: the 'folder' dataset, named ImageNet superclasses, disjoint source/target images, digits source/target parts.

References are independent of the code under test: tiny PNG trees written here (labels read back from each file's
class folder), split sizes worked out by hand, ImageNet facts from timm's ImageNetInfo and hand-written rows, the
raw digits.npz file, and the digests of the digits splits recorded before the part= option existed.
"""
import csv
import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, build_dataset, check_disjoint, folder_classes, superclass_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, 'data', 'digits.npz')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WNIDS = ['n02085620', 'n01440764', 'n02123045']  # Chihuahua, tench, tabby (created in this unsorted order)


def _png(path, rgb, size=(10, 12)):
    Image.fromarray(np.broadcast_to(np.array(rgb, np.uint8), (*size, 3)).copy()).save(path)


def _tree(root, counts, start=0):
    """root/<class>/img_k.png, one constant-colour image per file, every image different; returns the next colour
    counter. counts: {class: number of images}."""
    k = start
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for _ in range(n):
            k += 1
            _png(root / cls / f'img_{k:03d}.png', (k % 251, (7 * k) % 253, k // 251))
    return k


def _label_of(path, classes):
    return classes.index(os.path.basename(os.path.dirname(path)))


def test_folder_train_val_layout_labels_shapes_transforms(tmp_path):
    k = _tree(tmp_path / 'train', dict.fromkeys(WNIDS, 3))
    _tree(tmp_path / 'val', dict.fromkeys(WNIDS, 2), start=k)
    classes = sorted(WNIDS)
    assert folder_classes(str(tmp_path)) == classes
    info = data.dataset_info('folder')
    assert info['num_classes'] is None and info['classes'] is None and info['splits'] is None
    assert (info['mean'], info['std']) == (MEAN, STD) and 'folder' not in data.NAMES
    train = build_dataset('folder', 'train', str(tmp_path), img_size=16, augment=True)
    val = build_dataset('folder', 'val', str(tmp_path), img_size=16, return_index=True)
    test = build_dataset('folder', 'test', str(tmp_path), img_size=16)
    assert (len(train), len(val)) == (9, 6) and train.classes == val.classes == classes
    assert test.paths == val.paths  # no test/: test is val
    assert all(p.startswith(str(tmp_path / 'train')) for p in train.paths)
    for ds in (train, val):
        assert ds.targets == [_label_of(p, classes) for p in ds.paths]
    assert train[4][0].shape == (3, 16, 16) and train[4][1] == train.targets[4]
    # a constant image stays constant under resize + centre crop: (value / 255 - mean) / std per channel
    x, y, i = val[3]
    rgb = np.asarray(Image.open(val.paths[3]))[0, 0] / 255.0
    ref = torch.tensor([(rgb[c] - MEAN[c]) / STD[c] for c in range(3)], dtype=torch.float32)
    assert i == 3 and y == _label_of(val.paths[3], classes)
    torch.testing.assert_close(x, ref[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-5)
    # a test/ folder, when present, is the test split
    _tree(tmp_path / 'test', dict.fromkeys(WNIDS, 1), start=100)
    test = build_dataset('folder', 'test', str(tmp_path), img_size=16)
    assert len(test) == 3 and all(p.startswith(str(tmp_path / 'test')) for p in test.paths)


def test_folder_single_tree_seeded_stratified_split(tmp_path):
    counts = {'n01': 10, 'n02': 7, 'n03': 13}
    _tree(tmp_path, counts)
    # by hand, per class: test round(0.2 n) = 2, 1, 3; val round(0.1 n) = 1, 1, 1; train the rest = 7, 5, 9
    expected = {'train': [7, 5, 9], 'val': [1, 1, 1], 'test': [2, 1, 3]}
    splits = {s: build_dataset('folder', s, str(tmp_path), img_size=8) for s in data.SPLITS}
    for s, ds in splits.items():
        assert ds.classes == ['n01', 'n02', 'n03']
        assert ds.targets == [_label_of(p, ds.classes) for p in ds.paths]
        assert np.bincount(ds.targets, minlength=3).tolist() == expected[s], s
    paths = [set(ds.paths) for ds in splits.values()]
    assert sum(map(len, paths)) == 30 and set.union(*paths) == {str(p) for p in tmp_path.rglob('*.png')}
    again = build_dataset('folder', 'val', str(tmp_path), img_size=8)
    assert again.paths == splits['val'].paths  # same seed, same split
    other = {s: build_dataset('folder', s, str(tmp_path), img_size=8, seed=1).paths for s in ('val', 'test')}
    assert other != {s: splits[s].paths for s in ('val', 'test')}


def test_folder_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match='--data-dir'):
        build_dataset('folder', 'train')
    with pytest.raises(DataError, match='does not exist'):
        build_dataset('folder', 'train', str(tmp_path / 'nope'))
    with pytest.raises(DataError, match='takes its classes from the folder'):
        build_dataset('folder', 'train', str(tmp_path), num_classes=3)
    # only loose files, no class folders
    _png(tmp_path / 'loose.png', (1, 2, 3))
    with pytest.raises(DataError, match='no class folders'):
        folder_classes(str(tmp_path))
    # a class folder without images (a text file does not count)
    (tmp_path / 'n02').mkdir()
    (tmp_path / 'n02' / 'notes.txt').write_text('x')
    _tree(tmp_path, {'n01': 8})
    with pytest.raises(DataError, match=r"1 class folder\(s\) .* hold no image \(n02\)"):
        build_dataset('folder', 'train', str(tmp_path))
    # too few images for the val split of a single tree: 2 classes x 4 images -> round(0.4) = 0 in val
    few = tmp_path / 'few'
    _tree(few, {'a': 4, 'b': 4})
    with pytest.raises(DataError, match='val split empty'):
        build_dataset('folder', 'val', str(few))
    # train/ without val/, val/ without train/
    split = tmp_path / 'split'
    _tree(split / 'train', {'n01': 2, 'n02': 2})
    with pytest.raises(DataError, match='has train/ but no val/'):
        build_dataset('folder', 'train', str(split))
    lone = tmp_path / 'lone'
    _tree(lone / 'val', {'n01': 2})
    with pytest.raises(DataError, match='has val/ but no train/'):
        folder_classes(str(lone))
    # different class lists in train/ and val/
    _tree(split / 'val', {'n01': 1, 'n03': 1})
    with pytest.raises(DataError, match=r'only in train/: n02; only in val/: n03'):
        build_dataset('folder', 'val', str(split))


# ---------------------------------------------------------------- superclasses

def _csv_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(line for line in f if not line.startswith('#')))


@pytest.mark.parametrize('mapping', data.SUPERCLASS_MAPPINGS)
def test_shipped_superclass_rows_agree_with_timm(mapping):
    """Every row's index and name against timm's ImageNet-1k class list (an independent source)."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    rows = _csv_rows(os.path.join(ROOT, 'data', 'superclasses', f'{mapping}.csv'))
    for r in rows:
        assert info.index_to_label_name(int(r['index'])) == r['wnid'], r
        assert info.index_to_description(int(r['index'])) == r['name'], r
    wnids = [r['wnid'] for r in rows]
    assert len(wnids) == len(set(wnids))  # each class in one superclass
    if mapping == 'imagenet':
        assert sorted(wnids) == info.label_names()  # SeaM's superclasses partition the 1,000 classes
    assert data.load_superclasses(mapping) == {r['superclass']: [x['wnid'] for x in rows
                                                                  if x['superclass'] == r['superclass']]
                                               for r in rows}


def test_shipped_superclasses_hand_checked_rows():
    seam = data.load_superclasses('imagenet')
    idx = data.imagenet_class_index()
    assert len(seam) == 67 and len(idx) == 1000
    names = list(seam)  # SeaM's imagenet_superclass_idx2sc.csv order
    assert names[:3] == ['fish', 'shark', 'bird'] and names[20] == 'dog' and names[35] == 'primate'
    assert names[66] == 'fungus'
    assert idx['n02165456'] == 301 and 'n02165456' in seam['bug']  # ladybug
    assert idx['n02085620'] == 151 and 'n02085620' in seam['dog']  # Chihuahua
    assert sorted(idx[w] for w in seam['cat']) == [281, 283, 284, 285]  # tabby, Persian, Siamese, Egyptian
    assert sorted(idx[w] for w in seam['dog']) == list(range(151, 269)) + [275]  # + African hunting dog
    assert sorted(idx[w] for w in seam['turtle']) == [33, 34, 35, 36, 37]
    restricted = data.load_superclasses('restricted_imagenet')
    assert list(restricted) == ['dog', 'cat', 'frog', 'turtle', 'bird', 'primate', 'fish', 'crab', 'insect']
    ranges = dict(dog=(151, 268), cat=(281, 285), frog=(30, 32), turtle=(33, 37), bird=(80, 100),
                  primate=(365, 382), fish=(389, 397), crab=(118, 121), insect=(300, 319))
    all_wnids = sorted(idx, key=idx.get)
    for name, (lo, hi) in ranges.items():
        assert superclass_classes(name, all_wnids, 'restricted_imagenet') == list(range(lo, hi + 1)), name


def test_superclass_classes_on_a_folder_with_some_imagenet_classes(tmp_path):
    # tench (fish), Chihuahua + Japanese spaniel (dog), tabby (cat), ladybug (bug)
    _tree(tmp_path, dict.fromkeys(['n02165456', 'n02085782', 'n01440764', 'n02123045', 'n02085620'], 1))
    classes = folder_classes(str(tmp_path))
    assert classes == ['n01440764', 'n02085620', 'n02085782', 'n02123045', 'n02165456']
    assert superclass_classes('dog', classes, allow_partial=True) == [1, 2]
    assert superclass_classes(20, classes, allow_partial=True) == [1, 2]  # SeaM's superclass index of 'dog'
    assert superclass_classes('bug', classes, allow_partial=True) == [4]
    with pytest.raises(DataError, match=r"'dog': 117 of its 119 classes are not in this dataset \(n02085936"):
        superclass_classes('dog', classes)
    with pytest.raises(DataError, match="'shark': none of its 4 classes"):
        superclass_classes('shark', classes, allow_partial=True)
    with pytest.raises(DataError, match=r"unknown superclass 'dogs'; known: fish, shark, .*wild dog, .*fungus"):
        superclass_classes('dogs', classes)
    with pytest.raises(DataError, match=r'has 67 superclasses \(0\.\.66\)'):
        superclass_classes(67, classes)


def test_user_superclass_csv(tmp_path):
    path = tmp_path / 'mine.csv'
    path.write_text('# my groups\nsuperclass,wnid\npets,n02123045\npets,n02085620\nfishy,n01440764\n')
    assert data.load_superclasses(str(path)) == {'pets': ['n02123045', 'n02085620'], 'fishy': ['n01440764']}
    classes = ['n01440764', 'n02085620', 'n02085782', 'n02123045']
    assert superclass_classes('pets', classes, str(path)) == [1, 3]
    path.write_text('group,wnid\npets,n02123045\n')
    with pytest.raises(DataError, match='lacks superclass'):
        data.load_superclasses(str(path))
    path.write_text('superclass,wnid\npets,n02123045\n# x\npets,n02123045\n')
    with pytest.raises(DataError, match="line 4: n02123045 listed twice in superclass 'pets'"):
        data.load_superclasses(str(path))
    path.write_text('superclass,wnid\npets,\n')
    with pytest.raises(DataError, match='line 2: empty'):
        data.load_superclasses(str(path))
    with pytest.raises(DataError, match="cannot read superclass file .*imagenet, restricted_imagenet"):
        data.load_superclasses(str(tmp_path / 'missing.csv'))


# ---------------------------------------------------------------- disjoint source and target images

def test_check_disjoint_finds_a_copied_image(tmp_path):
    src, tgt = tmp_path / 'src', tmp_path / 'tgt'
    k = _tree(src / 'train', {'n01': 3, 'n02': 3})
    k = _tree(src / 'val', {'n01': 1, 'n02': 1}, start=k)
    _tree(tgt, {'a': 6, 'b': 6}, start=k)
    source = [build_dataset('folder', s, str(src), img_size=8) for s in ('train', 'val')]
    target = [build_dataset('folder', s, str(tgt), img_size=8) for s in data.SPLITS]
    assert check_disjoint(source, target) == 0
    assert check_disjoint(str(src), str(tgt)) == 0
    copied = tgt / 'b' / 'renamed.png'
    shutil.copyfile(src / 'train' / 'n02' / 'img_005.png', copied)  # same bytes, another name and class
    with pytest.raises(DataError, match=r'1 target image\(s\) are also source images .*img_005\.png = .*renamed\.png'):
        check_disjoint(str(src), str(tgt))
    assert check_disjoint(str(src), str(tgt), strict=False) == 1
    target = [build_dataset('folder', s, str(tgt), img_size=8) for s in data.SPLITS]
    assert data.find_overlap(source, target) == [(str(src / 'train' / 'n02' / 'img_005.png'), str(copied))]
    task = data.TaskSubset(source[0], [0, 4])  # a SeaM task subset digests its own items only
    assert [p for _, p in data.image_digests(task)] == [source[0].paths[0], source[0].paths[4]]
    assert data.image_digests(task)[1][0] == hashlib.sha1(copied.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match='cannot digest'):
        data.image_digests(build_dataset('synthetic', 'val', length=4))


# ---------------------------------------------------------------- digits source / target parts

# sha1 of the int64 index arrays of today's digits splits (seed 0), recorded before part= existed
DIGITS_SPLIT_SHA1 = {'train': 'd280c2ebcdad551e805752d7b317eec70b8d6504',
                     'val': '82daa35eed748260238308cb054158a9e160359b',
                     'test': 'bee2bad5bd858247628c90ec96bbb02de0471e9a'}


def _sha1_indices(ds):
    return hashlib.sha1(np.asarray(ds.indices, np.int64).tobytes()).hexdigest()


def test_digits_default_splits_unchanged():
    for split, size in (('train', 1259), ('val', 179), ('test', 359)):
        ds = build_dataset('digits', split, img_size=8)
        assert len(ds) == size and _sha1_indices(ds) == DIGITS_SPLIT_SHA1[split], split


def test_digits_source_target_parts_disjoint_and_stratified():
    with np.load(DIGITS) as f:
        images, labels = f['images'], f['labels']
    parts = {(p, s): build_dataset('digits', s, img_size=8, part=p) for p in data.PARTS for s in data.SPLITS}
    sizes = data.dataset_info('digits')['part_splits']
    idx = {k: ds.indices for k, ds in parts.items()}
    assert {k: len(v) for k, v in idx.items()} == {(p, s): sizes[p][s] for p in data.PARTS for s in data.SPLITS}
    every = [i for v in idx.values() for i in v]
    assert sorted(every) == list(range(1797))  # the six splits partition the file
    per_class = np.bincount(labels, minlength=10)
    for p in data.PARTS:
        half = [i for s in data.SPLITS for i in idx[(p, s)]]
        assert np.all(np.abs(np.bincount(labels[half], minlength=10) - per_class / 2) <= 0.5 + 1e-9), p
        for (pp, s), ds in parts.items():  # items trace back to the file
            if pp == p and len(ds):
                x, y = ds[0]
                assert y == labels[ds.indices[0]] and x.shape == (3, 8, 8)
    source = [parts[('source', s)] for s in data.SPLITS]
    target = [parts[('target', s)] for s in data.SPLITS]
    assert check_disjoint(source, target) == 0  # disjoint by content, not only by index
    # the digest is of the raw 8x8 image: the same images at another size match, one by one
    assert data.find_overlap(build_dataset('digits', 'val', img_size=32, part='target'), target[1]) == \
        [(f'digits.npz image {j}', f'digits.npz image {j}') for j in idx[('target', 'val')]]
    assert data.image_digests(target[2])[0][0] == hashlib.sha1(
        b'|u1(8, 8)' + np.ascontiguousarray(images[idx[('target', 'test')][0]]).tobytes()).hexdigest()
    assert build_dataset('digits', 'train', img_size=8, part='source', seed=1).indices != idx[('source', 'train')]
    with pytest.raises(DataError, match='only digits has parts'):
        build_dataset('synthetic', 'train', part='source')
    with pytest.raises(DataError, match="part='half'"):
        build_dataset('digits', 'train', part='half')
