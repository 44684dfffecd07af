"""GPU acceptance: everything this project runs on a GPU, in one command, on a machine with one NVIDIA GPU.

    bash tests/gpu_acceptance.sh OUTDIR            # (= python tests/gpu_acceptance.py OUTDIR), under 8 minutes

Steps (each one's log in OUTDIR/<step>.log, its numbers in OUTDIR/<step>.json, all of them in OUTDIR/summary.json):
  build         build the CPU and CUDA extensions, launch both ops on the GPU, run their self-checks in float32,
                bfloat16 and float16 (butterfly: float32) against the pure-PyTorch references
  pytest_cuda   `pytest -m cuda`: CUDA parity of both ops, the self-check on CUDA, a bf16 training run; fails
                if a CUDA test skipped or none ran
  train_kernel  ViTAE-Tiny (Monarch MLPs) on digits, 5 epochs, --device cuda --amp bf16 --impl kernel
  train_ref     the same with --impl ref; the two loss curves (train and val, per epoch) must agree and learn
  eval_cuda     eval.py on train_kernel's checkpoint, --device cuda, one process (also --device cpu as reference)
  eval_nccl     the same under `torchrun --nproc_per_node 1` (a real nccl group: backend recorded in the JSON)
  bench         bench_kernels.py --device cuda, bfloat16, 16384 tokens, n = 1024, 2048, 4096, nblocks 4
At the end one summary table: step, PASS/FAIL, seconds, what was measured. Exit code 0 only if every step passed.
On a machine without a visible CUDA GPU it stops before the first step with one line and exit code 2; with
--no-preflight the steps run anyway and each fails on its own (the test suite checks that none passes vacuously).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole command must fit in 8 minutes on one GPU
EPOCHS = 5
BENCH_CASES = ['16384x1024x1024x4', '16384x2048x2048x4', '16384x4096x4096x4']
TRAIN = ['train_vitae_monarch.py', '--device', 'cuda', '--amp', 'bf16', '--epochs', str(EPOCHS), '--progress', '0',
         '--seed', '0']
# Loss curves of kernel and reference in bf16: the same data, seeds and schedule, so they differ only by rounding.
LOSS_RTOL, LOSS_ATOL = 0.10, 0.05
MIN_CUDA_TESTS = 10


class StepFailed(Exception):
    """A step's check failed; the message is the one-line reason shown in the summary."""


BUILD = r'''
import json, sys, time, torch
from cuda import build, butterfly_ops, monarch_ops, selfcheck
out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "archs": build.cuda_arch_list()}
t = time.time(); out["cpu_build"] = build.load_cpu(); out["cuda_build"] = build.load_cuda()
out["build_s"] = time.time() - t
if not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU visible: the CUDA ops cannot be launched")
for ok, err in (out["cpu_build"], out["cuda_build"]):
    if not ok:
        raise SystemExit("extension build failed: " + err[-2000:])
for mod in (monarch_ops, butterfly_ops):
    ok, err = mod.kernel_available("cuda")
    if not ok:
        raise SystemExit(err)
x = torch.randn(4096, 1024, device="cuda")
w1, w2 = torch.randn(4, 256, 256, device="cuda"), torch.randn(4, 256, 256, device="cuda")
y = monarch_ops.monarch_multiply(x, w1, w2)
tw = torch.randn(1, 1, 10, 512, 2, 2, device="cuda")
b = butterfly_ops.butterfly_multiply(tw, torch.randn(8, 1, 1024, device="cuda"))
torch.cuda.synchronize()
assert y.is_cuda and b.is_cuda
probes = {}
for dt in (torch.float32, torch.bfloat16, torch.float16):
    t = time.time()
    probes["monarch_multiply/" + str(dt)] = [selfcheck.probe("monarch_multiply", "cuda", dt), time.time() - t]
t = time.time()
probes["butterfly_multiply/float32"] = [selfcheck.probe("butterfly_multiply", "cuda", torch.float32), time.time() - t]
out["selfcheck"] = probes
json.dump(out, open(sys.argv[1], "w"), indent=1)
bad = {k: v[0] for k, v in probes.items() if v[0]}
if bad:
    raise SystemExit("self-check failed: " + json.dumps(bad))
'''


def run(cmd, log, timeout, env=None):
    """Run ``cmd`` (list) from the repository root, stdout+stderr to ``log``; returns the exit code (124: timeout)."""
    with open(log, 'w') as f:
        f.write('$ ' + ' '.join(cmd) + '\n')
        f.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=dict(os.environ, **(env or {}))).returncode
        except subprocess.TimeoutExpired:
            f.write(f'\n[gpu_acceptance] timed out after {timeout} s\n')
            return 124


def last_line(log):
    """The line that says why a command failed: its last 'error: ...' line (scripts, torchrun children), else its
    last line with text."""
    lines = [ln.strip() for ln in Path(log).read_text(errors='replace').splitlines() if ln.strip(' =-\t')]
    errors = [ln for ln in lines if ln.startswith('error: ')]
    return (errors or lines or ['(empty log)'])[-1][:300]


