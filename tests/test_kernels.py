"""Tests of the compiled monarch_seam ops (cuda/): CPU op vs the pure-PyTorch references in layers/,
gradcheck, opcheck, torch.compile, the CUDA build (nvcc, no GPU needed), CUDA parity (GPU only),
the fallback when the build fails, and a smoke run of bench_kernels.py.

    python -m pytest tests/test_kernels.py -q -x

The first run builds the CPU extension (~30 s) and the CUDA one (a few minutes) into
~/.cache/monarch_seam_ext (or $MONARCH_SEAM_EXT_DIR); later runs reuse them.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

from cuda import build
from layers.butterfly import butterfly_multiply_ref
from layers.monarch import MonarchLinear, monarch_multiply_ref

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ops():
    """Builds (once per session, cached on disk) and registers the CPU ops."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH, the extension cannot be built")
    from cuda import butterfly_ops, monarch_ops
    ok, err = monarch_ops.kernel_available()
    assert ok, f"CPU extension failed to build: {err}"
    ok, err = butterfly_ops.kernel_available()
    assert ok, err
    return monarch_ops, butterfly_ops


def factors(k, q, p, l, s, r, dtype, device="cpu", gen=None):
    w1 = torch.randn(k, q, p, dtype=dtype, device=device, generator=gen) / math.sqrt(p)
    w2 = torch.randn(l, s, r, dtype=dtype, device=device, generator=gen) / math.sqrt(r)
    return w1, w2


def linear_shapes(i, o, nb):
    m = MonarchLinear(i, o, nb, bias=False)
    return tuple(m.blkdiag1.shape) + tuple(m.blkdiag2.shape)


# (k, q, p, l, s, r) with k*q == l*r: square, rectangular, K != L, Q not divisible by L,
# Q < L (nblocks large), L == 1, and the shapes MonarchLinear makes for odd sizes.
SHAPES = [
    (4, 8, 8, 4, 8, 8),
    (4, 6, 5, 4, 3, 6),
    (3, 5, 4, 5, 2, 3),
    (4, 8, 8, 2, 5, 16),
    (16, 2, 3, 4, 6, 8),
    (1, 4, 5, 1, 3, 4),
    (2, 96, 40, 2, 64, 96),   # direct strided-row path (Q/L >= 24)
    linear_shapes(37, 100, 3),
    linear_shapes(100, 37, 3),
    linear_shapes(96, 384, 4),
    linear_shapes(50, 50, 7),
]


def check_close(got, want, tol):
    for name, a, b in zip(("out", "dx", "dw1", "dw2"), got, want):
        err = (a - b).abs().max().item()
        scale = b.abs().max().item() + 1e-30
        assert err <= tol * scale, f"{name}: max abs err {err:.3e} vs scale {scale:.3e}"


