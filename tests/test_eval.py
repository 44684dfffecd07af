"""eval.py: accuracy == a direct forward pass, closed-form FLOPs, ReaL in 1 and 2 processes, refused checkpoints."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import eval as ev
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')
FAST = ['--threads', '1', '--latency-iters', '0']


def run_cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def digits_ckpt(tmp_path_factory):
    """A ViTAE-Tiny Monarch checkpoint trained for 3 steps on digits by the real training script."""
    out = tmp_path_factory.mktemp('train')
    r = run_cli('train_vitae_monarch.py', '--epochs', '1', '--output', str(out), '--img-size', '32',
                '--batch-size', '16', '--limit-train-batches', '3', '--limit-eval-batches', '1',
                '--eval-batch-size', '64', '--drop-path', '0', '--performer-drop', '0', '--progress', '0',
                '--no-test', '--warmup-epochs', '0.5', '--threads', '1')
    assert r.returncode == 0, r.stderr[-2000:]
    return common.latest_checkpoint(str(out))


@torch.no_grad()
def direct_accuracy(ck, state):
    """Top-1 / top-5 % by a plain loop over the digits test set (no loader, no sampler, no eval.py code)."""
    model = build_model(ck['model'])
    model.load_state_dict(state)
    model.eval()
    ds = data.build_dataset('digits', 'test', img_size=32, seed=ck['args']['data_seed'])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    logits = torch.cat([model(x[i:i + 128]) for i in range(0, len(x), 128)])
    top5 = logits.topk(5, 1).indices
    return 100 * (top5[:, 0] == y).double().mean().item(), 100 * (top5 == y[:, None]).any(1).double().mean().item()


def test_accuracy_equals_direct_forward(digits_ckpt, tmp_path, capsys):
    ck = torch.load(digits_ckpt, weights_only=True)
    assert ck['kind'] == 'vitae_train' and ck['ema'] is not None
    for flags, state in (([], ck['ema']), (['--no-ema'], ck['state_dict'])):
        out = tmp_path / 'r.json'
        ev.main([digits_ckpt, '--dataset', 'digits', '--json', str(out), '--batch-size', '100', *FAST, *flags])
        r = json.loads(out.read_text())['results'][0]
        top1, top5 = direct_accuracy(ck, state)
        assert r['samples'] == 359
        assert r['top1'] == pytest.approx(top1, abs=1e-9) and r['top5'] == pytest.approx(top5, abs=1e-9)
        assert r['weights'] == ('model' if flags else 'ema')
    printed = capsys.readouterr().out
    assert 'top-1 %' in printed and 'FLOPs/image' in printed


def test_two_checkpoints_side_by_side_and_flops(digits_ckpt, tmp_path, capsys):
    # a dense ViTAE checkpoint written directly (a valid 'vitae_train' file), compared against the trained Monarch one
    ck = torch.load(digits_ckpt, weights_only=True)
    dense_cfg = {**ck['model'], 'kwargs': {**ck['model']['kwargs'], 'mlp': 'dense'}}
    dense = build_model(dense_cfg)
    dense_path = str(tmp_path / 'dense.pt')
    common.save_checkpoint({'project': common.PROJECT, 'kind': 'vitae_train', 'model': dense_cfg,
                            'state_dict': dense.state_dict(), 'args': ck['args']}, dense_path)
    out = tmp_path / 'r.json'
    ev.main([dense_path, digits_ckpt, '--dataset', 'digits', '--json', str(out), '--per-class', '--threads', '1',
             '--latency-iters', '1', '--latency-batch', '4'])
    d, m = json.loads(out.read_text())['results']
    # FLOPs differ exactly by the MLP layers: 7 normal cells (dim 256, mlp_ratio 2), each fc1 256 -> 512 and
    # fc2 512 -> 256, on the 2x2 token grid (4 tokens at 32 px). Dense: 2 * 256*512 multiply-adds per layer and
    # token. Monarch, nblocks 4 (fly's shapes): fc1 factors (4, 64, 64) + (4, 128, 64) = 49,152 weights, fc2
    # (4, 64, 128) + (4, 64, 64) = 49,152. Biases, attention, convolutions are identical in both models.
    kw = ck['model']['kwargs']
    assert kw['mlp'] == 'monarch' and kw.get('nblocks', 4) == 4 and ck['model']['name'] == 'vitae_basic_tiny'
    n_cells, tokens, dense_w, monarch_w = 7, 4, 256 * 512, 16384 + 32768
    assert d['flops_per_image'] - m['flops_per_image'] == n_cells * tokens * 2 * (2 * dense_w - 2 * monarch_w)
    assert d['params'] - m['params'] == n_cells * 2 * (dense_w - monarch_w) == 1146880
    assert len(d['per_class']) == 10 and d['latency_b1_ms'] > 0 and d['latency_b4_ms'] > 0
    table = capsys.readouterr().out
    assert 'x)' in table and 'vitae_basic_tiny/dense' in table and 'vitae_basic_tiny/monarch' in table
    assert d['eval_task'] == m['eval_task'] == 'digits test: all 10 classes' and 'vs_first' not in d
    assert d['top1'] > 0 and m['vs_first']['top1'] == pytest.approx(m['top1'] / d['top1'])
    assert m['vs_first']['params'] == pytest.approx(m['params'] / d['params'])


def test_side_by_side_ratios_only_on_the_same_task():
    """A SeaM module's binary accuracy over its base model's 10-class accuracy is no ratio; its params are."""
    args = ev.get_args(['x.pt', '--dataset', 'cifar10', '--latency-iters', '0'])
    base = dict(task=None, classes=None, seed=0, data_seed=0, n_classes=10)
    module = dict(task='binary', classes=[3], seed=0, data_seed=0, n_classes=2)
    other_seed = dict(module, seed=1)
    rows = []
    for e, top1, params in ((base, 90.0, 1000), (module, 99.0, 250), (dict(base), 45.0, 500),
                            (other_seed, 97.0, 250)):
        label, key = ev.eval_task(e, args)
        rows.append(dict(checkpoint=f'c{len(rows)}.pt', kind='k', model='m', weights='model', eval_task=label,
                         eval_task_key=list(key), samples=10, top1=top1, top5=None, real=None, params=params,
                         flops_per_image=params))
    assert rows[0]['eval_task'] == 'cifar10 test: all 10 classes'
    assert rows[1]['eval_task'] == 'cifar10 test: binary, class 3 vs seeded negatives (seed 0)'
    lines = {ln.split('  ')[0]: ln for ln in ev.table(rows, args).splitlines()}
    cells = [c.strip() for c in lines['top-1 %'].split('  ') if c.strip()][1:]
    assert cells == ['90.00', '99.00, ratio n/a (different tasks)', '45.00 (0.50x)',
                     '97.00, ratio n/a (different tasks)']
    assert [c.strip() for c in lines['params'].split('  ') if c.strip()][2:] == ['250 (0.25x)', '500 (0.50x)',
                                                                                 '250 (0.25x)']
    assert ev.vs_first(rows[3], rows[1], 'top1') == ev.NOT_COMPARABLE  # other seeded negatives: other images
    assert ev.vs_first(rows[1], rows[0], 'top1') == ev.NOT_COMPARABLE
    assert ev.vs_first(rows[2], rows[0], 'top1') == 0.5 and ev.vs_first(rows[1], rows[0], 'params') == 0.25


def _imagenet_folder(root):
    """val/ with 2 class folders whose files are NOT in sorted-name order (folder order != ReaL order)."""
    rng = np.random.default_rng(0)
    layout = {'n00': [5, 2, 7], 'n01': [1, 6, 3, 4]}  # dataset order 2,5,7,1,3,4,6; sorted-name order 1..7
    for cls, nums in layout.items():
        os.makedirs(root / 'val' / cls)
        for n in nums:
            img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / 'val' / cls / f'ILSVRC2012_val_{n:08d}.png')


def test_real_accuracy_one_and_two_processes(tmp_path):
    _imagenet_folder(tmp_path)
    cfg = {'family': 'cifar', 'name': 'resnet20', 'kwargs': {'num_classes': 1000}}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = str(tmp_path / 'in1k.pt')
    common.save_checkpoint({'project': common.PROJECT, 'kind': 'cifar_base', 'model': cfg,
                            'state_dict': model.state_dict(), 'args': {'img_size': 32}}, ckpt)
    # predictions by file name, from a direct forward over the dataset items
    ds = data.build_dataset('imagenet', 'val', str(tmp_path), img_size=32)
    with torch.no_grad():
        pred = model(torch.stack([ds[i][0] for i in range(len(ds))])).argmax(1).tolist()
    by_name = dict(zip(ds.filenames, pred))
    names = sorted(by_name)  # ReaL order: ILSVRC2012_val_00000001 first
    p = [by_name[n] for n in names]
    other = [(q + 1) % 1000 for q in p]
    # sorted position: 1 right, 2 right (among 2), 3 wrong, 4 empty (skipped), 5 right, 6 wrong, 7 empty
    real = [[p[0]], [other[1], p[1]], [other[2]], [], [p[4]], [other[5], (p[5] + 2) % 1000], []]
    (tmp_path / 'real.json').write_text(json.dumps(real))
    expected = 100 * 3 / 5
    for nproc in ('1', '2'):
        out = tmp_path / f'r{nproc}.json'
        r = run_cli('eval.py', ckpt, '--dataset', 'imagenet', '--data-dir', str(tmp_path), '--split', 'val',
                    '--real-json', str(tmp_path / 'real.json'), '--nproc', nproc, '--batch-size', '2',
                    '--json', str(out), *FAST)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(out.read_text())['results'][0]
        assert res['real'] == pytest.approx(expected) and res['real_samples'] == 5 and res['samples'] == 7
        assert res['top1'] == pytest.approx(100 * sum(q == t for q, t in zip(pred, ds.targets)) / 7)


class _Bomb:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))  # unpickling would create the marker file


def test_refuses_non_project_and_tampered_files(tmp_path):
    junk = tmp_path / 'junk.pt'
    junk.write_text('not a checkpoint')
    foreign = tmp_path / 'foreign.pt'
    torch.save({'weights': torch.zeros(3)}, foreign)
    marker = tmp_path / 'PWNED'
    tampered = tmp_path / 'tampered.pt'
    torch.save({'project': common.PROJECT, 'kind': 'cifar_base', 'args': {}, 'state_dict': {},
                'model': {'family': 'cifar', 'name': 'resnet20', 'kwargs': {}}, 'x': _Bomb(str(marker))}, tampered)
    # the bomb is real: plain unpickling runs it (creates its marker)
    pickle.loads(pickle.dumps(_Bomb(str(tmp_path / 'PROBE')))).close()
    assert (tmp_path / 'PROBE').exists()
    for path, words in ((junk, 'not a PyTorch checkpoint'), (foreign, 'not a checkpoint of this project'),
                        (tampered, 'refused')):
        r = run_cli('eval.py', str(path), '--dataset', 'digits', *FAST)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0], r.stderr
    assert not marker.exists()


def test_class_count_mismatch_and_missing_folder(digits_ckpt, tmp_path):
    r = run_cli('eval.py', digits_ckpt, '--dataset', 'cifar100', *FAST)
    assert r.returncode == 2 and 'outputs 10 classes but cifar100 has 100' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli('eval.py', digits_ckpt, '--dataset', 'cifar10', '--data-dir', str(tmp_path / 'nope'), *FAST)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'cifar-10-batches-py' in r.stderr
