"""Small shared helpers for the scripts: user errors, DDP launch, checkpoints, run folders, logging, metrics.

- ``UserError``; ``run_main(main)``: UserError / ValueError (incl. ``data.DataError``) -> ``error: ...`` on stderr, exit 2;
  ``NonFiniteError`` (a diverged training) -> one line, exit 3.
- ``launch(worker, args, nproc)``: torchrun env present -> ``worker(RANK, WORLD_SIZE, args)`` in this process;
  ``nproc > 1`` -> ``mp.spawn`` on a free port; else ``worker(0, 1, args)``. ``local_rank(rank)``,
  ``restart_count()`` (torchrun's), ``agent_store()`` (torchrun's store, which outlives restarts).
- ``process_device(name, rank)`` (this process's ``torch.device``), ``backend_for(device)`` (nccl for CUDA, gloo
  for everything else, whatever GPUs are visible), ``setup_distributed(rank, world_size, device)`` (joins the group
  with that backend; no-op for 1 process unless under torchrun), ``collective_device()`` (where every collective's
  tensors live: the process's GPU under nccl, else the CPU), ``cleanup()``, ``is_main()``,
  ``broadcast_object(obj)``, ``gather_objects(obj)``, ``all_reduce_sum(values)``, ``barrier()``.
- ``save_checkpoint(obj, path)`` (atomic; adds a SHA-256 ``digest`` of the content; removes temp files that killed
  saves left in that folder), ``load_checkpoint(path, expected_kinds=None)`` (weights_only, digest verified, never
  writes; one-line UserError for anything that is not an intact checkpoint of this project). Format:
  ``{'project': 'monarch-seam', 'kind': str, 'model': {'family', 'name', 'kwargs'}, 'state_dict': {...},
  'args': dict, 'digest': str, ...}``.
- ``check_output_dir(path, flag)`` (before anything is created: a folder we can write, or one we can create),
  ``check_output_file(path, flag)``, ``make_run_dir(output, args)``, ``write_json(path, obj)`` (atomic),
  ``latest_checkpoint(output, filename)``, ``Logger(run_dir, enabled, resume_step)``.
- ``prime_vml()``: resolve MKL's vector-math kernels on one thread before any op runs them on several (called first
  by every script; the reason is at the function).
- ``seed_everything(seed)``, ``get_rng_state()`` / ``set_rng_state(state)``, ``count_params(model)``,
  ``convert_sync_batchnorm(model, device)``.
"""
import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import socket
import statistics
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROJECT = 'monarch-seam'
CKPT_KINDS = ('vitae_train', 'cifar_base', 'seam_masks', 'seam_module')


class UserError(Exception):
    """A mistake of the user (bad flag, missing file): reported as one line, exit code 2."""


class NonFiniteError(Exception):
    """Training diverged (non-finite loss or gradient norm): reported as one line, exit code 3."""


def run_main(main):
    """Call ``main()``; a user error -> ``error: <message>`` on stderr, exit code 2; a diverged training ->
    ``error: <message>``, exit code 3 (no traceback for either)."""
    try:
        main()
    except (UserError, ValueError, NonFiniteError) as e:
        msg = ' '.join(str(e).split()) or type(e).__name__
        print(f'error: {msg}', file=sys.stderr)
        sys.exit(3 if isinstance(e, NonFiniteError) else 2)


# ------------------------------------------------------------------------------------------------ distributed

