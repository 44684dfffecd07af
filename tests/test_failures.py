"""Nothing lost, nothing silent: each bad input or fault through the command line of every script ends with one
`error:` line and its exit code, creates no folder and changes no file; corrupted checkpoints are refused, a
non-finite training stops before last.pt is touched, a resume lists (and applies) what changed, logs do not repeat.
"""
import hashlib
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import pytest
import torch

import common
import train_vitae_monarch as tvm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--img-size', '32', '--batch-size', '16', '--limit-train-batches', '3', '--limit-eval-batches', '1',
        '--eval-batch-size', '64', '--drop-path', '0', '--performer-drop', '0', '--progress', '0', '--no-test',
        '--warmup-epochs', '0.5']


def cli(script, *argv, timeout=300):
    """The script as a user runs it: a new interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def entry(capsys, monkeypatch):
    """The same command line in this process (the script's ``run_main(main)`` with ``sys.argv``; saves an interpreter
    start per case): returns (exit code, stdout, stderr) like ``cli``."""
    def run(script, *argv):
        module = importlib.import_module(script[:-3])
        monkeypatch.setattr(sys, 'argv', [script, *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: module.main())
            sys.exit(0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, e.value.code, out.out, out.err)
    return run


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder`` (to prove nothing was created or changed)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), folder) + '/'] = None
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_one_line(r, code, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith('error: '), (r.returncode, r.stderr[-2000:])
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def run1(tmp_path_factory):
    """A real 1-epoch run (of a 2-epoch schedule): runs/001/{args.json, log.jsonl, events, last.pt}."""
    out = tmp_path_factory.mktemp('run1') / 'runs'
    tvm.main(['--epochs', '2', '--stop-epoch', '1', '--output', str(out), *TINY])
    return out / '001'


@pytest.fixture
def run_copy(run1, tmp_path):
    dst = tmp_path / 'runs' / '001'
    shutil.copytree(run1, dst)
    return dst


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write into: a mode-555 folder, or (as root, who ignores modes) sysfs's /sys/fs."""
    if os.geteuid() != 0:
        d = tmp_path / 'ro'
        d.mkdir()
        d.chmod(0o555)
        yield str(d)
        d.chmod(0o755)
        return
    d = '/sys/fs'
    try:
        fd, name = tempfile.mkstemp(dir=d)
    except OSError:
        yield d
        return
    os.close(fd)
    os.remove(name)
    pytest.skip('no read-only folder available as root')