def need_ok(rc, log):
    if rc != 0:
        raise StepFailed(f'exit code {rc}: {last_line(log)}')


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StepFailed(f'{path} missing or unreadable ({type(e).__name__})') from None


# ------------------------------------------------------------------------------------------------ checks
# Each check reads what its step left in OUTDIR and returns a one-line description, or raises StepFailed.

def check_build(out):
    r = read_json(out / 'build.json')
    worst = max(v[1] for v in r['selfcheck'].values())
    return (f"{r['gpu']} (sm {r['archs']}), built in {r['build_s']:.0f} s, 4 self-checks passed "
            f"(slowest {1000 * worst:.0f} ms)")


def check_pytest(out):
    path = out / 'pytest_cuda.xml'
    try:
        suites = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        raise StepFailed(f'{path} missing or unreadable') from None
    suites = [suites] if suites.tag == 'testsuite' else list(suites)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
    if n['failures'] or n['errors']:
        raise StepFailed(f"{n['failures']} failed, {n['errors']} errors of {n['tests']} CUDA tests")
    if n['skipped']:
        raise StepFailed(f"{n['skipped']} of {n['tests']} CUDA tests skipped (every one must run here)")
    if n['tests'] < MIN_CUDA_TESTS:
        raise StepFailed(f"only {n['tests']} CUDA tests ran, expected >= {MIN_CUDA_TESTS}")
    return f"{n['tests']} CUDA tests passed, none skipped"


def epoch_curve(run_dir):
    path = Path(run_dir) / 'log.jsonl'
    try:
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        raise StepFailed(f'{path} missing or unreadable') from None
    return [r for r in rows if 'epoch' in r]


def check_train(out):
    curves = {}
    for impl in ('kernel', 'ref'):
        run_dir = out / f'train_{impl}' / '001'
        if not (run_dir / 'last.pt').is_file():
            raise StepFailed(f'{run_dir}/last.pt missing: the {impl} run did not finish')
        curves[impl] = epoch_curve(run_dir)
        if len(curves[impl]) != EPOCHS:
            raise StepFailed(f'{impl} run logged {len(curves[impl])} epochs, expected {EPOCHS}')
    worst = 0.0
    for k, r in zip(curves['kernel'], curves['ref']):
        for key in ('train/epoch_loss', 'val/loss'):
            a, b = k[key], r[key]
            if not (math.isfinite(a) and abs(a - b) <= LOSS_ATOL + LOSS_RTOL * abs(b)):
                raise StepFailed(f"epoch {k['epoch']} {key}: kernel {a:.4f} vs ref {b:.4f} "
                                 f'(allowed {LOSS_ATOL} + {LOSS_RTOL:.0%})')
            worst = max(worst, abs(a - b) / abs(b))
    for impl, c in curves.items():
        if not c[-1]['train/epoch_loss'] < 0.8 * c[0]['train/epoch_loss']:
            raise StepFailed(f"{impl} run did not learn: train loss {c[0]['train/epoch_loss']:.3f} -> "
                             f"{c[-1]['train/epoch_loss']:.3f}")
    k, r = curves['kernel'][-1], curves['ref'][-1]
    return (f"loss curves agree (max rel diff {worst:.1%}); final val acc kernel {100 * k['val/acc']:.1f}% / "
            f"ref {100 * r['val/acc']:.1f}%; {k['speed/images_per_s']:.0f} vs {r['speed/images_per_s']:.0f} img/s")


def _top1(path, backend=None):
    r = read_json(path)
    if backend is not None and r.get('backend') != backend:
        raise StepFailed(f"{path}: process-group backend {r.get('backend')!r}, expected {backend!r}")
    row = r['results'][0]
    return row['top1'], row['samples'], r


def check_eval_cuda(out):
    cuda, n, r = _top1(out / 'eval_cuda.json')
    if not r['device'].startswith('cuda'):
        raise StepFailed(f"eval ran on {r['device']}, not on the GPU")
    cpu, _, _ = _top1(out / 'eval_cpu.json')
    if abs(cuda - cpu) * n / 100 > 2:  # float32 on both: at most two of the test images may flip
        raise StepFailed(f'top-1 on cuda {cuda:.2f}% vs cpu {cpu:.2f}% differ by more than two images')
    lat = r['results'][0].get('latency_b1_ms') or float('nan')
    return f'top-1 {cuda:.2f}% on cuda vs {cpu:.2f}% on cpu ({n} images); latency b1 {lat:.2f} ms'


def check_eval_nccl(out):
    nccl, n, _ = _top1(out / 'eval_nccl.json', backend='nccl')
    single, _, _ = _top1(out / 'eval_cuda.json')
    if abs(nccl - single) * n / 100 > 1:
        raise StepFailed(f'top-1 under nccl {nccl:.2f}% vs one process {single:.2f}%')
    return f'top-1 {nccl:.2f}% under torchrun + nccl (one process: {single:.2f}%)'


