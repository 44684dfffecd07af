"""train_vitae_monarch.py: learning, DDP == single process, torchrun (+ restart after a SIGKILLed worker), exact resume,
bad input. Tiny settings (ViTAE-Tiny at 32 px, a few steps) keep the whole file around two minutes on 2 CPU cores.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import common
import train_vitae_monarch as tvm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny, randomness-free settings: no drop path / dropout (these draw per-rank random numbers), no mixup.
TINY = ['--img-size', '32', '--batch-size', '16', '--limit-train-batches', '3', '--limit-eval-batches', '1',
        '--eval-batch-size', '64', '--drop-path', '0', '--performer-drop', '0', '--progress', '0', '--no-test',
        '--warmup-epochs', '0.5']


def run_inproc(*argv):
    tvm.main(list(argv))


def run_cli(*argv, env=None, module=None, timeout=240):
    cmd = [sys.executable] + (['-m', module] if module else []) + list(argv)
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def last(output):
    path = common.latest_checkpoint(str(output))
    assert path, f'no checkpoint under {output}'
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_tiny_run_learns(tmp_path):
    run_inproc('--epochs', '3', '--output', str(tmp_path), *TINY, '--limit-train-batches', '12',
               '--limit-eval-batches', '0', '--batch-size', '32')
    log = [json.loads(line) for line in open(os.path.join(tmp_path, '001', 'log.jsonl'))]
    epochs = [r for r in log if 'epoch' in r]
    assert len(epochs) == 3
    assert epochs[-1]['train/epoch_loss'] < epochs[0]['train/epoch_loss']
    assert epochs[-1]['val/acc'] > 0.3  # chance is 0.1 on the 10 digit classes
    ck = last(tmp_path)
    assert ck['project'] == 'monarch-seam' and ck['kind'] == 'vitae_train' and ck['epoch'] == 3
    assert {'optimizer', 'scheduler', 'scaler', 'ema', 'rng', 'args', 'model', 'state_dict', 'step'} <= set(ck)
    assert ck['model']['kwargs']['mlp'] == 'monarch'
    assert json.load(open(os.path.join(tmp_path, '001', 'args.json')))['epochs'] == 3


def test_two_spawned_processes_match_one_process(tmp_path):
    # SGD: Adam divides by sqrt(v), so on parameters whose exact gradient is ~0 (conv biases feeding a BatchNorm)
    # it turns float rounding noise (which differs with the reduction order) into full-size steps of +-lr.
    args = ['--epochs', '1', *TINY, '--opt', 'sgd', '--blr', '0.5']
    run_inproc('--output', str(tmp_path / 'one'), *args)
    r = run_cli('train_vitae_monarch.py', '--nproc', '2', '--output', str(tmp_path / 'two'), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = last(tmp_path / 'one'), last(tmp_path / 'two')
    assert two['world_size'] == 2 and one['world_size'] == 1
    assert_same_weights(one['state_dict'], two['state_dict'], atol=1e-5)
    assert_same_weights(one['ema'], two['ema'], atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _children(pid):
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _rank_of(pid):
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
    except OSError:
        return None
    return int(env[b'RANK']) if b'RANK' in env else None


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='finds the torchrun workers through /proc (Linux)')
def test_torchrun_restart_after_sigkill_resumes_its_own_run(tmp_path):
    """torchrun --max-restarts 1, no --resume: SIGKILL rank 1 once epoch 1's checkpoint exists; the restarted workers
    continue the same run folder from last.pt and end with the weights of an uninterrupted run."""
    def cmd(out):
        return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--max-restarts', '1',
                '--master-port', str(_free_port()), 'train_vitae_monarch.py', '--epochs', '3', '--output', str(out),
                *TINY]

    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    clean = subprocess.run(cmd(tmp_path / 'clean'), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = tmp_path / 'faulty'
    proc = subprocess.Popen(cmd(faulty), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        while proc.poll() is None and killed is None:
            if (faulty / '001' / 'last.pt').exists():
                victims = [p for p in _children(proc.pid) if _rank_of(p) == 1]
                assert victims, 'no rank-1 worker found'
                os.kill(victims[0], signal.SIGKILL)
                killed = victims[0]
            else:
                time.sleep(0.02)  # polling interval only; nothing is asserted about time
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, 'the run ended before its first checkpoint was seen'
    assert proc.returncode == 0, stderr[-3000:]
    assert 'after torchrun restart 1' in stdout and 'resumed' not in clean.stdout, stdout
    assert sorted(os.listdir(faulty)) == ['001']  # one run folder: the restart continued it
    a, b = last(tmp_path / 'clean'), last(faulty)
    assert a['epoch'] == b['epoch'] == 3 and a['step'] == b['step'] == 9
    assert_same_weights(a['state_dict'], b['state_dict'], atol=1e-6)
    epochs = [r['epoch'] for r in map(json.loads, open(faulty / '001' / 'log.jsonl')) if 'epoch' in r]
    assert epochs == [1, 2, 3]  # nothing logged twice


def test_resume_is_bit_exact(tmp_path):
    args = ['--epochs', '2', *TINY, '--drop-path', '0.1', '--performer-drop', '0.1']  # randomness must resume too
    run_inproc('--output', str(tmp_path / 'straight'), *args)
    run_inproc('--output', str(tmp_path / 'split'), '--stop-epoch', '1', *args)
    assert last(tmp_path / 'split')['epoch'] == 1
    run_inproc('--output', str(tmp_path / 'split'), '--resume', 'auto', *args)
    a, b = last(tmp_path / 'straight'), last(tmp_path / 'split')
    assert b['epoch'] == 2 and not os.path.exists(tmp_path / 'split' / '002')  # continued in the same run folder
    for key in ('state_dict', 'ema'):
        assert_same_weights(a[key], b[key], atol=0)
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])
    assert a['scheduler']['last_epoch'] == b['scheduler']['last_epoch'] == 6


@pytest.mark.parametrize('threads', ['0', '1'])
def test_cpu_training_runs_in_deterministic_mode(tmp_path, monkeypatch, threads):
    # The settings README "Reproducibility and failures" relies on: during a CPU run deterministic algorithms are on
    # and the thread count is the one asked for (0 = cores / local processes; the thread-count-dependent reductions
    # listed there are split by it); both are restored when the run returns.
    seen, evaluate = [], tvm.evaluate

    def spy(*a, **k):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()))
        return evaluate(*a, **k)

    monkeypatch.setattr(tvm, 'evaluate', spy)
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    run_inproc('--epochs', '1', '--threads', threads, '--output', str(tmp_path), *TINY)
    want = int(threads) or max(1, (os.cpu_count() or 1))
    assert seen and all(s == (True, want) for s in seen), seen
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


# Run in a fresh process (the primer works once per process): records the size of every call of the ops that MKL's
# vector math library serves, then trains a few steps. PRIME=0 switches the primer off (the control).
_RECORD_VML = """
import json, os, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import common, train_vitae_monarch as tvm
names = set(common.VML_OPS)
calls = []
class Record(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split('::')[-1].split('.')[0].rstrip('_')
        if name in names and isinstance(args[0], torch.Tensor) and args[0].dtype.is_floating_point:
            calls.append((name, str(args[0].dtype), args[0].numel()))
        return func(*args, **(kwargs or {}))
if os.environ['PRIME'] == '0':
    common.prime_vml = lambda: None
with Record():
    tvm.main(sys.argv[1:])
print('CALLS ' + json.dumps(calls))
"""


@pytest.mark.parametrize('prime', ['1', '0'])
def test_vector_math_ops_are_first_called_on_one_element(tmp_path, prime):
    # README "Reproducibility and failures": MKL 2024.2 picks each vector-math function's kernel at its first call,
    # and a first call on two threads at once can compute one thread's chunk at low accuracy (the default run's
    # performer exp did in 6 of 88 fresh processes under CPU load). The scripts call common.prime_vml() first, so
    # in a run every such op's first call (per dtype) has one element, and the big calls come after it. The control
    # (primer off) shows this check catches a run whose first exp is a many-thread call.
    # batch 32: the first performer's exp has 32 x 64 tokens x 32 features = 65,536 values, split over both threads
    r = run_cli('-c', _RECORD_VML, '--epochs', '1', '--threads', '2', '--output', str(tmp_path), *TINY,
                '--batch-size', '32', env={'PRIME': prime})
    assert r.returncode == 0, r.stderr[-2000:]
    calls = json.loads(r.stdout.split('CALLS ', 1)[1])
    first = {}
    for name, dtype, n in calls:
        first.setdefault((name, dtype), n)
    big_exp = [n for name, dtype, n in calls if (name, dtype) == ('exp', 'torch.float32') and n >= 65536]
    assert big_exp, 'the run no longer calls a multi-thread float32 exp: the check below would prove nothing'
    unprimed = {k: n for k, n in first.items() if n != 1}
    if prime == '1':
        assert not unprimed, unprimed
        assert {(name, dtype) for name in common.VML_OPS for dtype in ('torch.float32', 'torch.float64')} <= set(first)
    else:
        assert ('exp', 'torch.float32') in unprimed


def _user_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: tvm.main(list(argv)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith('error: ') and '\n' not in err, err
    return err


def test_missing_data_folder_cli(tmp_path):
    r = run_cli('train_vitae_monarch.py', '--dataset', 'cifar10', '--data-dir', str(tmp_path / 'nope'),
                '--output', str(tmp_path))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and 'cifar-10-batches-py' in lines[0]


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    out = str(tmp_path / 'runs')
    assert 'vitae_basic_tiny' in _user_error(capsys, '--model', 'vitae_huge', '--output', out)
    assert 'nblocks' in _user_error(capsys, '--nblocks', '3', '--output', out)
    assert 'not a file' in _user_error(capsys, '--resume', str(tmp_path / 'none.pt'), '--output', out)
    (tmp_path / 'junk.pt').write_text('hello')
    assert 'not a PyTorch checkpoint' in _user_error(capsys, '--resume', str(tmp_path / 'junk.pt'), '--output', out)
    # a real checkpoint of another architecture (dense) cannot be resumed as Monarch nor used as a Monarch init source
    run_inproc('--epochs', '1', '--mlp', 'dense', '--output', out, *TINY, '--limit-train-batches', '1')
    dense_ck = common.latest_checkpoint(out)
    assert "mlp" in _user_error(capsys, '--resume', dense_ck, '--output', out)
    # and a Monarch checkpoint is not a valid --init-from (needs dense weights)
    run_inproc('--epochs', '1', '--output', str(tmp_path / 'm'), *TINY, '--limit-train-batches', '1')
    assert 'dense' in _user_error(capsys, '--init-from', common.latest_checkpoint(str(tmp_path / 'm')),
                                  '--output', out)
    # the dense checkpoint does project into Monarch (the paper's dense-to-sparse fine-tuning)
    run_inproc('--epochs', '1', '--init-from', dense_ck, '--output', str(tmp_path / 'ft'), *TINY,
               '--limit-train-batches', '1')
    assert last(tmp_path / 'ft')['epoch'] == 1
    assert 'divisible' in _user_error(capsys, '--nproc', '3', '--output', out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_bf16_run(tmp_path):
    run_inproc('--device', 'cuda', '--amp', 'bf16', '--epochs', '1', '--output', str(tmp_path), *TINY)
    assert last(tmp_path)['epoch'] == 1