def flip_tensor_bytes(path, n=4096):
    """Invert ``n`` bytes in the middle of the largest tensor payload of a torch zip checkpoint (in place)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack('<HH', header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        n = min(n, info.file_size)
        f.seek(start + (info.file_size - n) // 2)
        chunk = f.read(n)
        f.seek(-n, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


# ------------------------------------------------------------------------------------------------ checkpoints

def test_digest_detects_a_changed_tensor_and_nothing_else(tmp_path):
    obj = {'project': common.PROJECT, 'kind': 'cifar_base', 'model': {'family': 'cifar'}, 'args': {'x': 1.5},
           'state_dict': {'w': torch.arange(6.0).reshape(2, 3), 'b': torch.zeros(2, dtype=torch.bfloat16)},
           'rng': [torch.tensor(3), None, 'a']}
    path = str(tmp_path / 'c.pt')
    common.save_checkpoint(obj, path)
    assert 'digest' not in obj  # the caller's dict is not modified
    ck = common.load_checkpoint(path)
    torch.testing.assert_close(ck['state_dict']['w'], obj['state_dict']['w'], rtol=0, atol=0)
    # the digest is a hash of the content: the same content gives it again, one changed value does not
    assert common.checkpoint_digest(obj) == ck['digest']
    for change in (lambda o: o['state_dict']['w'].__setitem__((1, 2), 5.000001),
                   lambda o: o['state_dict'].__setitem__('b', o['state_dict']['b'].float()),
                   lambda o: o['args'].__setitem__('x', 1.5000000001),
                   lambda o: o['rng'].__setitem__(1, 0)):
        other = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in obj.items()}
        other['state_dict'] = {k: v.clone() for k, v in obj['state_dict'].items()}
        change(other)
        assert common.checkpoint_digest(other) != ck['digest']


def test_corrupted_checkpoint_is_refused_and_left_alone(run_copy):
    ck = run_copy / 'last.pt'
    flip_tensor_bytes(ck)
    torch.load(ck, weights_only=True)  # torch itself reads it without complaint: only the digest can tell
    before = snapshot(run_copy.parent)
    r = cli('train_vitae_monarch.py', '--resume', ck, *TINY, '--epochs', '2')
    assert_one_line(r, 2, 'corrupted', str(ck))
    assert snapshot(run_copy.parent) == before  # file unchanged, no new folder
    r = cli('eval.py', ck, '--dataset', 'digits', '--latency-iters', '0')
    assert_one_line(r, 2, 'corrupted')


def test_checkpoint_without_digest_is_refused(tmp_path):
    path = tmp_path / 'old.pt'
    torch.save({'project': common.PROJECT, 'kind': 'cifar_base', 'args': {}, 'state_dict': {},
                'model': {'family': 'cifar', 'name': 'resnet20', 'kwargs': {}}}, path)
    with pytest.raises(common.UserError, match='no integrity digest'):
        common.load_checkpoint(str(path))


def test_stale_temp_files_are_removed_at_the_next_save(run_copy):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()  # its pid is now free: a temp file named after it belongs to a writer that is gone
    stale = run_copy / f'.last.pt.tmp{dead.pid}'
    stale.write_bytes(b'half a checkpoint')
    alive = run_copy / f'.last.pt.tmp{os.getppid()}'  # a running process's temp file is not touched
    alive.write_bytes(b'in progress')
    tvm.main(['--resume', str(run_copy / 'last.pt'), '--epochs', '2', *TINY])
    assert not stale.exists() and alive.exists()
    assert torch.load(run_copy / 'last.pt', weights_only=True)['epoch'] == 2


# ------------------------------------------------------------------------------------------------ non-finite guard

def test_nan_weights_stop_the_run_and_keep_last_pt(run_copy):
    ck = common.load_checkpoint(str(run_copy / 'last.pt'))
    name = next(k for k, v in ck['state_dict'].items() if v.is_floating_point() and v.ndim == 2)
    ck['state_dict'][name][0, 0] = float('nan')
    common.save_checkpoint(ck, str(run_copy / 'nan.pt'))
    before = snapshot(run_copy.parent)
    r = cli('train_vitae_monarch.py', '--resume', run_copy / 'nan.pt', '--epochs', '2', *TINY, '--max-bad-steps', '1')
    line = assert_one_line(r, 3, 'non-finite', 'step 5')  # steps 4 and 5 of epoch 2: one skipped, then stopped
    assert 'update skipped' in r.stdout
    after = snapshot(run_copy.parent)
    assert after['001/last.pt'] == before['001/last.pt'], line  # the last good checkpoint is untouched
    assert common.load_checkpoint(str(run_copy / 'last.pt'))['epoch'] == 1


def test_seam_non_finite_loss_stops(tmp_path):
    out = tmp_path / 'seam'
    r = cli('reengineer_seam.py', '--train-base', '--base-epochs', '1', '--base-lr', '1e30', '--max-bad-steps', '0',
            '--output', out)
    assert_one_line(r, 3, 'non-finite loss', '[base]')
    assert os.listdir(out) == ['001'] and 'base.pt' not in os.listdir(out / '001')


# ------------------------------------------------------------------------------------------------ resume

def test_resume_applies_changed_flags_and_records_them(run_copy):
    r = cli('train_vitae_monarch.py', '--resume', run_copy / 'last.pt', *TINY, '--epochs', '3', '--batch-size', '32',
            '--blr', '0.05')
    assert r.returncode == 0, r.stderr[-3000:]
    changed = [ln for ln in r.stdout.splitlines() if ln.startswith('resume with changed flags')]
    assert len(changed) == 1 and all(s in changed[0] for s in ('--epochs 2 -> 3', '--batch-size 16 -> 32',
                                                                '--blr 0.01 -> 0.05')), r.stdout
    assert 'lr 3.13e-03' in r.stdout  # 0.05 * 32 / 512 = 3.125e-3
    ck = torch.load(run_copy / 'last.pt', weights_only=True)
    assert ck['epoch'] == 3 and ck['step'] == 9
    # by hand: 3 steps per epoch (--limit-train-batches 3), warmup int(0.5 * 3) = 1 step, cosine over 9 steps; after
    # step 9 the cosine is at its end: lr = 0.05 * 32 / 512 * min_lr_ratio 0.01 (the old run would be at 0.01 * 16/512)
    for g in ck['optimizer']['param_groups']:
        assert g['lr'] == pytest.approx(0.05 * 32 / 512 * 0.01, rel=1e-12)
    args = json.load(open(run_copy / 'args.json'))
    assert args['epochs'] == 3 and args['batch_size'] == 32
    assert args['history'] == [{'epoch': 1, 'step': 3, 'changed': {'epochs': [2, 3], 'batch_size': [16, 32],
                                                                    'blr': [0.01, 0.05], 'stop_epoch': [1, 0]}}]


@pytest.mark.parametrize('flags, words', [(['--seed', '1'], '--seed 0'), (['--opt', 'sgd'], '--opt adamw'),
                                          (['--ema-halflife-kimg', '0'], 'ema-halflife'),
                                          (['--mlp', 'dense'], 'mlp')])
def test_resume_refuses_changes_that_cannot_apply(run_copy, flags, words):
    before = snapshot(run_copy.parent)
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: tvm.main(['--resume', str(run_copy / 'last.pt'), *TINY, '--epochs', '2', *flags]))
    assert e.value.code == 2
    assert snapshot(run_copy.parent) == before


def test_logs_do_not_repeat_after_resuming_an_older_checkpoint(run_copy, tmp_path):
    """A kill after epoch 2 was logged but before its checkpoint landed = epoch 2 logged, last.pt of epoch 1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ep1 = tmp_path / 'ep1.pt'
    shutil.copy(run_copy / 'last.pt', ep1)
    argv = ['--resume', str(run_copy / 'last.pt'), '--epochs', '3', *TINY, '--limit-train-batches', '4']
    tvm.main(argv + ['--stop-epoch', '2'])
    shutil.copy(ep1, run_copy / 'last.pt')
    tvm.main(argv)
    log = [json.loads(ln) for ln in open(run_copy / 'log.jsonl')]
    assert [r['epoch'] for r in log if 'epoch' in r] == [1, 2, 3]
    steps = [r['step'] for r in log if 'train/loss' in r]
    assert steps == [10]  # epochs end at steps 3, 7, 11
    acc = EventAccumulator(str(run_copy))
    acc.Reload()
    assert [e.step for e in acc.Scalars('epoch')] == [3, 7, 11]
    assert [e.step for e in acc.Scalars('train/loss')] == steps


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize('flags, words', [
    (['--blr', 'nan'], '--blr'), (['--workers', '-1'], '--workers'), (['--warmup-epochs', '-1'], '--warmup-epochs'),
    (['--label-smoothing', '1.5'], '--label-smoothing'), (['--max-bad-steps', '-1'], '--max-bad-steps'),
    (['--dataset', 'cifar10', '--data-dir', 'EMPTY'], 'cifar-10-batches-py')])
