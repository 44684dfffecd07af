"""Benchmark: dense (F.linear and oneDNN) vs Monarch (two-bmm reference and the compiled kernel) vs Butterfly.

For each case (tokens, in -> out, nblocks) and dtype it times forward and forward+backward with
torch.utils.benchmark (warm-up, then interleaved rounds of blocked runs: time_ms) and prints time, achieved
GFLOP/s, the dense baseline, speedup over it, the FLOP ratio dense/Monarch and speedup / ratio. On the CPU
it then times one training step of ViTAE-Tiny (224 px, batch 32) with dense and Monarch MLPs.

    python bench_kernels.py                          # default cases, CPU float32 (+ CUDA if present)
    python bench_kernels.py --device cpu --json runs/bench_cpu.json
    python bench_kernels.py --device cuda --dtypes float32 bfloat16 float16 --tensorboard runs/bench
    python bench_kernels.py --quick                  # small smoke run (seconds)
    python bench_kernels.py --device cpu --threads 1 --cpu-time   # shared machine: CPU time, 1 thread
    python bench_kernels.py --cases 4096x768x3072x4 16384x1024x1024x4 --no-e2e

A case is TOKENSxINxOUTxNBLOCKS. FLOPs come from MonarchLinear.flops / Butterfly.flops (no bias) and
2*tokens*in*out for dense; forward+backward counts 3x the forward FLOPs. If the kernel cannot be built
the script says why and benchmarks the rest.

The dense baseline of every measurement is the faster of F.linear (MKL, which takes its AVX2 code path on
AMD CPUs) and the same layer through oneDNN (`dense_onednn`: torch's packed-weight linear, AVX-512 wherever
the CPU has it); the `baseline` column names it and speedup / ratio is computed against it. The `route`
column names the CPU route the Monarch kernel chose for the shape (see cuda/monarch.cpp, "route choice"), or
`ref` where `monarch_multiply` calls the reference itself there (cuda/monarch_ops.py, dispatch by shape: no
route beats the two-bmm one, or, under 256 MFLOP, the whole op call did not beat the reference when the two were
timed): it is measured on the first call of a shape and cached; delete the cache file
(`rm "$(python -c 'from cuda import build; print(build.cpu_build_dir())')/cpu_routes.txt"`) to measure again on a
quiet machine.

On Linux a fresh multi-MiB output tensor costs its page faults on first touch (measured here: 24 ms for a
4096 x 3072 float32 tensor against 1.5 ms to refill an existing one), which weighs on every method alike and
on the faster ones most; torch's THP_MEM_ALLOC_ENABLE=1 (huge pages for large CPU allocations) removes most
of it. The header line and the JSON say whether it was set. The compiled Monarch and butterfly ops allocate
their outputs of 4 MiB and more on huge pages themselves whatever the setting, and reuse freed ones
(cuda/cpu_isa.h, empty_out); F.linear and the reference get huge pages only when it is set, and fresh memory
whenever glibc maps it anew.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import logging
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its CUDA_HOME guess is irrelevant here
from torch.utils import benchmark  # noqa: E402

import common  # noqa: E402
from layers.butterfly import Butterfly
from layers.monarch import MonarchLinear, monarch_multiply_ref

VIT = [(768, 3072), (3072, 768), (1024, 1024)]
DEFAULT_CASES = ([(4096, i, o, 4) for i, o in VIT] + [(4096, i, o, 16) for i, o in VIT] + [(4096, 4096, 4096, 4)]
                 + [(64, i, o, 4) for i, o in VIT] + [(8, 1024, 1024, 4)])
# the GPU target shapes (tokens >= 16384, n in 1024..4096, nblocks 4) on top of the ViT ones
CUDA_EXTRA = [(16384, i, o, 4) for i, o in VIT + [(1024, 4096), (4096, 1024), (2048, 2048), (4096, 4096)]]
QUICK_CASES = [(256, 256, 512, 4)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_case(text):
    try:
        t, i, o, nb = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"bad --cases entry {text!r}; use TOKENSxINxOUTxNBLOCKS, e.g. 4096x768x3072x4")
    if min(t, i, o, nb) < 1 or nb > min(i, o):
        fail(f"bad --cases entry {text!r}; need positive sizes and nblocks <= min(in, out)")
    return t, i, o, nb


def time_ms(fns, min_run_time, rounds=5, cpu_time=False):
    """name -> fn; returns name -> (ms, spread). Every fn is run once to warm up, then timed in `rounds`
    interleaved rounds (each fn once per round, a blocked run of min_run_time / rounds); ms is the median of the
    rounds' medians and spread (max - min) / ms over the rounds. On a shared machine whose capacity changes in
    streaks (seen here: by up to 40% for a second or so) a slow streak then costs one round of every method
    rather than the whole measurement of one, which would decide a comparison; the spread shows how noisy the
    row was."""
    extra = {"timer": time.process_time} if cpu_time else {}
    timers = {}
    for name, fn in fns.items():
        fn()  # warm-up (also builds/loads anything lazy)
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                                       **extra)
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            per[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds).median * 1e3)
    out = {}
    for name, v in per.items():
        ms = statistics.median(v)
        out[name] = (ms, (max(v) - min(v)) / ms if len(v) > 1 else float("nan"))  # one round: no spread
    return out


def pct(v):
    return "-" if math.isnan(v) else f"{v:.0%}"


def onednn_available():
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def onednn_dense(x, w, g):
    """The same dense layer through oneDNN (torch's own packed-weight linear, the path torch.compile's CPU
    backend uses), which runs AVX-512 wherever the CPU has it (MKL behind F.linear takes its AVX2 path on
    AMD CPUs). Forward: the weight is packed once, outside the timing (inference). Forward+backward: a
    training step changes the weight, so the packs are made inside the timing: y = x w^T, dx = g w,
    dw = g^T x, each one oneDNN product."""
    lin, pack = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    tokens = x.shape[0]
    wp = pack(w, tokens)

    def fwd():
        return lin(x, wp, None, "none", [], "")

    def fwdbwd():
        y = lin(x, pack(w, tokens), None, "none", [], "")
        dx = lin(g, pack(w.t().contiguous(), tokens), None, "none", [], "")
        dw = lin(g.t().contiguous(), pack(x.t().contiguous(), w.shape[0]), None, "none", [], "")
        return y, dx, dw
    return fwd, fwdbwd


def make_runners(case, dtype, device, kernel_ok, bfly_ok, monarch_ops):
    """name -> (forward fn, forward+backward fn, forward FLOPs)."""
    tokens, fin, fout, nb = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    opts = dict(device=device, dtype=dtype)
    mon = MonarchLinear(fin, fout, nb, bias=False, impl="ref")
    w1 = mon.blkdiag1.detach().to(**opts).requires_grad_()
    w2 = mon.blkdiag2.detach().to(**opts).requires_grad_()
    x = torch.randn(tokens, fin, generator=gen).to(**opts).requires_grad_()
    xm = F.pad(x.detach(), (0, mon.padded_in_features - fin)).requires_grad_()
    w = (torch.randn(fout, fin, generator=gen) / fin ** 0.5).to(**opts).requires_grad_()
    gd = torch.randn(tokens, fout, generator=gen).to(**opts)
    gm = torch.randn(tokens, mon.padded_out_features, generator=gen).to(**opts)

    def pair(f, inputs, grad):
        def fwd():
            with torch.no_grad():
                f()

        def fwdbwd():
            torch.autograd.grad(f(), inputs, grad)
        return fwd, fwdbwd

    runners = {"dense": pair(lambda: F.linear(x, w), (x, w), gd) + (2 * tokens * fin * fout,)}
    if device == "cpu" and dtype == torch.float32 and onednn_available():
        runners["dense_onednn"] = onednn_dense(x.detach(), w.detach(), gd) + (2 * tokens * fin * fout,)
    mflops = mon.flops(tokens)
    runners["monarch_ref"] = pair(lambda: monarch_multiply_ref(xm, w1, w2), (xm, w1, w2), gm) + (mflops,)
    if kernel_ok:
        runners["monarch_kernel"] = pair(lambda: monarch_ops.monarch_multiply(xm, w1, w2), (xm, w1, w2),
                                         gm) + (mflops,)
    if dtype == torch.float32:
        impl = "kernel" if bfly_ok else "ref"
        bf = Butterfly(fin, fout, bias=False, impl=impl, device=device, dtype=dtype)
        runners[f"butterfly_{impl}"] = pair(lambda: bf(x), (x, bf.twiddle), gd) + (bf.flops(tokens),)
    return runners


def kernel_route(monarch_ops, case, mode):
    """The CPU path the compiled op took for this case: "ref" (monarch_multiply called the reference itself),
    the forward's route, or fwd_h+bwd_h routes for a training step (cuda/monarch_ops.cpu_path)."""
    tokens, fin, fout, nb = case
    m = MonarchLinear(fin, fout, nb, bias=False, impl="ref")
    (k, q, p), (l, s, r) = m.blkdiag1.shape, m.blkdiag2.shape
    return monarch_ops.cpu_path(torch.empty(tokens, k * p), torch.empty(k, q, p),
                                torch.empty(l, s, r).requires_grad_(mode != "fwd"))