def check_bench(out):
    r = read_json(out / 'bench.json')
    rows = [x for x in r.get('results', []) if x.get('device') == 'cuda' and x.get('dtype') == 'bfloat16']
    parts = []
    for case in BENCH_CASES:
        tokens, fin, fout, nb = map(int, case.split('x'))
        for mode in ('fwd', 'fwd+bwd'):
            hit = [x for x in rows if (x['tokens'], x['fin'], x['fout'], x['nblocks'], x['mode']) ==
                   (tokens, fin, fout, nb, mode) and x['method'] == 'monarch_kernel']
            if not hit or not math.isfinite(hit[0]['ms']) or hit[0]['ms'] <= 0:
                raise StepFailed(f'no CUDA bfloat16 monarch_kernel timing for {case} {mode}')
            if mode == 'fwd+bwd':
                parts.append(f"n={fin}: {hit[0]['ms']:.3f} ms, {hit[0]['speedup']:.2f}x dense")
    return 'fwd+bwd ' + '; '.join(parts)


def steps(out):
    """(name, command, timeout s, check) in order; commands run from the repository root."""
    py = sys.executable
    ck = str(out / 'train_kernel' / '001' / 'last.pt')
    ev = [ck, '--dataset', 'digits', '--latency-iters', '5', '--latency-batch', '64']
    return [
        ('build', [py, '-c', BUILD, str(out / 'build.json')], 300, check_build),
        ('pytest_cuda', [py, '-m', 'pytest', '-m', 'cuda', '-q', '-rs', '-p', 'no:cacheprovider',
                         f'--junitxml={out / "pytest_cuda.xml"}', 'tests'], 180, check_pytest),
        ('train_kernel', [py, *TRAIN, '--impl', 'kernel', '--output', str(out / 'train_kernel')], 120, None),
        ('train_ref', [py, *TRAIN, '--impl', 'ref', '--output', str(out / 'train_ref')], 120, check_train),
        ('eval_cuda', [py, 'eval.py', *ev, '--device', 'cuda', '--json', str(out / 'eval_cuda.json')], 90, None),
        ('eval_cpu', [py, 'eval.py', *ev, '--device', 'cpu', '--latency-iters', '0', '--json',
                      str(out / 'eval_cpu.json')], 90, check_eval_cuda),
        ('eval_nccl', [py, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', 'eval.py', *ev,
                       '--device', 'cuda', '--json', str(out / 'eval_nccl.json')], 90, check_eval_nccl),
        ('bench', [py, 'bench_kernels.py', '--device', 'cuda', '--dtypes', 'bfloat16', '--min-time', '0.3',
                   '--cases', *BENCH_CASES, '--json', str(out / 'bench.json')], 150, check_bench),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('outdir', help='folder for the logs, JSON files and summary.json (created)')
    ap.add_argument('--no-preflight', action='store_true', help='run the steps even without a visible GPU')
    ap.add_argument('--steps', default='', help='comma-separated subset of the steps (default: all)')
    args = ap.parse_args(argv)
    out = Path(args.outdir).resolve()
    plan = steps(out)
    names = [s[0] for s in plan]
    only = [s for s in args.steps.split(',') if s]
    if any(s not in names for s in only):
        print(f"gpu_acceptance: unknown step in --steps {args.steps!r}; steps are {', '.join(names)}",
              file=sys.stderr)
        return 2
    if not args.no_preflight:
        import torch
        if not torch.cuda.is_available():
            print('gpu_acceptance: FAILED: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a '
                  'machine with an NVIDIA GPU and driver', file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    report = []
    for name, cmd, timeout, check in plan:
        if only and name not in only:
            continue
        t = time.time()
        log = out / f'{name}.log'
        rc = run(cmd, log, timeout)
        try:
            need_ok(rc, log)
            detail = check(out) if check else 'ok'
            status = 'PASS'
        except StepFailed as e:
            status, detail = 'FAIL', str(e)
        report.append(dict(step=name, status=status, seconds=round(time.time() - t, 1), detail=detail))
        print(f'[gpu_acceptance] {name}: {status} ({report[-1]["seconds"]} s) {detail}', flush=True)
    total = time.time() - t_all
    if not only and total > BUDGET_S:
        report.append(dict(step='total time', status='FAIL', seconds=round(total, 1),
                           detail=f'over the {BUDGET_S} s budget'))
    ok = all(r['status'] == 'PASS' for r in report)
    (out / 'summary.json').write_text(json.dumps(dict(passed=ok, total_s=round(total, 1), steps=report), indent=1))
    w = max(len(r['step']) for r in report)
    print(f"\n{'step'.ljust(w)}  status  seconds  detail")
    for r in report:
        print(f"{r['step'].ljust(w)}  {r['status']:<6}  {r['seconds']:>7.1f}  {r['detail']}")
    print(f"{'total'.ljust(w)}  {'PASS' if ok else 'FAIL':<6}  {total:>7.1f}  logs and JSON in {out}")
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