def test_train_bad_flags_leave_nothing(tmp_path, flags, words, entry):
    (tmp_path / 'empty').mkdir()
    flags = [str(tmp_path / 'empty') if f == 'EMPTY' else f for f in flags]
    r = entry('train_vitae_monarch.py', '--output', tmp_path / 'runs', *flags)
    assert_one_line(r, 2, words)
    assert not (tmp_path / 'runs').exists()


def test_unwritable_output_is_one_line(tmp_path, readonly_dir, entry):
    (tmp_path / 'file').write_text('x')
    for script, extra in (('train_vitae_monarch.py', []), ('reengineer_seam.py', ['--train-base'])):
        for out, words in ((tmp_path / 'file', 'is a file'), (tmp_path / 'file' / 'sub', 'is a file'),
                           (os.path.join(readonly_dir, 'runs'), 'cannot write')):
            r = entry(script, '--output', out, *extra)
            assert_one_line(r, 2, '--output', words)
    assert os.listdir(tmp_path) == ['file']


@pytest.mark.parametrize('flags, words', [
    (['--epochs', '0'], '--epochs'), (['--base-epochs', '-1'], '--base-epochs'), (['--batch-size', '0'], '--batch-size'),
    (['--lr-mask', 'nan'], '--lr-mask'), (['--latency-iters', '0'], '--latency-iters'),
    (['--dataset', 'cifar10', '--data-dir', 'EMPTY'], 'cifar-10-batches-py')]
    + ([] if torch.cuda.is_available() else [(['--device', 'cuda'], 'no CUDA device')]))
def test_seam_bad_flags_leave_nothing(tmp_path, flags, words, entry):
    (tmp_path / 'empty').mkdir()
    flags = [str(tmp_path / 'empty') if f == 'EMPTY' else f for f in flags]
    r = entry('reengineer_seam.py', '--train-base', '--task', 'binary', '--target-class', '0', '--output',
            tmp_path / 'runs', *flags)
    assert_one_line(r, 2, words)
    assert not (tmp_path / 'runs').exists()


def test_eval_json_target_checked_before_evaluating(run1, tmp_path, readonly_dir, entry):
    for path, words in ((tmp_path / 'missing' / 'r.json', 'does not exist'),
                        (os.path.join(readonly_dir, 'r.json'), 'cannot write'), (tmp_path, 'is a folder')):
        r = entry('eval.py', run1 / 'last.pt', '--dataset', 'digits', '--latency-iters', '0', '--json', path)
        assert_one_line(r, 2, '--json', words)
        assert r.stdout == ''  # refused before any result was computed
    assert not (tmp_path / 'missing').exists()


def test_bench_refuses_cpu_bfloat16_and_unwritable_json(readonly_dir, tmp_path, entry):
    r = entry('bench_kernels.py', '--device', 'cpu', '--dtypes', 'bfloat16', '--quick')
    assert_one_line(r, 2, 'float32 only')
    r = entry('bench_kernels.py', '--device', 'cpu', '--quick', '--json', os.path.join(readonly_dir, 'b.json'))
    assert_one_line(r, 2, '--json', 'cannot write')
    assert r.stdout == ''
    r = entry('bench_kernels.py', '--device', 'cpu', '--quick', '--rounds', '0')
    assert_one_line(r, 2, '--rounds', '>= 1')
    assert r.stdout == ''