def _free_port():
    # Ask the OS for a free port (bind to port 0) instead of hard-coding one that another job may hold.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def under_torchrun():
    return all(k in os.environ for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'))


def restart_count():
    """How often torchrun restarted this worker group (``--max-restarts``); 0 outside torchrun."""
    return int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')) if under_torchrun() else 0


def agent_store():
    """A client of the key-value store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT (it outlives worker
    restarts, so a restarted worker can read what the first attempt wrote), or None outside torchrun / when the
    agent does not share its store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    if not under_torchrun() or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != str(True):
        return None
    from datetime import timedelta
    return dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                         timeout=timedelta(seconds=60))


def local_rank(rank):
    """GPU index of this process: torchrun's LOCAL_RANK, else the spawn rank (one machine)."""
    return int(os.environ.get('LOCAL_RANK', rank))


def _spawn_entry(rank, worker, world_size, args):
    worker(rank, world_size, args)


def launch(worker, args, nproc=1):
    """Run ``worker(rank, world_size, args)`` once per process (see module docstring)."""
    if under_torchrun():
        return worker(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), args)
    if nproc <= 1:
        return worker(0, 1, args)
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(_free_port())
    try:
        mp.spawn(_spawn_entry, args=(worker, nproc, args), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as e:
        # The child's traceback ends with "module.ErrorType: message"; a user error becomes one line here.
        last = [ln for ln in str(e).splitlines() if ln.strip()][-1]
        m = re.match(r'^(?:[\w.]+\.)?(UserError|DataError|ValueError|NonFiniteError): (.*)$', last)
        if m:
            cls = NonFiniteError if m.group(1) == 'NonFiniteError' else UserError
            raise cls(f'rank {e.error_index}: {m.group(2)}') from None
        raise


def process_device(name, rank=0):
    """This process's device for ``--device name``: its GPU (``local_rank``) for 'cuda', else the CPU."""
    return torch.device('cuda', local_rank(rank)) if torch.device(name).type == 'cuda' else torch.device('cpu')


def backend_for(device):
    """The process-group backend of a run on ``device``: nccl for CUDA; gloo for a CPU run, also on a machine
    with GPUs (nccl reduces only CUDA tensors)."""
    return 'nccl' if torch.device(device).type == 'cuda' else 'gloo'


# The device of every collective's tensors in this process, set by setup_distributed (CPU until then).
_collective = {'device': torch.device('cpu')}


def collective_device():
    """Where the tensors of this process's collectives live: its GPU under nccl, the CPU under gloo."""
    return _collective['device']


def setup_distributed(rank, world_size, device='cpu'):
    """Join the process group of a run on ``device`` (env:// rendezvous: MASTER_ADDR/PORT set by ``launch`` or
    torchrun), with ``backend_for(device)``; a CUDA process first selects its GPU. Returns ``is_main`` (rank 0):
    use it to guard printing, logging and file writes."""
    device = torch.device(device)
    if device.type == 'cuda':
        device = device if device.index is not None else process_device('cuda', rank)
        torch.cuda.set_device(device)
    backend = backend_for(device)
    _collective['device'] = device if backend == 'nccl' else torch.device('cpu')
    # Under torchrun even one process joins a group, so `torchrun --nproc_per_node 1` runs real collectives.
    if (world_size > 1 or under_torchrun()) and not dist.is_initialized():
        kw = {'device_id': device} if backend == 'nccl' else {}  # binds the communicator to this GPU
        if under_torchrun():
            # Key the rendezvous by torchrun's restart count: after a restart (--max-restarts) the store may still
            # hold the previous attempt's gloo addresses, and connecting to those fails.
            store, _, _ = next(dist.rendezvous('env://'))
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kw)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, **kw)
    return rank == 0


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
    _collective['device'] = torch.device('cpu')


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dev = collective_device()
        dist.barrier(device_ids=[dev.index] if dev.type == 'cuda' else None)


