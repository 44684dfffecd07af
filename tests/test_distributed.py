"""Device-true distributed plumbing (common.backend_for / setup_distributed / collective_device) as each script's
worker uses it, on a machine that reports CUDA as available (patched): a CPU run joins gloo and keeps every
collective's tensors on the CPU; a CUDA run asks for nccl on its own GPU. nccl is never really initialised: the
CUDA cases stop at the init call, the CPU cases join a real one-rank gloo group in this process.
"""
import pytest
import torch
import torch.distributed as dist

import common
import eval as evaluate_script
import train_vitae_monarch as tvm

TINY = ['--img-size', '32', '--batch-size', '16', '--limit-train-batches', '1', '--limit-eval-batches', '1',
        '--eval-batch-size', '64', '--drop-path', '0', '--performer-drop', '0', '--progress', '0', '--no-test',
        '--epochs', '1']


class StopAtInit(Exception):
    """Raised by the patched init_process_group instead of initialising nccl."""


@pytest.fixture
def cuda_visible(monkeypatch):
    """CUDA reported available; records what the process-group plumbing asks for and where collectives run."""
    rec = {'init': [], 'set_device': [], 'collective': []}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [])  # checkpoints ask for it when CUDA is visible
    # the optimizer asks the (absent) GPU whether a CUDA graph is being captured
    monkeypatch.setattr(torch.optim.Optimizer, '_accelerator_graph_capture_health_check', lambda self: None)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: rec['set_device'].append(torch.device(d)))
    real_init = dist.init_process_group

    def init(backend, **kw):
        rec['init'].append((backend, kw, common.collective_device()))
        if backend != 'gloo':
            raise StopAtInit(backend)
        real_init('gloo', store=dist.HashStore(), rank=0, world_size=1)  # the worker believes it has company

    def spy(name, device_of):
        real = getattr(dist, name)

        def call(*a, **k):
            rec['collective'].append((name, device_of(*a, **k)))
            return real(*a, **k)
        monkeypatch.setattr(dist, name, call)

    monkeypatch.setattr(dist, 'init_process_group', init)
    spy('all_reduce', lambda t, *a, **k: t.device)
    spy('broadcast_object_list', lambda *a, **k: torch.device(k['device']))
    spy('barrier', lambda *a, **k: torch.device('cuda', k['device_ids'][0]) if k.get('device_ids')
        else torch.device('cpu'))
    yield rec
    common.cleanup()


def test_backend_follows_the_run_device_not_the_machine(cuda_visible):
    assert common.backend_for('cpu') == 'gloo' and common.backend_for(torch.device('cpu')) == 'gloo'
    assert common.backend_for('cuda') == 'nccl' and common.backend_for(torch.device('cuda', 3)) == 'nccl'
    assert common.process_device('cpu', 1) == torch.device('cpu')
    assert common.process_device('cuda', 1) == torch.device('cuda', 1)


def _expect_cpu_world(rec):
    assert [(b, k['world_size']) for b, k, _ in rec['init']] == [('gloo', 2)]
    assert rec['set_device'] == []
    names = {n for n, _ in rec['collective']}
    assert {'all_reduce', 'barrier'} <= names, names
    assert all(d == torch.device('cpu') for _, d in rec['collective']), rec['collective']


def test_cpu_runs_use_gloo_and_cpu_tensors(cuda_visible, tmp_path):
    """The training worker, then the evaluator on its checkpoint, each as rank 0 of 2 CPU processes."""
    tvm.worker(0, 2, tvm.get_args(TINY + ['--output', str(tmp_path)]))
    _expect_cpu_world(cuda_visible)
    assert 'broadcast_object_list' in {n for n, _ in cuda_visible['collective']}
    ck = common.latest_checkpoint(str(tmp_path))
    for key in ('init', 'collective'):
        cuda_visible[key].clear()
    evaluate_script.worker(0, 2, evaluate_script.get_args([ck, '--dataset', 'digits', '--split', 'val',
                                                           '--device', 'cpu', '--latency-iters', '0']))
    _expect_cpu_world(cuda_visible)


@pytest.mark.parametrize('rank', [0, 1])
@pytest.mark.parametrize('script', ['train', 'eval'])
def test_cuda_run_asks_nccl_on_its_own_gpu(cuda_visible, monkeypatch, tmp_path, script, rank):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    if script == 'train':
        worker, args = tvm.worker, tvm.get_args(TINY + ['--device', 'cuda', '--output', str(tmp_path)])
    else:
        worker = evaluate_script.worker
        args = evaluate_script.get_args(['x.pt', '--dataset', 'digits', '--device', 'cuda'])
    with pytest.raises(StopAtInit):
        worker(rank, 2, args)
    gpu = torch.device('cuda', rank)
    assert cuda_visible['set_device'] == [gpu]  # selected before the group is joined
    [(backend, kw, collective)] = cuda_visible['init']
    assert backend == 'nccl' and kw['device_id'] == gpu and (kw['rank'], kw['world_size']) == (rank, 2)
    assert collective == gpu  # every collective's tensors will live on this GPU
    assert common.collective_device() == torch.device('cpu')  # cleanup() reset it


def test_collectives_use_the_collective_device(monkeypatch):
    """all_reduce_sum / broadcast_object / barrier place their tensors on collective_device(), whatever it is."""
    seen = []
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'all_reduce', lambda t: seen.append(('all_reduce', t.device)))
    monkeypatch.setattr(dist, 'broadcast_object_list', lambda box, src, device: seen.append(('bcast', device)))
    monkeypatch.setattr(dist, 'barrier', lambda device_ids=None: seen.append(('barrier', device_ids)))
    monkeypatch.setitem(common._collective, 'device', torch.device('cpu'))
    assert common.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    common.broadcast_object('x')
    common.barrier()
    assert seen == [('all_reduce', torch.device('cpu')), ('bcast', torch.device('cpu')), ('barrier', None)]