def end_to_end(args, kernel_ok, min_time, rounds):
    """One training step (forward, backward, AdamW) of ViTAE-Tiny, 224 px, 1000 classes, on the CPU: dense
    MLPs vs Monarch MLPs (nblocks 4) with the reference and with the kernel, beside the model-level FLOP
    ratio (models/flops.py, one forward, everything the model computes: attention, convolutions, norms).
    The three models' steps are timed in interleaved rounds (time_ms), one step or more per round."""
    import timm

    import models.vitae  # noqa: F401  (registers vitae_basic_* with timm)
    from models.flops import count_flops
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.e2e_batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (args.e2e_batch,), generator=gen)
    variants = [("dense", "dense", "ref"), ("monarch_ref", "monarch", "ref")]
    if kernel_ok:
        variants.append(("monarch_kernel", "monarch", "kernel"))
    print(f"\n== end to end: ViTAE-Tiny training step (fwd+bwd+AdamW), 224 px, batch {args.e2e_batch}, "
          f"float32, threads {torch.get_num_threads()}")
    print(f"{'model':>16} {'ms/step':>9} {'images/s':>9} {'GFLOP/img':>10} {'speedup':>8} {'FLOP ratio':>10} "
          f"{'spd/ratio':>9} {'spread':>6}")

    def make_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    steps, flops = {}, {}
    for name, mlp, impl in variants:
        torch.manual_seed(0)
        model = timm.create_model("vitae_basic_tiny", pretrained=False, mlp=mlp, nblocks=4, impl=impl,
                                  num_classes=1000, img_size=224)
        flops[name] = count_flops(model, x[:1])["per_image"]
        steps[name] = make_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    timed = time_ms(steps, min_time, rounds)
    rows = []
    base_ms, base_flops = timed["dense"][0], flops["dense"]
    for name, (ms, spread) in timed.items():
        row = dict(device="cpu", method=f"vitae_tiny_{name}", mode="train_step", batch=args.e2e_batch, ms=ms,
                   images_per_s=args.e2e_batch / ms * 1e3, gflop_per_image=flops[name] / 1e9,
                   speedup=base_ms / ms, flop_ratio=base_flops / flops[name],
                   frac_of_ratio=(base_ms / ms) / (base_flops / flops[name]), spread=spread)
        rows.append(row)
        print(f"{name:>16} {ms:>9.1f} {row['images_per_s']:>9.2f} {flops[name] / 1e9:>10.3f} "
              f"{row['speedup']:>8.2f} {row['flop_ratio']:>10.2f} {row['frac_of_ratio']:>9.2f} {pct(spread):>6}",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU float32, plus CUDA when a GPU is visible")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                    help="CUDA dtypes (default: float32 bfloat16 float16); CPU always uses float32")
    ap.add_argument("--cases", nargs="+", default=None, help="TOKENSxINxOUTxNBLOCKS ...")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per measurement")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds per measurement, the median reported (default 5; see time_ms)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU only: time with process CPU time instead of wall time (with --threads 1 this "
                         "is robust to other jobs sharing the cores; it also counts OpenMP spin time)")
    ap.add_argument("--quick", action="store_true", help="one small case, short timing (smoke test)")
    ap.add_argument("--no-e2e", action="store_true", help="CPU: skip the end-to-end ViTAE-Tiny training-step rows")
    ap.add_argument("--e2e-batch", type=int, default=32, help="batch of the end-to-end rows (default 32)")
    ap.add_argument("--json", default=None, help="write results + device/torch/CUDA versions here")
    ap.add_argument("--tensorboard", default=None, help="log results to this SummaryWriter folder")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    if args.min_time <= 0 or (args.threads is not None and args.threads < 1):
        fail("--min-time must be > 0 and --threads >= 1")
    if args.rounds < 1:
        fail(f"--rounds must be >= 1, got {args.rounds}")
    if args.e2e_batch < 1:
        fail("--e2e-batch must be >= 1")
    if args.cpu_time and args.device != "cpu":
        fail("--cpu-time only makes sense with --device cpu (GPU work is not CPU time)")
    cuda_runs = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.dtypes and set(args.dtypes) != {"float32"} and not cuda_runs:
        fail(f"--dtypes {' '.join(args.dtypes)}: the CPU benchmark runs float32 only (--dtypes sets the CUDA dtypes); "
             "drop --dtypes or use --device cuda")
    for flag, path in (("--json", args.json), ("--tensorboard", args.tensorboard)):
        if path:  # checked before the minutes of timing, not after (missing folders are created at the end)
            if os.path.isdir(path) and flag == "--json":
                fail(f"--json {path!r} is a folder; pass a file path")
            try:
                common.check_output_dir(os.path.dirname(os.path.abspath(path)) if flag == "--json" else path, flag)
            except common.UserError as e:
                fail(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    cases = [parse_case(c) for c in args.cases] if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
    min_time = 0.05 if args.quick else args.min_time
    rounds = 1 if args.quick else args.rounds

    from cuda import butterfly_ops, monarch_ops  # builds the extension on first use (cached)

    results = []
    for device in devices:
        kernel_ok, err = monarch_ops.kernel_available(device)
        bfly_ok = kernel_ok and butterfly_ops.kernel_available(device)[0]
        if not kernel_ok:
            print(f"[{device}] monarch_seam kernel not built ({err.strip().splitlines()[0] if err else '?'}); "
                  "benchmarking dense, reference and butterfly only")
        dts = ["float32"] if device == "cpu" else (args.dtypes or ["float32", "bfloat16", "float16"])
        dev_cases = cases + (CUDA_EXTRA if device == "cuda" and not args.cases and not args.quick else [])
        name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
        isa = f", kernel ISA {torch.ops.monarch_seam.cpu_isa()}" if kernel_ok and device == "cpu" else ""
        thp = f", THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}" if device == "cpu" else ""
        print(f"\n== {device}: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"threads {torch.get_num_threads()}{isa}{thp}")
        hdr = (f"{'tokens':>6} {'in':>5} {'out':>5} {'nb':>3} {'dtype':>8} {'mode':>7} {'method':>16} "
               f"{'ms':>9} {'GFLOP/s':>8} {'baseline':>12} {'speedup':>8} {'ratio':>6} {'spd/ratio':>9} "
               f"{'vs_ref':>7} {'spread':>6} {'route':>6}")
        print(hdr)
        print("-" * len(hdr))
        for case in dev_cases:
            for dt in dts:
                runners = make_runners(case, DTYPES[dt], device, kernel_ok, bfly_ok, monarch_ops)
                for mode, idx, mult in (("fwd", 0, 1), ("fwd+bwd", 1, 3)):
                    timed = time_ms({m: r[idx] for m, r in runners.items() if r[idx] is not None}, min_time,
                                    rounds, args.cpu_time)
                    times = {m: v[0] for m, v in timed.items()}
                    # the baseline is the fastest dense path of this measurement
                    base = min((m for m in times if m.startswith("dense")), key=times.get)
                    for method, ms in times.items():
                        flops = runners[method][2] * mult
                        dense_flops = runners["dense"][2] * mult
                        speedup = times[base] / ms
                        ratio = dense_flops / flops
                        vs_ref = times["monarch_ref"] / ms if method.startswith("monarch") else float("nan")
                        route = (kernel_route(monarch_ops, case, mode)
                                 if method == "monarch_kernel" and device == "cpu" else "")
                        row = dict(device=device, tokens=case[0], fin=case[1], fout=case[2], nblocks=case[3],
                                   dtype=dt, mode=mode, method=method, ms=ms, gflops=flops / ms / 1e6,
                                   baseline=base, speedup=speedup, flop_ratio=ratio,
                                   frac_of_ratio=speedup / ratio, vs_ref=vs_ref, spread=timed[method][1],
                                   route=route)
                        results.append(row)
                        print(f"{case[0]:>6} {case[1]:>5} {case[2]:>5} {case[3]:>3} {dt:>8} {mode:>7} {method:>16} "
                              f"{ms:>9.3f} {row['gflops']:>8.1f} {base:>12} {speedup:>8.2f} {ratio:>6.2f} "
                              f"{speedup / ratio:>9.2f} {vs_ref:>7.2f} {pct(timed[method][1]):>6} {route:>6}",
                              flush=True)
        if device == "cpu" and not args.no_e2e and not args.quick:
            results.extend(end_to_end(args, kernel_ok, min_time, rounds))

    isa = torch.ops.monarch_seam.cpu_isa() if hasattr(torch.ops.monarch_seam, "cpu_isa") else None
    meta = dict(timer="process_time" if args.cpu_time else "wall", torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), cpu=cpu_name(), cpu_kernel_isa=isa,
                threads=torch.get_num_threads(), thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        print(f"wrote {args.json}")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(args.tensorboard) as tb:
            for i, r in enumerate(results):
                tag = f"{r['device']}/{r['dtype']}/{r['mode']}/{r['method']}"
                tb.add_scalar(f"ms/{tag}", r["ms"], i)
                tb.add_scalar(f"speedup/{tag}", r["speedup"], i)
            tb.add_text("meta", json.dumps(meta))
        print(f"logged to {args.tensorboard}")


if __name__ == "__main__":
    main()