def broadcast_object(obj, src=0):
    """Rank ``src``'s ``obj`` on every rank (e.g. the run folder chosen by rank 0)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # under nccl via torch.cuda.current_device(), set by setup_distributed
    return out


def all_reduce_sum(values):
    """Sum a list of numbers over ranks exactly (float64; counts up to 2**53 stay exact). Returns a list.
    The tensor lives on ``collective_device()``, the one device the process group's backend can reduce."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: each rank's output depends on every rank's input, so the gradient of a rank's
    input is the sum over ranks of the output gradients (another all_reduce)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are summed over all ranks with a differentiable all_reduce, so N
    processes normalise exactly like one process with the whole batch (torch's SyncBatchNorm is GPU-only)."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), n]))
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c:2 * c] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def convert_sync_batchnorm(model, device):
    """Batch statistics over all ranks: torch's SyncBatchNorm on CUDA, ``_GlooSyncBatchNorm`` on CPU."""
    if torch.device(device).type == 'cuda':
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, mod in list(model.named_children()):
        if type(mod) is torch.nn.BatchNorm2d:
            new = _GlooSyncBatchNorm(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
            new.load_state_dict(mod.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(mod, device)
    return model


# ------------------------------------------------------------------------------------------------ checkpoints

def _digest_update(h, obj):
    """Feed ``obj`` (the plain content of a checkpoint) into hash ``h``, with type tags so that different
    structures can never hash alike; tensors by dtype, shape and raw bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f'T{t.dtype}{tuple(obj.shape)}:'.encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b'')
    elif isinstance(obj, dict):
        h.update(f'D{len(obj)}:'.encode())
        for k, v in obj.items():
            _digest_update(h, k)
            _digest_update(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f'{"L" if isinstance(obj, list) else "U"}{len(obj)}:'.encode())
        for v in obj:
            _digest_update(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        r = repr(obj).encode()
        h.update(f'{type(obj).__name__}{len(r)}:'.encode() + r)
    else:
        raise TypeError(f'checkpoint content must be plain tensors/numbers/strings/containers, got {type(obj)}')


def checkpoint_digest(obj):
    """SHA-256 of everything in the checkpoint dict except its ``digest`` entry (hex string)."""
    h = hashlib.sha256()
    _digest_update(h, {k: v for k, v in obj.items() if k != 'digest'})
    return h.hexdigest()


_TMP_RE = re.compile(r'^\.(.+)\.tmp(\d+)$')


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder):
    """Delete ``.NAME.tmpPID`` files (this project's half-written saves) whose writer process no longer runs."""
    removed = []
    for name in os.listdir(folder):
        m = _TMP_RE.match(name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def save_checkpoint(obj, path):
    """Write atomically: a temporary file in the same folder, then ``os.replace`` (a crash leaves the old file).
    A ``digest`` entry (``checkpoint_digest``) is added to a copy of ``obj``; ``load_checkpoint`` verifies it.
    Temp files left by killed saves in this folder are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    obj = dict(obj)
    obj['digest'] = checkpoint_digest(obj)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_checkpoint(path, expected_kinds=None, map_location='cpu'):
    """Load a checkpoint of this project with ``weights_only=True`` and verify its digest; the file is only read.
    Any problem -> one-line UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path!r} not found (not a file); pass the path of a .pt file this project wrote')
    if not zipfile.is_zipfile(path):
        raise UserError(f'{path!r} is not a PyTorch checkpoint (not a zip archive); pass a .pt file this project wrote')
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f'{path!r} is not a plain checkpoint of this project: loading it would need arbitrary '
                        'pickled objects (refused, weights_only=True)') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError, TypeError):
        raise UserError(f'{path!r} is not a PyTorch checkpoint (unreadable or truncated file)') from None
    if not isinstance(obj, dict) or obj.get('project') != PROJECT:
        raise UserError(f"{path!r} is not a checkpoint of this project (no 'project': '{PROJECT}' entry)")
    if not isinstance(obj.get('digest'), str):
        raise UserError(f'{path!r} has no integrity digest (not written by common.save_checkpoint); it cannot be '
                        'verified, so it is not used')
    try:
        digest = checkpoint_digest(obj)
    except TypeError as e:
        raise UserError(f'{path!r} is a malformed {PROJECT} checkpoint ({e})') from None
    if digest != obj['digest']:
        raise UserError(f'{path!r} is corrupted: its content does not match the digest written when it was saved '
                        '(damaged file); use another checkpoint (e.g. an earlier run) or train again')
    missing = [k for k in ('kind', 'model', 'state_dict', 'args') if k not in obj]
    if missing or not isinstance(obj['model'], dict) or not isinstance(obj['state_dict'], dict):
        raise UserError(f'{path!r} is a malformed {PROJECT} checkpoint (missing or bad: {", ".join(missing) or "model"})')
    if expected_kinds is not None and obj['kind'] not in expected_kinds:
        raise UserError(f"{path!r} is a {obj['kind']!r} checkpoint; expected {' or '.join(map(repr, expected_kinds))}")
    return obj


def get_rng_state():
    """All RNG states as plain tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            'python': [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------------------------ runs, logs

def check_output_dir(path, flag='--output'):
    """Before anything is created: ``path`` must be a folder we can write to, or creatable (its nearest existing
    ancestor is a writable folder). Creates nothing (a probe file is made and removed). One-line UserError."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f'{flag} {path!r}: {probe!r} is a file, not a folder; pass a folder path')
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix='.write-probe-')
        os.close(fd)
        os.remove(name)
    except OSError as e:
        raise UserError(f'{flag} {path!r}: cannot write into {probe!r} ({e.strerror}); pass a writable folder') from None


