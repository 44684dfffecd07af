"""reengineer_seam.py on ImageFolder trees: binary, named superclass and defect-inheritance tasks end to end, the
source/target disjointness check, one-line refusals, and eval.py on a torchvision ResNet-18 module.

The trees are written here: a few 16-pixel PNGs per class (a class colour plus noise, every file different), class
folders named by ImageNet wnids so a superclass CSV (also written here) maps them. Expectations are by hand: the
sorted wnids give the labels, the CSV's rows give the superclass members, the file bytes give the overlap.
"""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1')
# created in this unsorted order; labels are positions in the sorted names: tench 0, brambling 1, goldfinch 2,
# Chihuahua 3
SOURCE_WNIDS = ['n02085620', 'n01530575', 'n01440764', 'n01531178']
TARGET_CLASSES = ['oak', 'elm', 'ash']  # a fine-tuning task of its own (CUB, Flowers, ... are folders like this)
PER_CLASS = 10  # one tree, split by data.build_dataset: per class 2 test, 1 val, 7 train
FAST = ['--img-size', '16', '--batch-size', '8', '--latency-iters', '1', '--threads', '1']
SUPERCLASS_ROWS = [('birds', 'n01531178'), ('birds', 'n01530575'),
                   ('pets', 'n02085620'), ('pets', 'n01440764'), ('pets', 'n09999999'),  # n09999999: not in the tree
                   ('lonely', 'n02085620')]