# Leading batch dims: 300 rows span several tiles of the packed-GEMM engine plus a ragged one; 5 rows are
# below the op's tuning threshold (the ATen route). Both are flattened by the wrapper. Which route the
# larger calls take here depends on this CPU's timings: every route is tested by name below.
BATCHES = [(3, 100), (5,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "B" + "x".join(map(str, b)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_monarch_cpu_matches_reference(ops, shape, batch, dtype):
    monarch_ops, _ = ops
    k, q, p, l, s, r = shape
    gen = torch.Generator().manual_seed(sum(shape))
    w1, w2 = factors(*shape, dtype, gen=gen)
    x = torch.randn(*batch, k * p, dtype=dtype, generator=gen)
    grad = torch.randn(*batch, l * s, dtype=dtype, generator=gen)
    outs = []
    for fn in (monarch_ops.monarch_multiply, monarch_multiply_ref):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = fn(xs, a, b)
        outs.append((y,) + torch.autograd.grad(y, (xs, a, b), grad))
    assert outs[0][0].shape == (*batch, l * s)
    check_close(outs[0], outs[1], 2e-5 if dtype == torch.float32 else 1e-12)


# The same comparison in a fresh process for every register kernel this CPU can run (the ISA is chosen
# once per process) and every CPU route of the op, forced by MONARCH_SEAM_CPU_ROUTE ("auto": the measured
# choice, with the route cache in a temporary file). Shapes: square, rectangular, non-divisible, L == 1,
# Q < L, L = 2, 4, 8, 16 (the lane GEMM of stage 2 for L = 2, 4, the vectorised interleaves otherwise and for
# L = 4 with R = 256, over a k-slice; for L >= 8 also the split of h into groups) with
# widths that leave a vector tail, block widths that take each of the ISA's register-kernel widths, S > R (the
# backward splits g and h into groups; with R one full panel, its split h is used as packed), and one
# whose output is made in column chunks (L * tile * S over a quarter of the L2). Also gradcheck and opcheck.
PATHS_SCRIPT = """
import json, math, os, torch
from torch.library import opcheck
from cuda import monarch_ops
from layers.monarch import monarch_multiply_ref
assert monarch_ops.kernel_available()[0]
worst = 0.0
SHAPES = [(4, 8, 8, 4, 8, 8), (3, 5, 4, 5, 2, 3), (16, 2, 3, 4, 6, 8), (2, 96, 40, 2, 64, 96),
          (1, 4, 5, 1, 3, 4), (4, 20, 25, 4, 25, 20), (2, 12, 8, 2, 37, 12),
          (4, 75, 10, 4, 300, 75), (4, 16, 64, 16, 48, 4), (16, 4, 6, 16, 20, 4),
          (8, 6, 5, 8, 33, 6), (16, 32, 8, 16, 12, 32), (8, 20, 4, 8, 6, 20), (4, 64, 64, 4, 64, 64),
          (4, 16, 8, 4, 40, 16), (1, 16, 8, 1, 20, 16), (4, 256, 8, 4, 16, 256)]
# the engine's panel widths these shapes' GEMMs use (output widths Q, S forward; R, P, Q backward)
widths = {str(dt): sorted({torch.ops.monarch_seam._cpu_panel_width(n, dt) for sh in SHAPES for n in sh[1:3] + sh[4:]})
          for dt in (torch.float32, torch.float64)}
# whether the engine's forward made stage 2 with a lane kernel (L = 2, 4 floats or 2 doubles, R in one k-slice)
lanes = sorted({torch.ops.monarch_seam._cpu_fwd_lanes([300, sh[0], sh[2], sh[1], sh[3], sh[4], sh[5]], dt)
                for sh in SHAPES for dt in (torch.float32, torch.float64)})
for (k, q, p, l, s, r) in SHAPES:
    for rows in (1, 7, 70, 300):
        for dt in (torch.float32, torch.float64):
            g = torch.Generator().manual_seed(rows + k)
            w1 = torch.randn(k, q, p, dtype=dt, generator=g) / math.sqrt(p)
            w2 = torch.randn(l, s, r, dtype=dt, generator=g) / math.sqrt(r)
            x = torch.randn(rows, k * p, dtype=dt, generator=g)
            gr = torch.randn(rows, l * s, dtype=dt, generator=g)
            res = []
            for fn in (monarch_ops.monarch_multiply, monarch_multiply_ref):
                args = [t.clone().requires_grad_() for t in (x, w1, w2)]
                y = fn(*args)
                res.append([y] + list(torch.autograd.grad(y, args, gr)))
            with torch.no_grad():  # the forward without the saved intermediate
                res[0].append(monarch_ops.monarch_multiply(x, w1, w2))
            res[0].extend(torch.ops.monarch_seam.monarch_bwd(gr, x, w1, w2, None))  # backward, recomputing h
            res[1].extend(res[1][:4])
            for a, b in zip(*res):
                worst = max(worst, ((a - b).abs().max() / (b.abs().max() + 1e-30)).item() / (2e-5 if dt == torch.float32 else 1e-12))
torch.manual_seed(3)
w1 = torch.randn(3, 4, 2, dtype=torch.float64)
w2 = torch.randn(2, 3, 6, dtype=torch.float64)
x = torch.randn(9, 6, dtype=torch.float64)
args = [t.clone().requires_grad_() for t in (x, w1, w2)]
assert torch.autograd.gradcheck(monarch_ops.monarch_multiply, args)
_, h = torch.ops.monarch_seam.monarch_fwd_h(x, w1, w2)
opcheck(torch.ops.monarch_seam.monarch_fwd_h.default, tuple(args))
opcheck(torch.ops.monarch_seam.monarch_bwd.default, (torch.randn(9, 6, dtype=torch.float64), x, w1, w2, h))
dims = [300, 4, 10, 75, 4, 300, 75]
print(json.dumps({"isa": torch.ops.monarch_seam.cpu_isa(), "worst": worst, "widths": widths, "lanes": lanes,
                  "route": torch.ops.monarch_seam.cpu_route("fwd_h", dims, torch.float32)}))
"""


# The engine's panel widths per ISA, in floats (cuda/monarch.cpp, engine()).
WIDTHS = {"avx512": [16, 32, 48, 64], "avx2": [8, 16, 24], "base": [4, 8, 12]}


def _supported_isas():
    isa = torch.ops.monarch_seam.cpu_isa()
    return {"avx512": ["avx512", "avx2", "base"], "avx2": ["avx2", "base"], "base": ["base"]}[isa]


@pytest.mark.parametrize("isa,route", [("avx512", "engine"), ("avx2", "engine"), ("base", "engine"),
                                       ("avx512", "aten"), ("avx512", "blas"), ("avx512", "auto")])
def test_monarch_cpu_paths_in_fresh_process(ops, isa, route, tmp_path):
    if isa not in _supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} register kernel")
    env = dict(os.environ, MONARCH_SEAM_CPU_ISA=isa, MONARCH_SEAM_CPU_ROUTE=route, OMP_NUM_THREADS="2",
               MONARCH_SEAM_TUNE_FILE=str(tmp_path / "routes.txt"))
    res = subprocess.run([sys.executable, "-c", PATHS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa
    assert out["worst"] <= 1.0, out  # every error within its dtype tolerance (2e-5 / 1e-12 of the scale)
    # every register-kernel width of this ISA was used by some GEMM (floats; doubles have half the columns)
    assert out["widths"] == {"torch.float32": WIDTHS[isa], "torch.float64": [w // 2 for w in WIDTHS[isa]]}, out
    # some shapes took the forward's lane GEMM (L = 2, 4 with R in one k-slice) and some the block GEMMs
    # (L = 1, 3, 5, 8, 16, and L = 4 with R = 256 over a k-slice)
    assert out["lanes"] == [False, True], out
    # a forced route is the one taken; "auto" measured all three and kept one
    assert out["route"] == route if route != "auto" else out["route"] in ("engine", "aten", "blas"), out


def test_monarch_cpu_route_override_rejects_bad_value():
    env = dict(os.environ, MONARCH_SEAM_CPU_ROUTE="fastest")
    code = ("import torch; from cuda import monarch_ops; monarch_ops.kernel_available(); "
            "monarch_ops.monarch_multiply(torch.randn(300, 64), torch.randn(4, 16, 16), torch.randn(4, 16, 16))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "MONARCH_SEAM_CPU_ROUTE must be auto, engine, aten or blas" in res.stderr


# The route cache: a first process measures and writes it, a second one reads it without measuring; a file
# with a damaged line or from another CPU is ignored with one warning and rewritten.
TUNE_SCRIPT = """
import json, warnings, torch
from cuda import monarch_ops
dims = [512, 4, 32, 32, 4, 32, 32]
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    assert monarch_ops.kernel_available()[0]  # loads the extension and reads the route file
    before = torch.ops.monarch_seam.cpu_route("fwd", dims, torch.float32)
    monarch_ops.monarch_multiply(torch.randn(512, 128), torch.randn(4, 32, 32), torch.randn(4, 32, 32))
print(json.dumps({"before": before, "after": torch.ops.monarch_seam.cpu_route("fwd", dims, torch.float32),
                  "warnings": [str(w.message) for w in rec if "route cache" in str(w.message)]}))
"""


def _run_tune(path):
    env = dict(os.environ, MONARCH_SEAM_TUNE_FILE=str(path), OMP_NUM_THREADS="2")
    env.pop("MONARCH_SEAM_CPU_ROUTE", None)
    res = subprocess.run([sys.executable, "-c", TUNE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_route_file_folder_is_the_build_folder(ops):
    # The documented way to clear the route cache asks cuda.build.cpu_build_dir() in a fresh process, before any
    # build; the op keeps its file in cpu_build_dir() as seen after loading. They must be one folder, the build's
    # (cpp_extension.load once appended to the flag lists it was given, which moved the hash after a build).
    code = ("import os, json; from cuda import build, monarch_ops; a = build.cpu_build_dir(); "
            "assert monarch_ops.kernel_available()[0]; print(json.dumps([a, build.cpu_build_dir(), os.listdir(a)]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    before, after, files = json.loads(res.stdout.strip().splitlines()[-1])
    assert before == after and "monarch_seam_cpu.so" in files, (before, after, files)


def test_monarch_cpu_route_cache(ops, tmp_path):
    path = tmp_path / "routes.txt"
    first = _run_tune(path)
    assert first["before"] == "" and first["after"] in ("engine", "aten", "blas") and not first["warnings"]
    lines = path.read_text().splitlines()
    assert lines[0].startswith("monarch_seam cpu routes v1\t") and lines[0].endswith("|" + torch.ops.monarch_seam.cpu_isa())
    assert any(ln.startswith("fwd B<=512 K4 P32 Q32 L4 S32 R32 Float") for ln in lines[1:]), lines
    second = _run_tune(path)  # decided before the call: read from the file, nothing measured
    assert second["before"] == first["after"] and not second["warnings"]

    key, route, check = [ln for ln in lines[1:] if ln.startswith("fwd B<=512")][0].split("\t")
    other = "aten" if route != "aten" else "engine"
    path.write_text("\n".join([lines[0], f"{key}\t{other}\t{check}"]) + "\n")  # route edited, check not
    damaged = _run_tune(path)
    assert damaged["before"] == "" and len(damaged["warnings"]) == 1, damaged
    assert "fails its check" in damaged["warnings"][0] and str(path) in damaged["warnings"][0]
    assert path.read_text().splitlines()[0] == lines[0] and _run_tune(path)["before"] != ""  # rewritten whole

    path.write_text("monarch_seam cpu routes v1\tSome Other CPU|avx2\n" + "\n".join(lines[1:]) + "\n")
    foreign = _run_tune(path)
    assert foreign["before"] == "" and len(foreign["warnings"]) == 1 and "another CPU" in foreign["warnings"][0]
    assert path.read_text().splitlines()[0] == lines[0]


# The op-versus-reference verdict (products under 256 MFLOP): measured as whole calls on the first call of a key,
# written to the route file as a "call_" line, read back by the next process without measuring; the path follows
# it ("ref": the reference itself, bit for bit). A verdict line with a value other than op/ref fails its check.
VERDICT_SCRIPT = """
import json, torch
from cuda import monarch_ops
from layers.monarch import monarch_multiply_ref
assert monarch_ops.kernel_available()[0]
measured = []
real = monarch_ops._measure_verdict
def spy(*a):
    measured.append(a[:3])
    return FORCE or real(*a)
monarch_ops._measure_verdict = spy
g = torch.Generator().manual_seed(0)
x, w1, w2 = torch.randn(48, 64, generator=g), torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
with torch.no_grad():
    path = monarch_ops.cpu_path(x, w1, w2)
    same = torch.equal(monarch_ops.monarch_multiply(x, w1, w2), monarch_multiply_ref(x, w1, w2))
leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
gpath = monarch_ops.cpu_path(*leaves)
print(json.dumps({"path": path, "gpath": gpath, "same": same, "measured": [[a, str(b), c] for a, b, c in measured],
                  "verdict": torch.ops.monarch_seam._cpu_verdict("fwd", [48, 4, 16, 16, 4, 16, 16], torch.float32)}))
"""


def _run_verdict(path, force=None):
    env = dict(os.environ, MONARCH_SEAM_TUNE_FILE=str(path), OMP_NUM_THREADS="2")
    env.pop("MONARCH_SEAM_CPU_ROUTE", None)
    res = subprocess.run([sys.executable, "-c", f"FORCE = {force!r}\n" + VERDICT_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def test_monarch_cpu_verdict_measured_cached_and_followed(ops, tmp_path):
    path = tmp_path / "routes.txt"
    first, _ = _run_verdict(path)  # measured for real: either answer is right, the path must follow it
    assert first["measured"] == [[False, "torch.float32", 48], [True, "torch.float32", 48]], first
    assert first["verdict"] in ("op", "ref")
    assert first["path"] == ("ref" if first["verdict"] == "ref" else "aten"), first  # 0.2 MFLOP: the aten route
    assert first["same"] or first["path"] != "ref"
    lines = path.read_text().splitlines()
    calls = [ln for ln in lines if ln.startswith("call_")]
    assert sorted(ln.split(" ")[0] for ln in calls) == ["call_fwd", "call_fwd_h"], lines
    assert all(ln.split(" ")[1] == "B<=64" and ln.split("\t")[1] in ("op", "ref") for ln in calls), calls
    second, _ = _run_verdict(path, force="op")  # read back: nothing measured, same paths
    assert second["measured"] == [] and (second["path"], second["gpath"]) == (first["path"], first["gpath"])

    for want, path_want in (("ref", "ref"), ("op", "aten")):  # a fresh file each: the path follows the verdict
        fresh = tmp_path / f"routes_{want}.txt"
        got, _ = _run_verdict(fresh, force=want)
        assert (got["path"], got["gpath"], got["verdict"]) == (path_want, path_want, want), got
        assert got["same"] or want == "op"  # the reference branch is the reference, bit for bit

    key, value, check = calls[0].split("\t")
    path.write_text("\n".join([lines[0], f"{key}\tengine\t{_fnv1a(key + chr(9) + 'engine')}"]) + "\n")
    damaged, err = _run_verdict(path, force="ref")  # a route name where a verdict belongs: ignored, warned
    assert "fails its check" in err and len(damaged["measured"]) == 2, (damaged, err[-500:])


def test_monarch_cpu_isa_override_rejects_bad_value():
    env = dict(os.environ, MONARCH_SEAM_CPU_ISA="sse9")
    code = "from cuda import monarch_ops; monarch_ops.kernel_available(); import torch; torch.ops.monarch_seam.cpu_isa()"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "MONARCH_SEAM_CPU_ISA must be avx512, avx2 or base" in res.stderr


def test_monarch_matches_dense_matrix(ops):
    """Independent of both implementations: compare with MonarchLinear.to_dense()."""
    monarch_ops, _ = ops
    torch.manual_seed(0)
    m = MonarchLinear(24, 40, nblocks=4, bias=False, dtype=torch.float64, impl="ref")
    x = torch.randn(5, 24, dtype=torch.float64)
    y = monarch_ops.monarch_multiply(x, m.blkdiag1, m.blkdiag2)[:, :40]
    torch.testing.assert_close(y, x @ m.to_dense().T)


def test_monarch_no_grad_and_recompute_paths(ops):
    """monarch_fwd (no saved h) and monarch_bwd(h=None) agree with the saved-h path."""
    torch.manual_seed(1)
    k, q, p, l, s, r = linear_shapes(100, 37, 3)
    w1, w2 = factors(k, q, p, l, s, r, torch.float64)
    x = torch.randn(70, k * p, dtype=torch.float64)
    g = torch.randn(70, l * s, dtype=torch.float64)
    out, h = torch.ops.monarch_seam.monarch_fwd_h(x, w1, w2)
    torch.testing.assert_close(torch.ops.monarch_seam.monarch_fwd(x, w1, w2), out)
    for a, b in zip(torch.ops.monarch_seam.monarch_bwd(g, x, w1, w2, h),
                    torch.ops.monarch_seam.monarch_bwd(g, x, w1, w2, None)):
        torch.testing.assert_close(a, b)


def test_monarch_bf16_cpu(ops):
    monarch_ops, _ = ops
    torch.manual_seed(2)
    w1, w2 = factors(4, 8, 8, 4, 8, 8, torch.float32)
    x = torch.randn(33, 32)
    got = monarch_ops.monarch_multiply(x.bfloat16(), w1.bfloat16(), w2.bfloat16())
    assert got.dtype == torch.bfloat16
    want = monarch_multiply_ref(x.double(), w1.double(), w2.double())
    assert (got.double() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("rows", [6, 66])  # every route is gradchecked by name in the fresh-process test
def test_monarch_gradcheck(ops, rows):
    monarch_ops, _ = ops
    torch.manual_seed(3)
    for shape in [(3, 4, 2, 2, 3, 6), (2, 3, 2, 3, 2, 2)]:
        k, q, p, l, s, r = shape
        w1, w2 = factors(*shape, torch.float64)
        x = torch.randn(2, rows // 2, k * p, dtype=torch.float64)
        args = [t.requires_grad_() for t in (x, w1, w2)]
        assert torch.autograd.gradcheck(monarch_ops.monarch_multiply, args)


def test_monarch_bad_arguments(ops):
    monarch_ops, _ = ops
    with pytest.raises(ValueError, match="K\\*Q == L\\*R"):
        monarch_ops.monarch_multiply(torch.randn(2, 8), torch.randn(2, 3, 4), torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match="x.shape"):
        monarch_ops.monarch_multiply(torch.randn(2, 7), torch.randn(2, 2, 4), torch.randn(2, 2, 2))


def test_unsupported_device_signals_not_implemented(ops):
    """NotImplementedError is what layers/*.py catch to fall back to the reference."""
    monarch_ops, butterfly_ops = ops
    with pytest.raises(NotImplementedError):
        monarch_ops.monarch_multiply(*(torch.empty(s, device="meta") for s in ((2, 8), (2, 2, 4), (2, 2, 2))))
    with pytest.raises(NotImplementedError):
        butterfly_ops.butterfly_multiply(torch.empty(1, 1, 2, 2, 2, 2, device="meta"),
                                         torch.empty(3, 1, 4, device="meta"))


@pytest.mark.parametrize("rows", [5, 70])
def test_opcheck(ops, rows):
    torch.manual_seed(4)
    w1, w2 = factors(3, 4, 2, 2, 3, 6, torch.float64)
    x = torch.randn(rows, 6, dtype=torch.float64)
    g = torch.randn(rows, 6, dtype=torch.float64)
    _, h = torch.ops.monarch_seam.monarch_fwd_h(x, w1, w2)
    req = [t.clone().requires_grad_() for t in (x, w1, w2)]
    opcheck(torch.ops.monarch_seam.monarch_fwd.default, tuple(req))
    opcheck(torch.ops.monarch_seam.monarch_fwd_h.default, tuple(req))
    opcheck(torch.ops.monarch_seam.monarch_bwd.default, (g, x, w1, w2, h))
    opcheck(torch.ops.monarch_seam.monarch_bwd.default, (g, x, w1, w2, None))
    tw = torch.randn(2, 2, 3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.monarch_seam.butterfly_fwd.default, (tw, xb, True))
    opcheck(torch.ops.monarch_seam.butterfly_bwd.default, (torch.randn(3, 2, 8, dtype=torch.float64),
                                                           tw.detach(), xb.detach(), False))


def _mlp(x, w1, w2, v1, v2):
    from cuda.monarch_ops import monarch_multiply
    return monarch_multiply(torch.relu(monarch_multiply(x, w1, w2)), v1, v2).sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(ops, backend):
    torch.manual_seed(5)
    torch._dynamo.reset()
    w1, w2 = factors(2, 4, 4, 2, 4, 4, torch.float32)
    v1, v2 = factors(2, 4, 4, 2, 4, 4, torch.float32)
    x = torch.randn(6, 8)
    params = [t.requires_grad_() for t in (w1, w2, v1, v2)]
    fn = torch.compile(_mlp, fullgraph=True, backend=backend)
    got = fn(x, *params)
    g_got = torch.autograd.grad(got, params)
    want = _mlp(x, *params)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- butterfly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nstacks,nblocks,log_n,inc", [(1, 1, 1, True), (1, 1, 5, True), (2, 2, 4, False),
                                                       (3, 3, 3, True), (1, 2, 6, False)])
def test_butterfly_cpu_matches_reference(ops, nstacks, nblocks, log_n, inc, dtype):
    _, butterfly_ops = ops
    gen = torch.Generator().manual_seed(nstacks * 100 + nblocks * 10 + log_n)
    n = 1 << log_n
    tw = torch.randn(nstacks, nblocks, log_n, n // 2, 2, 2, dtype=dtype, generator=gen) / math.sqrt(2)
    x = torch.randn(37, nstacks, n, dtype=dtype, generator=gen)
    g = torch.randn(37, nstacks, n, dtype=dtype, generator=gen)
    res = []
    for fn in (butterfly_ops.butterfly_multiply, butterfly_multiply_ref):
        t, xx = tw.clone().requires_grad_(), x.clone().requires_grad_()
        y = fn(t, xx, inc)
        res.append((y,) + torch.autograd.grad(y, (t, xx), g))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(*res):
        assert (a - b).abs().max() <= tol * (b.abs().max() + 1e-30)


def test_butterfly_cpu_large_outputs_match_reference(ops):
    """Outputs and dx of 4 MiB and more come from the huge-page allocation (cuda/cpu_isa.h, empty_out); the
    incoming gradient is a non-contiguous view, which the backward copies into its dx."""
    _, butterfly_ops = ops
    gen = torch.Generator().manual_seed(9)
    n, log_n = 1024, 10
    tw = torch.randn(1, 1, log_n, n // 2, 2, 2, generator=gen) / math.sqrt(2)
    x = torch.randn(1100, 1, n, generator=gen)
    g = torch.randn(n, 1, 1100, generator=gen).permute(2, 1, 0)  # (1100, 1, n), not contiguous
    assert x.numel() * 4 >= 4 << 20 and not g.is_contiguous()
    res = []
    for fn in (butterfly_ops.butterfly_multiply, butterfly_multiply_ref):
        t, xx = tw.clone().requires_grad_(), x.clone().requires_grad_()
        y = fn(t, xx, True)
        res.append((y,) + torch.autograd.grad(y, (t, xx), g))
    for a, b in zip(*res):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()


REUSE_SCRIPT = """
import math, torch
from cuda import butterfly_ops, monarch_ops
from layers.butterfly import butterfly_multiply_ref
from layers.monarch import monarch_multiply_ref
assert monarch_ops.kernel_available()[0] and butterfly_ops.kernel_available()[0]
g = torch.Generator().manual_seed(3)
w1 = torch.randn(4, 256, 256, generator=g) / 16
w2 = torch.randn(4, 256, 256, generator=g) / 16
tw = torch.randn(1, 1, 10, 512, 2, 2, generator=g) / math.sqrt(2)
xs = [torch.randn(1100, 1024, generator=g) for _ in range(4)]  # 4.3 MiB outputs
with torch.no_grad():
    for fn, ref, args in ((monarch_ops.monarch_multiply, monarch_multiply_ref, lambda x: (x, w1, w2)),
                          (butterfly_ops.butterfly_multiply, butterfly_multiply_ref, lambda x: (tw, x[:, None], True))):
        kept = fn(*args(xs[0]))               # stays alive while later outputs come and go
        freed = fn(*args(xs[1])).data_ptr()   # freed at once: its block is kept for the next output
        again = fn(*args(xs[2]))              # takes that block
        assert again.data_ptr() == freed, fn
        fn(*args(xs[3])).fill_(float("nan"))  # a freed output scribbled on
        for y, x in ((kept, xs[0]), (again, xs[2])):
            want = ref(*args(x))
            assert (y - want).abs().max() <= 1e-5 * want.abs().max(), fn
        assert kept.data_ptr() != again.data_ptr()
print("REUSE_OK")
"""


def test_reused_large_outputs_are_correct(ops):
    """Large outputs (>= 4 MiB) reuse freed blocks (cuda/cpu_isa.h, empty_out): an output kept alive is never
    handed out again, and a reused block holds the new result only. The Monarch op on its engine route (which
    allocates through empty_out), in a fresh process."""
    env = dict(os.environ, MONARCH_SEAM_CPU_ROUTE="engine", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", REUSE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "REUSE_OK" in res.stdout, res.stdout + res.stderr[-3000:]


def test_butterfly_matches_fft_structure(ops):
    """Independent check: a one-factor butterfly with n=2 is a plain 2x2 matrix product."""
    _, butterfly_ops = ops
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).reshape(1, 1, 1, 1, 2, 2)
    x = torch.tensor([[[5.0, 7.0]]], dtype=torch.float64)
    y = butterfly_ops.butterfly_multiply(t, x, True)
    torch.testing.assert_close(y, torch.tensor([[[19.0, 43.0]]], dtype=torch.float64))


def test_butterfly_gradcheck(ops):
    _, butterfly_ops = ops
    torch.manual_seed(6)
    tw = torch.randn(2, 2, 3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    for inc in (True, False):
        assert torch.autograd.gradcheck(lambda t, xx: butterfly_ops.butterfly_multiply(t, xx, inc), (tw, x))


# ----------------------------------------------------------------------------- CUDA
def test_cuda_sources_compile_with_nvcc(ops):
    """Builds the CUDA extension with nvcc (default archs 8.0;9.0 when no GPU is visible) and loads it:
    loading needs the CUDA runtime library, not a GPU."""
    if torch.version.cuda is None:
        pytest.skip("torch was built without CUDA, so the CUDA extension cannot be built against it")
    if build.find_cuda_home() is None:
        pytest.skip("nvcc / CUDA toolkit not found (set CUDA_HOME)")
    ok, err = build.load_cuda()
    assert ok, f"nvcc build failed: {err[-3000:]}"
    for op in ("monarch_fwd", "monarch_fwd_h", "monarch_bwd", "butterfly_fwd", "butterfly_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"monarch_seam::{op}", "CUDA"), op


def test_find_cuda_home_follows_nvcc_wrapper(tmp_path, monkeypatch):
    """An `nvcc` wrapper script outside the toolkit (torch's guess would be its parent folder)."""
    kit = tmp_path / "cuda-13.0"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "include" / "cuda_runtime.h").write_text("")
    (kit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    for f in (kit / "bin" / "nvcc", wrap / "nvcc"):
        f.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrap))
    monkeypatch.setattr(build, "STANDARD_CUDA", str(tmp_path / "missing"))
    assert build.find_cuda_home() == str(kit.resolve())
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))  # a bad CUDA_HOME is skipped, not trusted
    assert build.find_cuda_home() == str(kit.resolve())


# The CUDA op is a plan of strided batched GEMMs (cuda/monarch_plan.h); the CPU extension returns that
# exact plan, so its index algebra (views, permutations folded into loads/stores, buffer roles) is
# executed here by emulation on machines without a GPU. Only the kernels' inner loops need a GPU test.
PLAN_FIELDS = 19
PLAN_BUFS = ("x", "w1", "w2", "g", "hp", "dh", "out", "dx", "dw1", "dw2")


def _emulate_gemm(spec, bufs, written):
    a, b, c, batch, M, N, Kd, abs_, ars, acs, bbs, brs, bcs, cbs, crs, ccs, pq, pl, plane = spec
    z = torch.arange(batch).view(-1, 1, 1)
    i, k = torch.arange(M).view(1, -1, 1), torch.arange(Kd).view(1, 1, -1)
    A = bufs[PLAN_BUFS[a]].reshape(-1)[z * abs_ + i * ars + k * acs]           # (batch, M, Kd)
    kk, n = torch.arange(Kd).view(1, -1, 1), torch.arange(N).view(1, 1, -1)
    Bm = bufs[PLAN_BUFS[b]].reshape(-1)[z * bbs + kk * brs + n * bcs]          # (batch, Kd, N)
    if pl > 0:
        t = z * pq + n
        idx = (t % pl) * plane + i * crs + t // pl
    else:
        idx = z * cbs + i * crs + n * ccs
    idx = idx.expand(batch, M, N).reshape(-1)
    dst = bufs[PLAN_BUFS[c]].view(-1)
    assert idx.min() >= 0 and idx.max() < dst.numel(), "store out of range"
    assert idx.unique().numel() == idx.numel(), "two results stored to one place"
    dst[idx] = (A @ Bm).reshape(-1)
    written[PLAN_BUFS[c]] = written.get(PLAN_BUFS[c], 0) + idx.numel()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_gemm_plan_by_emulation(ops, shape):
    k, q, p, l, s, r = shape
    B = 7
    gen = torch.Generator().manual_seed(11 + sum(shape))
    w1, w2 = factors(*shape, torch.float64, gen=gen)
    x = torch.randn(B, k * p, dtype=torch.float64, generator=gen)
    g = torch.randn(B, l * s, dtype=torch.float64, generator=gen)
    nan = lambda *sz: torch.full(sz, float("nan"), dtype=torch.float64)
    bufs = dict(x=x, w1=w1, w2=w2, g=g, hp=nan(B * k * q), dh=nan(B * k * q), out=nan(B, l * s),
                dx=nan(B, k * p), dw1=nan(k, q, p), dw2=nan(l, s, r))
    flat = torch.ops.monarch_seam._cuda_plan([B, k, p, q, l, s, r])
    specs = [flat[j:j + PLAN_FIELDS] for j in range(0, len(flat), PLAN_FIELDS)]
    assert len(specs) == 6
    written = {}
    for spec in specs:
        _emulate_gemm(spec, bufs, written)
    for name in ("hp", "dh", "out", "dx", "dw1", "dw2"):  # every element written exactly once
        assert written[name] == bufs[name].numel() and not bufs[name].isnan().any(), name
    xs, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
    y = monarch_multiply_ref(xs, a, b)
    want = (y,) + torch.autograd.grad(y, (xs, a, b), g)
    for name, got, ref in zip(("out", "dx", "dw1", "dw2"), (bufs["out"], bufs["dx"], bufs["dw1"], bufs["dw2"]), want):
        torch.testing.assert_close(got, ref, msg=name)


def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("io_nb", [(768, 3072, 4), (1000, 600, 3), (1024, 1024, 16)])
def test_monarch_cuda_parity(ops, io_nb, dtype):
    """Flash-attention tolerance rule: kernel error vs float64 <= 2x the error of PyTorch's own
    reference path in the same dtype (+ a tiny floor)."""
    monarch_ops, _ = ops
    ok, err = monarch_ops.kernel_available("cuda")
    assert ok, err
    torch.manual_seed(7)
    k, q, p, l, s, r = linear_shapes(*io_nb)
    w1, w2 = factors(k, q, p, l, s, r, torch.float64, device="cuda")
    x = torch.randn(2048, k * p, dtype=torch.float64, device="cuda")
    g = torch.randn(2048, l * s, dtype=torch.float64, device="cuda")

    def run(fn, dt):
        xs, a, b = (t.to(dt).requires_grad_() for t in (x, w1, w2))
        y = fn(xs, a, b)
        return (y,) + torch.autograd.grad(y, (xs, a, b), g.to(dt))

    exact = run(monarch_multiply_ref, torch.float64)
    base = run(monarch_multiply_ref, dtype)
    got = run(monarch_ops.monarch_multiply, dtype)
    for name, a, b, e in zip(("out", "dx", "dw1", "dw2"), got, base, exact):
        assert a.dtype == dtype
        assert _rel_err(a, e) <= 2 * _rel_err(b, e) + 1e-6, name


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible")
def test_butterfly_cuda_parity(ops):
    _, butterfly_ops = ops
    ok, err = butterfly_ops.kernel_available("cuda")
    assert ok, err
    torch.manual_seed(8)
    tw = torch.randn(2, 2, 8, 128, 2, 2, device="cuda") / math.sqrt(2)
    x = torch.randn(300, 2, 256, device="cuda")
    g = torch.randn_like(x)
    res = []
    for fn, dt in ((butterfly_ops.butterfly_multiply, torch.float32), (butterfly_multiply_ref, torch.float64)):
        t, xx = tw.to(dt).requires_grad_(), x.to(dt).requires_grad_()
        y = fn(t, xx, False)
        res.append((y,) + torch.autograd.grad(y, (t, xx), g.to(dt)))
    for a, b in zip(*res):
        assert _rel_err(a, b) < 1e-5


# ----------------------------------------------------------------------------- fallback + bench
# The fused CPU butterfly for every ISA this CPU can run, in a fresh process: row lengths below a vector
# (one-lane path), at and above it (lane-shuffle strides and whole-vector pairs), long rows (L2 tiles), row
# counts around the forward and backward tile heights, several stacks and blocks, both directions; output,
# both gradients and gradcheck against the reference.
BFLY_SCRIPT = """
import json, math, torch
from cuda import butterfly_ops
from layers.butterfly import butterfly_multiply_ref
assert butterfly_ops.kernel_available()[0]
worst = 0.0
for (nstacks, nblocks, log_n, rows) in [(1, 1, 1, 3), (2, 1, 2, 5), (1, 2, 3, 9), (3, 1, 4, 17), (1, 1, 5, 70),
                                         (2, 2, 6, 33), (1, 3, 7, 4), (1, 1, 10, 66), (1, 1, 12, 19)]:
    n = 1 << log_n
    for dt in (torch.float32, torch.float64):
        for inc in (True, False):
            g = torch.Generator().manual_seed(rows * 7 + log_n)
            tw = torch.randn(nstacks, nblocks, log_n, n // 2, 2, 2, dtype=dt, generator=g) / math.sqrt(2)
            x = torch.randn(rows, nstacks, n, dtype=dt, generator=g)
            gr = torch.randn(rows, nstacks, n, dtype=dt, generator=g)
            res = []
            for fn in (butterfly_ops.butterfly_multiply, butterfly_multiply_ref):
                t, xx = tw.clone().requires_grad_(), x.clone().requires_grad_()
                y = fn(t, xx, inc)
                res.append([y] + list(torch.autograd.grad(y, (t, xx), gr)))
            for a, b in zip(*res):
                worst = max(worst, ((a - b).abs().max() / (b.abs().max() + 1e-30)).item() / (1e-5 if dt == torch.float32 else 1e-12))
torch.manual_seed(6)
for n in (8, 32):
    tw = torch.randn(2, 2, int(math.log2(n)), n // 2, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, xx: butterfly_ops.butterfly_multiply(t, xx, False), (tw, x))
print(json.dumps({"isa": torch.ops.monarch_seam.cpu_isa(), "worst": worst}))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_butterfly_cpu_isas_in_fresh_process(ops, isa):
    if isa not in _supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    env = dict(os.environ, MONARCH_SEAM_CPU_ISA=isa, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", BFLY_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa and out["worst"] <= 1.0, out


# torch.compile(fullgraph=True) of a two-layer Monarch MLP at a size the op measures routes for, with each
# large-shape route forced (the in-process compile test above stays below the tuning threshold).
COMPILE_SCRIPT = """
import torch
from cuda.monarch_ops import kernel_available, monarch_multiply
assert kernel_available()[0]  # build and register outside the compiled region
def mlp(x, w1, w2, v1, v2):
    return monarch_multiply(torch.relu(monarch_multiply(x, w1, w2)), v1, v2).sum()
torch.manual_seed(5)
x = torch.randn(256, 256)
params = [(torch.randn(4, 64, 64) / 8).requires_grad_() for _ in range(4)]
fn = torch.compile(mlp, fullgraph=True, backend="aot_eager")
got = fn(x, *params)
g_got = torch.autograd.grad(got, params)
want = mlp(x, *params)
g_want = torch.autograd.grad(want, params)
torch.testing.assert_close(got, want)
for a, b in zip(g_got, g_want):
    torch.testing.assert_close(a, b)
print("COMPILE_OK", torch.ops.monarch_seam.cpu_route("fwd_h", [256, 4, 64, 64, 4, 64, 64], torch.float32))
"""


@pytest.mark.parametrize("route", ["engine", "blas"])
def test_torch_compile_fullgraph_large_shape_routes(ops, route):
    env = dict(os.environ, MONARCH_SEAM_CPU_ROUTE=route, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"COMPILE_OK {route}" in res.stdout, res.stdout


# Dispatch by shape (cuda/monarch_ops.py): with a prepared route file, each branch is taken where its route
# decision says so, and each equals the reference: the "ref" branch bit for bit (it is the reference), the op's
# routes within the dtype tolerance; gradcheck (fast mode) of each branch; torch.compile(fullgraph=True), whose
# graph calls the op (on the large shapes' routes of the file), with a second batch size (dynamic shapes) too.
DISPATCH_SCRIPT = """
import json, math, torch
from cuda import monarch_ops
from layers.monarch import monarch_multiply_ref
assert monarch_ops.kernel_available()[0]
cases = json.loads(CASES)
worst, paths = 0.0, []
for name, (k, q, p, l, s, r), lead, want_nograd, want_grad in cases:
    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(len(name))
        w1 = torch.randn(k, q, p, dtype=dt, generator=g) / math.sqrt(p)
        w2 = torch.randn(l, s, r, dtype=dt, generator=g) / math.sqrt(r)
        x = torch.randn(*lead, k * p, dtype=dt, generator=g)
        gr = torch.randn(*lead, l * s, dtype=dt, generator=g)
        with torch.no_grad():
            path = monarch_ops.cpu_path(x, w1, w2)
            got, want = monarch_ops.monarch_multiply(x, w1, w2), monarch_multiply_ref(x, w1, w2)
        res = [[got], [want]]
        args = [t.clone().requires_grad_() for t in (x, w1, w2)]
        gpath = monarch_ops.cpu_path(*args)
        for i, fn in enumerate((monarch_ops.monarch_multiply, monarch_multiply_ref)):
            args = [t.clone().requires_grad_() for t in (x, w1, w2)]
            y = fn(*args)
            res[i] += [y] + list(torch.autograd.grad(y, args, gr))
        paths.append([name, str(dt), path, gpath])
        assert (path, gpath) == (want_nograd, want_grad), (name, dt, path, gpath)
        for j, (a, b) in enumerate(zip(*res)):
            # the no-grad half and the autograd half are checked separately, each on its own branch
            if (path if j == 0 else gpath) == "ref":
                assert torch.equal(a, b), (name, dt, j)
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item() / (2e-5 if dt == torch.float32 else 1e-12))
# gradcheck of each branch (fast mode: random projections, the inputs are large)
for name, (k, q, p, l, s, r), lead, _, _ in cases:
    g = torch.Generator().manual_seed(7)
    args = [torch.randn(*lead, k * p, dtype=torch.float64, generator=g).requires_grad_(),
            (torch.randn(k, q, p, dtype=torch.float64, generator=g) / math.sqrt(p)).requires_grad_(),
            (torch.randn(l, s, r, dtype=torch.float64, generator=g) / math.sqrt(r)).requires_grad_()]
    assert torch.autograd.gradcheck(monarch_ops.monarch_multiply, args, fast_mode=True), name
# torch.compile: in eager the first product takes the op, the second the reference; compiled, both take the op
def two(x, w1, w2, v1, v2):
    y = monarch_ops.monarch_multiply(x, w1, w2)  # K4 P25 Q20 L4 S75 R20, 300 rows: fwd_h blas, bwd_h engine
    return monarch_ops.monarch_multiply(y[..., :150].reshape(-1, 150), v1, v2).sum()  # 400 rows: engine, aten
name, (k, q, p, l, s, r), lead, _, _ = cases[0]
g = torch.Generator().manual_seed(11)
ws = [(torch.randn(k, q, p, generator=g) / math.sqrt(p)).requires_grad_(),
      (torch.randn(l, s, r, generator=g) / math.sqrt(r)).requires_grad_(),
      (torch.randn(3, 30, 50, generator=g) / math.sqrt(50)).requires_grad_(),
      (torch.randn(3, 30, 30, generator=g) / math.sqrt(30)).requires_grad_()]
fn = torch.compile(two, fullgraph=True, backend="aot_eager")
for rows in (lead, [2, 100]):  # a second batch size: recompiled, possibly with a symbolic one
    x = torch.randn(*rows, k * p, generator=g)
    got = fn(x, *ws)
    g_got = torch.autograd.grad(got, ws)
    want = two(x, *ws)
    g_want = torch.autograd.grad(want, ws)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
print(json.dumps({"worst": worst, "paths": paths, "compiled_route": torch.ops.monarch_seam.cpu_route(
    "fwd_h", [300, k, p, q, l, s, r], torch.float32)}))
"""


def _fnv1a(text):
    h = 1469598103934665603
    for c in text.encode():
        h = ((h ^ c) * 1099511628211) % (1 << 64)
    return f"{h:x}"


def test_monarch_reference_calls_skip_the_dispatch_only_for_their_key(ops, monkeypatch):
    """A CPU call that took the reference (checks, self-check and path decision passed) lets later calls with the
    same shapes, dtypes, grad mode and thread count go to the reference at once; any other call is dispatched."""
    monarch_ops, _ = ops
    monkeypatch.setattr(monarch_ops, "_ref_calls", {})
    decided = []

    def path(x, w1, w2):
        decided.append(tuple(x.shape))
        return "ref" if x.shape[0] != 9 else "aten"

    monkeypatch.setattr(monarch_ops, "cpu_path", path)
    gen = torch.Generator().manual_seed(5)
    w1, w2 = factors(4, 6, 5, 4, 7, 6, torch.float32, gen=gen)
    x = torch.randn(3, 20, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    want = monarch_multiply_ref(*leaves)
    want_grads = torch.autograd.grad(want, leaves, torch.ones_like(want))
    for _ in range(3):  # the first call decides, the others take the reference without asking
        got = monarch_ops.monarch_multiply(*leaves)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, leaves, torch.ones_like(got)),
                                                      want_grads))
    assert decided == [(3, 20)]
    with torch.no_grad():  # another grad mode
        assert torch.equal(monarch_ops.monarch_multiply(*leaves), want.detach())
    monarch_ops.monarch_multiply(x.double(), w1.double(), w2.double())  # another dtype
    monarch_ops.monarch_multiply(torch.randn(4, 20), w1, w2)  # other rows
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        monarch_ops.monarch_multiply(*leaves)  # another thread count
    finally:
        torch.set_num_threads(threads)
    assert decided == [(3, 20)] * 3 + [(4, 20), (3, 20)]
    for _ in range(2):  # a call on the op's path is dispatched every time
        monarch_ops.monarch_multiply(torch.randn(9, 20), w1, w2)
    assert decided[-2:] == [(9, 20), (9, 20)]
    with pytest.raises(ValueError, match="K\\*P"):  # a known key does not skip the checks of another shape
        monarch_ops.monarch_multiply(torch.randn(3, 21), w1, w2)


def test_monarch_cpu_dispatch_by_shape(ops, tmp_path):
    # (name, (k, q, p, l, s, r), leading batch, routes written to the file as {dir: route}, expected cpu_path
    # without and with autograd). Threads are fixed at 2 so that the keys below are the ones looked up.
    # Under 256 MFLOP the op-versus-reference verdicts ("call_" lines) are in the file too.
    spec = [("op", (4, 20, 25, 4, 75, 20), [3, 100],
             {"fwd": "engine", "fwd_h": "blas", "bwd_h": "engine", "call_fwd": "op", "call_fwd_h": "op"},
             "engine", "blas+engine"),
            ("ref without autograd where fwd chooses aten; in training where the op lost its verdict",
             (3, 30, 50, 3, 30, 30), [400], {"fwd": "aten", "fwd_h": "engine", "bwd_h": "aten", "call_fwd_h": "ref"},
             "ref", "ref"),
            ("the op where it won its verdict (fwd: blas), ref where it lost it (fwd_h: aten+engine)",
             (2, 48, 64, 4, 40, 24), [600],
             {"fwd": "blas", "fwd_h": "aten", "bwd_h": "engine", "call_fwd": "op", "call_fwd_h": "ref"},
             "blas", "ref"),
            ("the op in training where only fwd_h chooses aten, 268 MFLOP: no verdict", (2, 128, 128, 2, 128, 128),
             [2048], {"fwd": "aten", "fwd_h": "aten", "bwd_h": "blas"}, "ref", "aten+blas"),
            ("ref in training where both directions choose aten: no verdict", (2, 40, 48, 4, 30, 20), [500],
             {"fwd": "engine", "fwd_h": "aten", "bwd_h": "aten", "call_fwd": "op"}, "engine", "ref"),
            ("under 4 MFLOP: the op's aten route where the op won", (4, 8, 8, 4, 8, 8), [7],
             {"call_fwd": "op", "call_fwd_h": "op"}, "aten", "aten"),
            ("under 4 MFLOP: the reference where it won", (4, 8, 8, 4, 8, 8), [33],
             {"call_fwd": "ref", "call_fwd_h": "ref"}, "ref", "ref")]
    lines = []
    for name, (k, q, p, l, s, r), lead, routes, _, _ in spec:
        rows = math.prod(lead)
        bucket = 1 << (rows - 1).bit_length()
        for dt in ("Float", "Double"):
            for d, route in routes.items():
                body = f"{d} B<={bucket} K{k} P{p} Q{q} L{l} S{s} R{r} {dt} t2\t{route}"
                lines.append(f"{body}\t{_fnv1a(body)}")
    cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
               if ln.startswith("model name"))
    path = tmp_path / "routes.txt"
    path.write_text("\n".join([f"monarch_seam cpu routes v1\t{cpu}|{torch.ops.monarch_seam.cpu_isa()}"] + lines)
                    + "\n")
    cases = json.dumps([[n, sh, lead, a, b] for n, sh, lead, _, a, b in spec])
    env = dict(os.environ, MONARCH_SEAM_TUNE_FILE=str(path), OMP_NUM_THREADS="2")
    env.pop("MONARCH_SEAM_CPU_ROUTE", None)
    res = subprocess.run([sys.executable, "-c", f"CASES = {cases!r}\n" + DISPATCH_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["worst"] <= 1.0, out
    assert len(out["paths"]) == 2 * len(spec), out
    assert out["compiled_route"] == "blas", out  # the large-shape route the compiled graph's op took


FALLBACK = """
import warnings, torch
from layers.monarch import monarch_multiply, monarch_multiply_ref
torch.manual_seed(0)
x, w1, w2 = torch.randn(5, 12), torch.randn(3, 4, 4), torch.randn(4, 2, 3)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    a = monarch_multiply(x, w1, w2, impl="auto")
    b = monarch_multiply(x, w1, w2, impl="auto")
msgs = [str(w.message) for w in rec]
assert len(msgs) == 1, msgs
assert "MONARCH_SEAM_FORCE_BUILD_FAIL" in msgs[0], msgs[0]
ref = monarch_multiply_ref(x, w1, w2)
assert torch.equal(a, ref) and torch.equal(b, ref)
print("FALLBACK_OK")
"""


def test_forced_build_failure_falls_back_once():
    env = dict(os.environ, MONARCH_SEAM_FORCE_BUILD_FAIL="1")
    res = subprocess.run([sys.executable, "-c", FALLBACK], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "FALLBACK_OK" in res.stdout, res.stdout + res.stderr


def test_bench_quick_smoke(ops):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "bench_kernels.py", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "speedup" in res.stdout and "monarch_kernel" in res.stdout, res.stdout
    # the dense baseline is the faster of F.linear and oneDNN, named per row; the kernel's route is named
    assert "baseline" in res.stdout and ("dense_onednn" in res.stdout or not torch.backends.mkldnn.is_available())
    kernel_rows = [ln.split() for ln in res.stdout.splitlines() if " monarch_kernel " in ln]
    assert kernel_rows and all(r[-1].split("+")[0] in ("engine", "aten", "blas") for r in kernel_rows), kernel_rows
