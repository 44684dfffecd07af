"""The GPU acceptance command (tests/gpu_acceptance.sh) on this CPU machine: one line and exit code 2 up front; with
--no-preflight each step fails on its own; and the checks refuse the vacuous results a machine without a GPU
produces (CUDA tests all skipped, no CUDA timings, a gloo eval, loss curves that disagree or do not learn).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_acceptance as acc

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is visible: the command would really run')


@no_gpu
def test_cpu_only_machine_gets_one_line_and_exit_2(tmp_path):
    out = tmp_path / 'acc'
    r = subprocess.run(['bash', 'tests/gpu_acceptance.sh', str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ''
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'no CUDA GPU visible' in lines[0], r.stderr
    assert not out.exists()


@no_gpu
def test_steps_fail_on_their_own_without_a_gpu(tmp_path):
    r = subprocess.run([sys.executable, 'tests/gpu_acceptance.py', str(tmp_path), '--no-preflight', '--steps',
                        'train_kernel,eval_cuda,bench'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert not summary['passed'] and [s['step'] for s in summary['steps']] == ['train_kernel', 'eval_cuda', 'bench']
    for s in summary['steps']:
        assert s['status'] == 'FAIL' and 'exit code 2: error: --device cuda but no CUDA' in s['detail'], s
    assert 'step' in r.stdout.splitlines()[-5] and r.stdout.splitlines()[-1].startswith('total')


def _junit(path, tests, skipped=0, failures=0):
    path.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" skipped="{skipped}" failures="{failures}" '
                    'errors="0"></testsuite></testsuites>')


def test_pytest_check_refuses_skips_and_empty_runs(tmp_path):
    with pytest.raises(acc.StepFailed, match='missing'):
        acc.check_pytest(tmp_path)
    for kw, match in (({'tests': 14, 'skipped': 14}, '14 of 14 CUDA tests skipped'),
                      ({'tests': 0}, 'only 0 CUDA tests ran'), ({'tests': 14, 'failures': 1}, '1 failed')):
        _junit(tmp_path / 'pytest_cuda.xml', **kw)
        with pytest.raises(acc.StepFailed, match=match):
            acc.check_pytest(tmp_path)
    _junit(tmp_path / 'pytest_cuda.xml', 14)
    assert acc.check_pytest(tmp_path) == '14 CUDA tests passed, none skipped'


def _bench_rows(device):
    rows = []
    for case in acc.BENCH_CASES:
        t, i, o, nb = map(int, case.split('x'))
        for mode in ('fwd', 'fwd+bwd'):
            for method, ms in (('dense', 2.0), ('monarch_kernel', 1.0)):
                rows.append(dict(device=device, dtype='bfloat16', tokens=t, fin=i, fout=o, nblocks=nb, mode=mode,
                                 method=method, ms=ms, speedup=2.0 / ms))
    return rows


def test_bench_check_needs_every_cuda_kernel_timing(tmp_path):
    (tmp_path / 'bench.json').write_text(json.dumps({'results': _bench_rows('cpu')}))
    with pytest.raises(acc.StepFailed, match='no CUDA bfloat16 monarch_kernel timing for 16384x1024x1024x4 fwd'):
        acc.check_bench(tmp_path)
    rows = _bench_rows('cuda')
    (tmp_path / 'bench.json').write_text(json.dumps({'results': rows[:-1]}))  # the last kernel timing missing
    with pytest.raises(acc.StepFailed, match='16384x4096x4096x4 fwd\\+bwd'):
        acc.check_bench(tmp_path)
    (tmp_path / 'bench.json').write_text(json.dumps({'results': rows}))
    assert acc.check_bench(tmp_path).count('2.00x dense') == 3


def _train_run(out, impl, losses):
    run = out / f'train_{impl}' / '001'
    run.mkdir(parents=True)
    (run / 'last.pt').write_bytes(b'')
    with open(run / 'log.jsonl', 'w') as f:
        for e, loss in enumerate(losses, 1):
            f.write(json.dumps({'step': e, 'epoch': e, 'train/epoch_loss': loss, 'val/loss': loss, 'val/acc': 0.9,
                                'speed/images_per_s': 1000.0}) + '\n')


@pytest.mark.parametrize('kernel,ref,match', [
    ([2.0, 1.5, 1.0, 0.8, 0.7], [2.0, 1.5, 1.0, 0.8, 0.7], None),
    ([2.0, 1.5, 1.4, 1.2, 1.1], [2.0, 1.5, 1.0, 0.8, 0.7], 'epoch 3 train/epoch_loss: kernel 1.4000 vs ref 1.0000'),
    ([2.0, 2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0, 1.99], 'did not learn'),
    ([2.0, 1.5, float('nan'), 0.8, 0.7], [2.0, 1.5, 1.0, 0.8, 0.7], 'epoch 3'),
    ([2.0, 1.5, 1.0], [2.0, 1.5, 1.0, 0.8, 0.7], 'kernel run logged 3 epochs'),
])
def test_train_check_compares_the_loss_curves(tmp_path, kernel, ref, match):
    _train_run(tmp_path, 'kernel', kernel)
    _train_run(tmp_path, 'ref', ref)
    if match is None:
        assert acc.check_train(tmp_path).startswith('loss curves agree (max rel diff 0.0%)')
    else:
        with pytest.raises(acc.StepFailed, match=match):
            acc.check_train(tmp_path)


def test_eval_checks_need_cuda_and_nccl(tmp_path):
    def write(name, device, backend, top1):
        (tmp_path / name).write_text(json.dumps({'device': device, 'backend': backend, 'results': [
            {'top1': top1, 'samples': 360, 'latency_b1_ms': 1.0}]}))
    write('eval_cuda.json', 'cpu', None, 90.0)
    write('eval_cpu.json', 'cpu', None, 90.0)
    with pytest.raises(acc.StepFailed, match='not on the GPU'):
        acc.check_eval_cuda(tmp_path)
    write('eval_cuda.json', 'cuda:0', None, 90.0 + 100 * 3 / 360)  # three images flipped
    with pytest.raises(acc.StepFailed, match='more than two images'):
        acc.check_eval_cuda(tmp_path)
    write('eval_cuda.json', 'cuda:0', None, 90.0)
    assert acc.check_eval_cuda(tmp_path).startswith('top-1 90.00% on cuda')
    write('eval_nccl.json', 'cuda:0', 'gloo', 90.0)
    with pytest.raises(acc.StepFailed, match="backend 'gloo', expected 'nccl'"):
        acc.check_eval_nccl(tmp_path)
    write('eval_nccl.json', 'cuda:0', 'nccl', 90.0)
    assert 'under torchrun + nccl' in acc.check_eval_nccl(tmp_path)