def check_output_file(path, flag='--json'):
    """Before any work: ``path`` can be written (its folder exists and is writable, it is not a folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'{flag} {path!r} is a folder; pass a file path')
    if not os.path.isdir(folder):
        raise UserError(f'{flag} {path!r}: the folder {folder!r} does not exist; create it or pass another path')
    check_output_dir(folder, flag)


def write_json(path, obj):
    """Write ``obj`` as indented JSON atomically (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def make_run_dir(output, args=None):
    """Create ``output/NNN`` (next free number) and save ``args`` (dict) there as ``args.json``. Call it only when
    the run is about to start (after every check), so a failed launch leaves no folder behind."""
    os.makedirs(output, exist_ok=True)
    nums = [int(d) for d in os.listdir(output) if d.isdigit()]
    n = max(nums, default=0) + 1
    while True:
        path = os.path.join(output, f'{n:03d}')
        try:
            os.makedirs(path)
            break
        except FileExistsError:  # another job took this number meanwhile
            n += 1
    if args is not None:
        write_json(os.path.join(path, 'args.json'), args)
    return path


def latest_checkpoint(output, filename='last.pt'):
    """``output/NNN/filename`` of the highest-numbered run that has one, else None (for ``--resume auto``)."""
    if not os.path.isdir(output):
        return None
    for d in sorted((d for d in os.listdir(output) if d.isdigit()), key=int, reverse=True):
        path = os.path.join(output, d, filename)
        if os.path.isfile(path):
            return path
    return None


class Logger:
    """Rank-0 scalars to TensorBoard (SummaryWriter) and ``log.jsonl`` (one JSON object per line, flushed).

    ``resume_step``: the step a resumed run restarts from. Whatever an interrupted attempt logged after it is
    dropped, so nothing is repeated: TensorBoard events with a larger step are purged (``purge_step``) and
    ``log.jsonl`` is cut to the records it had when the checkpoint was written (``keep_lines``, the checkpoint's
    ``lines``; without it, records with a larger step are dropped)."""

    def __init__(self, run_dir, enabled=True, resume_step=None, keep_lines=None):
        self.enabled = enabled
        self.lines = 0
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            path = os.path.join(run_dir, 'log.jsonl')
            if resume_step is not None and os.path.isfile(path):
                with open(path) as f:
                    old = f.readlines()
                if keep_lines is not None:
                    kept = old[:keep_lines]
                else:
                    kept = [ln for ln in old if _log_step(ln) is not None and _log_step(ln) <= resume_step]
                if kept != old:
                    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix='.log.jsonl.')
                    with os.fdopen(fd, 'w') as f:
                        f.writelines(kept)
                    os.replace(tmp, path)
                self.lines = len(kept)
            elif os.path.isfile(path):
                with open(path) as f:
                    self.lines = sum(1 for _ in f)
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(run_dir, purge_step=purge)
            self.file = open(path, 'a')

    def log(self, step, **scalars):
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.file.write(json.dumps({'step': step, **scalars}) + '\n')
        self.file.flush()
        self.writer.flush()
        self.lines += 1

    def close(self):
        if self.enabled:
            self.writer.close()
            self.file.close()


def _log_step(line):
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ misc

@torch.no_grad()
def latencies(nets, batch, img_size, iters, device=torch.device('cpu'), ctx=None):
    """{name: median milliseconds of one forward} for the eval-mode ``nets`` ({name: model}) at this batch size.

    The nets are timed in alternation after 3 warm-up rounds (allocation, kernel selection, lazy builds), so a
    load change on a shared machine hits them alike; CUDA events on a GPU, perf_counter on the CPU. ``ctx``: a
    context-manager factory for the forwards (e.g. autocast)."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    times = {name: [] for name in nets}
    for i in range(3 + iters):
        for name, net in nets.items():
            with ctx() if ctx else contextlib.nullcontext():
                if device.type == 'cuda':
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    net(x)
                    end.record()
                    torch.cuda.synchronize()
                    t = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    net(x)
                    t = 1000 * (time.perf_counter() - t0)
            if i >= 3:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


# Float unary ops that ATen hands to MKL's vector math library (VML) on contiguous tensors: each thread of the op calls
# e.g. vmsExp(n, in, out, VML_HA) on its chunk (aten/src/ATen/cpu/vml.h). oneMKL 2024.2, the one torch 2.14 ships,
# picks each VML function's kernel on that function's first call, and when the first call runs on two threads at
# once, one of them can compute its whole chunk with a low-accuracy kernel although high accuracy was asked for
# (pytorch/pytorch#188792); later calls are right. Measured here (README, "Reproducibility and failures"): in the
# default training run the first torch.exp of the performer features came out wrong in 6 of 88 fresh processes
# under CPU load (0 of 87 with this primer): the second thread's half (65,391 of 131,072 values) off by up
# to 1,773 ulp (relative error 1.5e-4), so the run's losses and weights differed. One call on one element runs on
# the calling thread alone and settles the kernel choice for all later calls. abs and trunc are listed because
# vml.h maps them too. All 36 calls take ~6 ms in a fresh process (MKL picking the kernels), ~2 us each after.
VML_OPS = ('abs', 'acos', 'asin', 'atan', 'cos', 'erf', 'erfc', 'exp', 'expm1', 'log', 'log10', 'log1p', 'log2', 'sin',
           'sqrt', 'tan', 'tanh', 'trunc')
_vml_primed = False


def prime_vml():
    """Run every VML-backed unary op once on a one-element float32 and float64 tensor (one thread). Idempotent; call it
    in each process before its first computation (spawned workers are new processes; forked DataLoader workers
    inherit the settled state)."""
    global _vml_primed
    if _vml_primed:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)  # inside every listed function's domain
        for name in VML_OPS:
            getattr(torch, name)(x)
    _vml_primed = True


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def count_params(model, trainable_only=True):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