def _tree(root, classes, seed):
    """root/<class>/img_k.png: a 16x16 image of the class colour plus noise; every file different."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        colour = np.array([(97 * c) % 256, (53 * c + 80) % 256, (31 * c + 160) % 256])
        for k in range(PER_CLASS):
            img = np.clip(colour + rng.integers(-40, 41, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f'img_{k}.png')
    return root


def _run(*argv, script='reengineer_seam.py', timeout=600):
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _one_line_error(r, needle):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error:') and needle in lines[0], r.stderr


def _digests(root):
    return {hashlib.sha1(p.read_bytes()).hexdigest() for p in Path(root).rglob('*.png')}


@pytest.fixture(scope='module')
def trees(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('seam_folder')
    src, tgt = _tree(tmp / 'source', SOURCE_WNIDS, 0), _tree(tmp / 'target', TARGET_CLASSES, 1)
    with open(tmp / 'superclasses.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['superclass', 'wnid'])
        w.writerows(SUPERCLASS_ROWS)
    return tmp, src, tgt


@pytest.fixture(scope='module')
def binary_run(trees):
    """A torchvision ResNet-18 base trained on the source tree, re-engineered for class 1 (brambling) vs the rest."""
    tmp, src, _ = trees
    out = tmp / 'runs' / 'binary'
    r = _run('--model', 'resnet18', '--dataset', 'folder', '--data-dir', src, '--train-base', '--base-epochs', '2',
             '--task', 'binary', '--target-class', '1', '--epochs', '2', '--mask-granularity', 'weight+channel',
             '--output', out, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / '001'


def test_folder_binary_task_end_to_end(binary_run):
    rep = json.loads((binary_run / 'report.json').read_text())
    assert (rep['dataset'], rep['task'], rep['classes']) == ('folder', 'binary', [1])
    assert rep['extracted_max_abs_diff'] < 1e-4
    assert rep['params_extracted'] <= rep['params_original'] + 4 * 2 + 2  # at most + the module head Linear(4, 2)
    base = torch.load(binary_run / 'base.pt', weights_only=True)
    assert base['class_names'] == sorted(SOURCE_WNIDS) and base['model']['kwargs']['num_classes'] == 4
    assert base['part'] is None
    mod = torch.load(binary_run / 'module.pt', weights_only=True)
    assert mod['model']['family'] == 'torchvision' and mod['labels'] == ['target', 'other']


@torch.no_grad()
def test_eval_scores_a_torchvision_resnet18_module_like_a_direct_forward(binary_run, trees, tmp_path):
    """eval.py rebuilds the extracted torchvision module from its config and scores it on the task's images; the
    reference is a plain loop over the same task subset (data.task_indices, as both scripts draw it)."""
    _, src, _ = trees
    out = tmp_path / 'eval.json'
    r = _run(binary_run / 'module.pt', '--dataset', 'folder', '--data-dir', src, '--json', out, '--threads', '1',
             '--latency-iters', '0', script='eval.py')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())['results'][0]
    mod = torch.load(binary_run / 'module.pt', weights_only=True)
    net = build_model(mod['model']).eval()
    net.load_state_dict(mod['state_dict'])
    ds = data.build_dataset('folder', 'test', str(src), img_size=16)
    pos = [i for i, t in enumerate(ds.targets) if t == 1]
    assert len(pos) == 2 and len(ds) == 8  # 2 test images per class
    idx, _ = data.task_indices(ds.targets, 'binary', [1], 4, 0)
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor([0 if ds.targets[i] == 1 else 1 for i in idx])
    want = 100 * (net(x).argmax(1) == y).double().mean().item()
    assert res['samples'] == 4 and res['top1'] == pytest.approx(want)
    rep = json.loads((binary_run / 'report.json').read_text())
    assert res['top1'] == pytest.approx(100 * rep['extracted_acc_test'])  # the script's own number agrees


def test_named_superclass_from_a_csv(binary_run, trees):
    tmp, src, _ = trees
    out = tmp / 'runs' / 'superclass'
    r = _run('--model', 'resnet18', '--dataset', 'folder', '--data-dir', src, '--pretrained',
             binary_run / 'base.pt', '--task', 'multiclass', '--superclass', 'birds', '--superclass-csv',
             tmp / 'superclasses.csv', '--epochs', '1', '--output', out, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / '001' / 'report.json').read_text())
    assert rep['classes'] == [1, 2]  # brambling n01530575 = 1, goldfinch n01531178 = 2 (sorted wnids)
    assert rep['superclass'] == dict(name='birds', mapping=str(tmp / 'superclasses.csv'),
                                     wnids=['n01530575', 'n01531178'], missing=[])
    mod = torch.load(out / '001' / 'module.pt', weights_only=True)
    assert mod['labels'] == ['n01530575', 'n01531178']


def test_defect_with_a_target_folder_and_disjoint_images(binary_run, trees):
    tmp, src, tgt = trees
    out = tmp / 'runs' / 'defect'
    r = _run('--model', 'resnet18', '--dataset', 'folder', '--data-dir', src, '--pretrained', binary_run / 'base.pt',
             '--task', 'defect', '--target-dir', tgt, '--epochs', '1', '--ft-epochs', '1', '--pgd-samples', '4',
             '--pgd-eps', '0.1', '0.5', '--output', out, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / '001' / 'report.json').read_text())
    assert rep['classes'] == [0, 1, 2] and not _digests(src) & _digests(tgt)  # the trees really share no file
    d = rep['disjoint']
    assert d['shared_images'] == 0 and d['target'] == f'folder {tgt}' and d['source'] == f'folder {src}'
    assert d['source_items'] == {'train': 28, 'val': 4, 'test': 8} and d['target_items'] == {'train': 21, 'val': 3,
                                                                                          'test': 6}
    for name in ('standard', 'seam'):
        assert set(rep[name]['by_eps']) == {'0.1', '0.5'}
        for res in rep[name]['by_eps'].values():
            assert res['samples'] == 6 and 0 <= res['defect_inheritance_rate'] <= 1  # one batch of 8 > 4 samples
    assert 0 < rep['weight_retention'] <= 1


def test_target_folder_sharing_an_image_is_refused(trees, tmp_path):
    _, src, tgt = trees
    shared = tmp_path / 'target'
    shutil.copytree(tgt, shared)
    shutil.copy(src / 'n01440764' / 'img_3.png', shared / 'elm' / 'copy.png')  # same bytes, another name
    out = tmp_path / 'runs'
    r = _run('--model', 'resnet20', '--dataset', 'folder', '--data-dir', src, '--train-base', '--task', 'defect',
             '--target-dir', shared, '--output', out, *FAST)
    _one_line_error(r, '1 target')
    assert 'copy.png' in r.stderr and 'img_3.png' in r.stderr
    assert not out.exists()


def test_bad_inputs_one_line_exit_2_and_no_folder(trees, tmp_path):
    tmp, src, _ = trees
    csv_path = tmp / 'superclasses.csv'
    folder = ['--model', 'resnet20', '--dataset', 'folder', '--data-dir', src, '--train-base', '--task', 'multiclass']
    cases = [
        (folder + ['--superclass', 'reptiles', '--superclass-csv', csv_path], "unknown superclass 'reptiles'"),
        (folder + ['--superclass', 'pets', '--superclass-csv', csv_path], '--superclass-partial'),
        (folder + ['--superclass', 'lonely', '--superclass-csv', csv_path], 'needs >= 2'),
        (folder + ['--superclass', 'bird'], '57 of its 59 classes have no class folder'),  # SeaM's 'bird': 2 here
        (['--train-base', '--task', 'multiclass', '--superclass', 'bird'], 'cifar100'),  # digits
        (['--model', 'resnet20', '--dataset', 'folder', '--data-dir', src, '--train-base', '--task', 'defect',
          '--target-dir', tmp / 'nowhere'], 'nowhere'),
        (['--dataset', 'folder', '--data-dir', src, '--train-base', '--task', 'defect'], '--target-dir'),
    ]
    outs = [tmp_path / f'out{i}' for i in range(len(cases))]
    procs = [subprocess.Popen([sys.executable, 'reengineer_seam.py', *map(str, argv), '--output', str(out), *FAST],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for (argv, _), out in zip(cases, outs)]
    for (argv, needle), proc, out in zip(cases, procs, outs):
        _, err = proc.communicate(timeout=300)
        _one_line_error(subprocess.CompletedProcess(argv, proc.returncode, '', err), needle)
        assert not out.exists(), argv


def test_partial_imagenet_folder_superclass_by_wnid_and_eval(trees, tmp_path):
    """--dataset imagenet on a folder holding 4 of the 1,000 classes: a 1000-class base, labels by wnid (tench 0,
    brambling 10, goldfinch 11, Chihuahua 151: their ImageNet-1k indices). --superclass-partial: 'pets' lists 3
    wnids, 2 of them here; eval.py scores the module on the same images (20 = 2 classes x 10 val images: with
    folder-position labels, 151 would have none)."""
    tmp, _, _ = trees
    inet = tmp_path / 'imagenet'
    _tree(inet / 'train', SOURCE_WNIDS, 3)
    _tree(inet / 'val', SOURCE_WNIDS, 4)
    out = tmp_path / 'runs'
    r = _run('--model', 'resnet20', '--dataset', 'imagenet', '--data-dir', inet, '--train-base', '--base-epochs', '1',
             '--task', 'multiclass', '--superclass', 'pets', '--superclass-csv', tmp / 'superclasses.csv',
             '--superclass-partial', '--epochs', '1', '--output', out, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / '001' / 'report.json').read_text())
    assert rep['classes'] == [0, 151] and rep['superclass']['missing'] == ['n09999999']
    assert rep['superclass']['wnids'] == ['n01440764', 'n02085620'] and 'using the 2 of its 3 classes' in r.stdout
    assert torch.load(out / '001' / 'base.pt', weights_only=True)['model']['kwargs']['num_classes'] == 1000
    res_path = tmp_path / 'eval.json'
    r = _run(out / '001' / 'module.pt', '--dataset', 'imagenet', '--data-dir', inet, '--json', res_path,
             '--threads', '1', '--latency-iters', '0', script='eval.py')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(res_path.read_text())['results'][0]
    assert res['samples'] == 2 * PER_CLASS and res['top1'] == pytest.approx(100 * rep['extracted_acc_test'])
    # a class without a folder here is named as such
    base = out / '001' / 'base.pt'
    r = _run('--model', 'resnet20', '--dataset', 'imagenet', '--data-dir', inet, '--pretrained', base, '--task',
             'binary', '--target-class', '5', '--output', tmp_path / 'bad', *FAST)
    _one_line_error(r, 'no class folder')
    assert not (tmp_path / 'bad').exists()
