"""offload_ema.ops against float64 references, on every kernel path this host has."""
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from offload_ema import ops

SRC_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Empty, single, either side of the AVX2 and AVX-512 widths, a non-multiple of every width and
# of the thread alignment, one that splits across threads with a ragged end, and a few million.
SIZES = [0, 1, 15, 17, 1031, 2 * 65536 + 13, 3_000_017]
WEIGHTS = [0.0, 1e-3, 0.37, 0.5, 1.0]
EPS32 = 2.0 ** -24  # unit roundoff of float32


def sample(n, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


def ref_ema(avg, src, w):
    a, s = avg.double(), src.double()
    return a + w * (s - a)


def assert_ema_close(out, avg0, src, w):
    """|out - exact| must stay within the rounding of the float32 operations (difference,
    weight, fused multiply-add): a few units of float32 roundoff of the operands' magnitudes."""
    exact = ref_ema(avg0, src, w)
    bound = 4 * EPS32 * (exact.abs() + w * (src.double() - avg0.double()).abs()) + 2.0 ** -149
    err = (out.double() - exact).abs()
    assert out.dtype == torch.float32
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"error exceeds float32 rounding bound by {worst}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=str)
def test_ema_update_matches_float64(backend, n, dtype):
    for w in WEIGHTS if n < 1_000_000 else [1e-3, 0.5]:
        avg0 = sample(n, torch.float32, seed=1)
        src = sample(n, dtype, seed=2, scale=3.0)
        avg = avg0.clone()
        ops.ema_update_(avg, src, w)
        assert_ema_close(avg, avg0, src, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16bit_pattern_widens_exactly(backend, dtype):
    # All 65536 bit patterns (subnormals, infinities, NaNs) as src; with w = 1 and avg = 0 the
    # update is 0 + (s - 0) = s exactly, so the result must be the exact widening of src.
    src = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    avg = torch.zeros(src.numel())
    ops.ema_update_(avg, src, 1.0)
    torch.testing.assert_close(avg, src.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(avg.isnan(), src.isnan())


@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=str)
def test_nan_and_inf_propagate_as_float64(backend, dtype):
    n = 67  # specials land in vector bodies and in the scalar tail
    src = sample(n, dtype, seed=3)
    avg0 = sample(n, torch.float32, seed=4)
    for i, v in [(0, math.nan), (5, math.inf), (20, -math.inf), (33, math.nan), (66, math.inf)]:
        src[i] = v
    avg0[40] = math.inf
    avg0[50] = math.nan
    for w in [0.0, 0.25, 0.75, 1.0]:
        avg = avg0.clone()
        ops.ema_update_(avg, src, w)
        expected = ref_ema(avg0, src, w).float()
        assert torch.equal(avg.isnan(), expected.isnan()), f"NaN positions differ at w={w}"
        finite_or_inf = ~expected.isnan()
        assert torch.equal(avg[expected.isinf()], expected[expected.isinf()])
        assert_ema_close(avg[finite_or_inf & expected.isfinite()],
                         avg0[finite_or_inf & expected.isfinite()],
                         src[finite_or_inf & expected.isfinite()], w)


@pytest.mark.parametrize("n", [1, 17, 2048 * 2 + 5, 2 * 65536 + 13, 3_000_017])
@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=str)
def test_multi_equals_repeated_single_updates(backend, n, dtype):
    src = sample(n, dtype, seed=5)
    weights = [1e-3, 0.1, 0.9]
    avgs = [sample(n, torch.float32, seed=10 + j) for j in range(3)]
    singles = [a.clone() for a in avgs]
    ops.ema_update_multi_(avgs, src, weights)
    for a, w in zip(singles, weights):
        ops.ema_update_(a, src, w)
    for j, (m, s) in enumerate(zip(avgs, singles)):
        assert torch.equal(m, s), f"accumulator {j} differs from a single update"
    # And each against float64 on its own, so a bug shared by both paths cannot hide.
    for j, w in enumerate(weights):
        assert_ema_close(avgs[j], sample(n, torch.float32, seed=10 + j), src, w)


def test_multi_with_no_accumulators_is_a_no_op(backend):
    ops.ema_update_multi_([], torch.ones(4), [])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("slot_dtypes", [
    [torch.float32],
    [torch.bfloat16] * 10,
    [torch.float16, torch.float32, torch.bfloat16],
], ids=["f32x1", "bf16x10", "mixed3"])
def test_mean_matches_float64(backend, n, slot_dtypes):
    srcs = [sample(n, dt, seed=20 + j, scale=1 + j) for j, dt in enumerate(slot_dtypes)]
    out = torch.full((n,), math.nan)
    ops.mean_(out, srcs)
    exact = torch.stack([s.double() for s in srcs]).mean(0) if n else torch.zeros(0, dtype=torch.float64)
    # Sums in float64 of at most a few float32 values are exact to far below float32 precision:
    # the result must be the float64 mean rounded once to float32 (within one float32 unit).
    torch.testing.assert_close(out, exact.float(), rtol=2 * EPS32, atol=2.0 ** -149)


def test_mean_propagates_nan_and_inf(backend):
    a = torch.tensor([1.0, math.nan, math.inf, math.inf, 2.0] * 7)
    b = torch.tensor([1.0, 0.0, 1.0, -math.inf, math.inf] * 7)
    out = torch.empty_like(a)
    ops.mean_(out, [a, b])
    exact = ((a.double() + b.double()) / 2).float()
    torch.testing.assert_close(out, exact, equal_nan=True, rtol=0, atol=0)


# ---- bad input: a clear error naming the argument, and nothing written --------------------

def _f32(*shape):
    return torch.ones(*shape)


BAD_EMA = [
    ("avg must be float32", TypeError, lambda: (torch.ones(8, dtype=torch.float64), _f32(8), 0.1)),
    ("avg must be float32", TypeError, lambda: (torch.ones(8, dtype=torch.bfloat16), _f32(8), 0.1)),
    ("src must be float32, bfloat16 or float16", TypeError,
     lambda: (_f32(8), torch.ones(8, dtype=torch.int32), 0.1)),
    ("src must be float32, bfloat16 or float16", TypeError,
     lambda: (_f32(8), torch.ones(8, dtype=torch.float64), 0.1)),
    ("src must have the shape of avg", ValueError, lambda: (_f32(8), _f32(9), 0.1)),
    ("src must have the shape of avg", ValueError, lambda: (_f32(2, 4), _f32(8), 0.1)),
    ("avg must be contiguous", ValueError, lambda: (_f32(4, 4).t(), _f32(4, 4), 0.1)),
    ("src must be contiguous", ValueError, lambda: (_f32(4, 4), _f32(4, 4).t(), 0.1)),
    ("weight must be in [0, 1]", ValueError, lambda: (_f32(8), _f32(8), -0.1)),
    ("weight must be in [0, 1]", ValueError, lambda: (_f32(8), _f32(8), 1.5)),
    ("weight must be in [0, 1]", ValueError, lambda: (_f32(8), _f32(8), math.nan)),
]


@pytest.mark.parametrize("message,exc,make", BAD_EMA, ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(BAD_EMA)])
def test_ema_update_rejects_bad_input(backend, message, exc, make):
    avg, src, w = make()
    before = avg.clone()
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.ema_update_(avg, src, w)
    assert torch.equal(avg, before)


BAD_MULTI = [
    ("weights must have one entry per avgs tensor", ValueError,
     lambda: ([_f32(8), _f32(8)], _f32(8), [0.1])),
    ("avgs\\[1\\] must be float32", TypeError,
     lambda: ([_f32(8), torch.ones(8, dtype=torch.float16)], _f32(8), [0.1, 0.2])),
    ("weights\\[1\\] must be in", ValueError, lambda: ([_f32(8), _f32(8)], _f32(8), [0.1, 2.0])),
    ("avgs\\[1\\] must have the shape of src", ValueError,
     lambda: ([_f32(8), _f32(7)], _f32(8), [0.1, 0.2])),
    ("src must be float32, bfloat16 or float16", TypeError,
     lambda: ([_f32(8), _f32(8)], torch.ones(8, dtype=torch.int64), [0.1, 0.2])),
]


@pytest.mark.parametrize("message,exc,make", BAD_MULTI, ids=[f"{i}" for i in range(len(BAD_MULTI))])
def test_ema_update_multi_rejects_bad_input_and_writes_nothing(backend, message, exc, make):
    avgs, src, ws = make()
    _rejected_unwritten(avgs, exc, message, lambda: ops.ema_update_multi_(avgs, src, ws))


def _rejected_unwritten(avgs, exc, message, call):
    """``call()`` raises ``exc`` matching ``message`` and leaves every accumulator as it was."""
    before = [a.clone() for a in avgs]
    with pytest.raises(exc, match=message):
        call()
    for a, b in zip(avgs, before):
        assert torch.equal(a, b), "an accumulator was written before the error"


BAD_MEAN = [
    ("srcs must hold at least one tensor", ValueError, lambda: (_f32(8), [])),
    ("out must be float32", TypeError, lambda: (torch.ones(8, dtype=torch.bfloat16), [_f32(8)])),
    ("srcs\\[1\\] must have the shape of out", ValueError, lambda: (_f32(8), [_f32(8), _f32(4)])),
    ("srcs\\[0\\] must be float32, bfloat16 or float16", TypeError,
     lambda: (_f32(8), [torch.ones(8, dtype=torch.int8)])),
    ("srcs\\[0\\] must be contiguous", ValueError, lambda: (_f32(4, 4), [_f32(4, 4).t()])),
]


@pytest.mark.parametrize("message,exc,make", BAD_MEAN, ids=[f"{i}" for i in range(len(BAD_MEAN))])
def test_mean_rejects_bad_input_and_writes_nothing(backend, message, exc, make):
    out, srcs = make()
    before = out.clone()
    with pytest.raises(exc, match=message):
        ops.mean_(out, srcs)
    assert torch.equal(out, before)


def test_fallback_rejects_tensors_off_the_cpu(monkeypatch):
    # The C++ path raises the same error for CUDA tensors (tests/test_cuda.py, on a GPU host).
    monkeypatch.setattr(ops, "_C", None)
    with pytest.raises(ValueError, match="src must be a CPU tensor, got one on meta"):
        ops.ema_update_(_f32(4), torch.ones(4, device="meta"), 0.5)
    with pytest.raises(ValueError, match="avg must be a CPU tensor"):
        ops.ema_update_(torch.ones(4, device="meta"), _f32(4), 0.5)


# ---- torch.library integration -------------------------------------------------------------

@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=str)
def test_opcheck(cpp_backend, dtype):
    n = 37
    torch.library.opcheck(torch.ops.offload_ema.ema_update_,
                          (sample(n, torch.float32), sample(n, dtype, seed=1), 0.25))
    torch.library.opcheck(torch.ops.offload_ema.ema_update_multi_,
                          ([sample(n, torch.float32), sample(n, torch.float32, seed=3)],
                           sample(n, dtype, seed=1), [0.25, 0.5]))
    torch.library.opcheck(torch.ops.offload_ema.mean_,
                          (sample(n, torch.float32), [sample(n, dtype, seed=1), sample(n, dtype, seed=2)]))


# ---- threads, the GIL, fork ---------------------------------------------------------------

def test_kernel_releases_the_gil(cpp_backend):
    n = 32 * 1024 * 1024
    avg = torch.zeros(n)
    src = torch.ones(n, dtype=torch.bfloat16)
    ops.ema_update_(avg, src, 0.5)  # warm the pages
    ticks = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.02)
    old = ops.get_num_threads()
    ops.set_num_threads(1)
    try:
        before = ticks[0]
        start = time.perf_counter()
        for _ in range(3):
            ops.ema_update_(avg, src, 0.5)
        elapsed = time.perf_counter() - start
        during = ticks[0] - before
    finally:
        ops.set_num_threads(old)
        stop.set()
        t.join(60)
        assert not t.is_alive(), "the ticking thread did not stop"
    # With the GIL held for the whole call the other thread would not tick at all.
    assert during > 1000, f"other thread ticked {during} times in {elapsed:.3f}s of kernel time"


# One thread's worth (the kernels split by ~4 MiB moved per thread); fewer threads than the pool
# holds (only those woken); every thread, in several dynamically taken ranges with a ragged end.
@pytest.mark.parametrize("n", [5 * 65536 + 77, 2 ** 20 + 77, 7 * 2 ** 19 + 77])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_results_do_not_depend_on_thread_count(cpp_backend, threads, n):
    src = sample(n, torch.bfloat16, seed=1)
    ref = sample(n, torch.float32)
    ops.set_num_threads(1)
    ops.ema_update_(ref, src, 0.3)
    out = sample(n, torch.float32)
    outs = [sample(n, torch.float32, seed=9), sample(n, torch.float32, seed=8)]
    old = ops.get_num_threads()
    try:
        ops.set_num_threads(threads)
        assert ops.get_num_threads() == threads
        ops.ema_update_(out, src, 0.3)
        ops.ema_update_multi_(outs, src, [0.3, 0.3])
        mean = torch.empty(n)
        ops.mean_(mean, [src, ref])
    finally:
        ops.set_num_threads(old)
    assert torch.equal(out, ref)
    ops.set_num_threads(1)
    try:
        expect = [sample(n, torch.float32, seed=9), sample(n, torch.float32, seed=8)]
        ops.ema_update_multi_(expect, src, [0.3, 0.3])
        expect_mean = torch.empty(n)
        ops.mean_(expect_mean, [src, ref])
    finally:
        ops.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(outs, expect))
    assert torch.equal(mean, expect_mean)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", True])
def test_set_num_threads_rejects_bad_values(backend, bad):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        ops.set_num_threads(bad)


def test_concurrent_callers_each_get_correct_results(cpp_backend):
    n = 1_000_003
    srcs = [sample(n, torch.float16, seed=s) for s in range(4)]
    avgs = [sample(n, torch.float32, seed=10 + s) for s in range(4)]
    starts = [a.clone() for a in avgs]
    errors = []

    def work(j):
        try:
            for _ in range(5):
                ops.ema_update_(avgs[j], srcs[j], 0.125)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert not errors
    for j in range(4):
        expect = starts[j].clone()
        for _ in range(5):
            ops.ema_update_(expect, srcs[j], 0.125)
        assert torch.equal(avgs[j], expect)


def _child_update(q):
    # torch's own OpenMP pool does not survive fork (libgomp hangs in the child), as for DataLoader
    # workers: keep torch single-threaded here so that only offload_ema's pool is exercised.
    torch.set_num_threads(1)
    from offload_ema import ops as child_ops
    n = 4 * 65536 + 5
    a = torch.zeros(n)
    child_ops.ema_update_(a, torch.ones(n, dtype=torch.bfloat16), 0.5)
    q.put(float(a.sum()))


def test_kernels_work_in_a_forked_child(cpp_backend):
    # The parent's pool threads do not exist in a forked child; the pool must be rebuilt there.
    old = ops.get_num_threads()
    ops.set_num_threads(4)
    try:
        ops.ema_update_(torch.zeros(1 << 20), torch.ones(1 << 20), 0.5)  # pool started here
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_update, args=(q,))
        p.start()
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
    finally:
        ops.set_num_threads(old)
    assert p.exitcode == 0
    assert q.get(timeout=5) == 0.5 * (4 * 65536 + 5)


def test_set_isa_rejects_unknown_and_unsupported(cpp_backend):
    with pytest.raises(ValueError, match="isa must be one of"):
        ops.set_isa("sse9")
    if ops._C.best_isa() != "avx512" and ops._C.best_isa() != "neon":
        with pytest.raises(ValueError, match="not supported on this host"):
            ops.set_isa("avx512")


# ---- backend selection ----------------------------------------------------------------------

def _run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_disable_env_selects_the_fallback_without_warning():
    r = _run_python("import warnings; warnings.simplefilter('error');"
                    "from offload_ema import ops; print(ops.backend(), ops.isa())",
                    OFFLOAD_EMA_DISABLE_CPP="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch", "torch"]


def test_missing_extension_warns_and_falls_back():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'offload_ema._C': raise ImportError('simulated missing build')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import offload_ema, torch\n"
        "    from offload_ema import ops\n"
        "print(ops.backend())\n"
        "print([str(x.message) for x in w if 'C++ kernels unavailable' in str(x.message)])\n"
        "a = torch.zeros(5); ops.ema_update_(a, torch.ones(5, dtype=torch.bfloat16), 0.5)\n"
        "print(a.tolist())\n"
    )
    r = _run_python(code, OFFLOAD_EMA_DISABLE_CPP="0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert "simulated missing build" in lines[1]
    assert lines[2] == str([0.5] * 5)


def test_every_instruction_set_gives_identical_bits():
    """One fused multiply-add per EMA element and float64 sums in slot order on every path: the
    averages do not depend on which CPU computed them."""
    if ops.backend() != "cpp":
        pytest.skip("C++ kernels not built")
    from conftest import CPP_BACKENDS
    n = 3 * 65536 + 29
    src = sample(n, torch.bfloat16, seed=1)
    results = []
    try:
        for name in CPP_BACKENDS:
            ops.set_isa(name.split("-", 1)[1])
            a = sample(n, torch.float32)
            ops.ema_update_(a, src, 0.01)
            m = [sample(n, torch.float32, seed=2), sample(n, torch.float32, seed=3)]
            ops.ema_update_multi_(m, src, [0.2, 0.7])
            out = torch.empty(n)
            ops.mean_(out, [src, a, m[0]])
            results.append((name, [a, *m, out]))
    finally:
        ops.set_isa("best")
    first_name, first = results[0]
    for name, tensors in results[1:]:
        for x, y in zip(first, tensors):
            assert torch.equal(x, y), f"{name} differs from {first_name}"


# ---- the start-up check of the instruction sets against the scalar kernels ----------------

_CORRUPT_ENV = "OFFLOAD_EMA_ISA_CHECK_CORRUPT"


def _checked_isas():
    """The vector sets the check covers on this host, widest first."""
    if ops.backend() != "cpp":
        return []
    return {"avx512": ["avx512", "avx2"], "avx2": ["avx2"], "neon": ["neon"]}.get(
        ops._C.detected_isa(), [])


def _fallback_cases():
    """(sets whose check result is corrupted, the set the kernels must use then)."""
    chain = _checked_isas()
    cases = [(chain[:i + 1], (chain + ["scalar"])[i + 1]) for i in range(len(chain))]
    if len(chain) == 2:  # only the narrower set fails: the best is kept, the narrower refused
        cases.append(([chain[1]], chain[0]))
    return cases or [pytest.param([], "", marks=pytest.mark.skip("no vector set to check"))]


# Runs in a fresh process (the check runs once per process): first use of the kernels from four
# threads at once, then more calls; saves every result, the ISA used and the warnings seen.
_ISA_CHILD = r"""
import sys, threading, warnings
import torch
inp, out, refuse = sys.argv[1], sys.argv[2], sys.argv[3:]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from offload_ema import ops
    data = torch.load(inp, weights_only=True)
    avg0, srcs = data["avg0"], data["srcs"]

    def run():
        res = {}
        for j, s in enumerate(srcs):
            a = avg0.clone()
            ops.ema_update_(a, s, 0.37)
            m = [avg0.clone(), avg0.clone()]
            ops.ema_update_multi_(m, s, [1e-3, 0.9])
            res[f"ema{j}"], res[f"multi{j}a"], res[f"multi{j}b"] = a, m[0], m[1]
        mean = torch.empty_like(avg0)
        ops.mean_(mean, srcs)
        res["mean"] = mean
        return res

    go = threading.Barrier(4)
    firsts = [None] * 4

    def first(k):
        go.wait(60)
        firsts[k] = run()

    threads = [threading.Thread(target=first, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "the first calls hung"
    used = ops.isa()
    again = run()
    ops.set_isa("scalar")
    scalar = run()
    ops.set_isa("best")
    best_again = ops.isa()
    refused = []
    for name in refuse:
        try:
            ops.set_isa(name)
        except ValueError as exc:
            refused.append((name, str(exc)))
        ops.set_isa("best")
warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
torch.save({"firsts": firsts, "again": again, "scalar": scalar, "used": used,
            "best_again": best_again, "refused": refused, "warned": warned,
            "rejected": ops._C.rejected_isas()}, out)
"""


def _run_isa_child(tmp_path, corrupt, refuse=()):
    n = 1031
    srcs = [sample(n, dt, seed=40 + j, scale=3.0) for j, dt in enumerate(SRC_DTYPES)]
    data = {"avg0": sample(n, torch.float32, seed=39), "srcs": srcs}
    torch.save(data, tmp_path / "in.pt")
    env = dict(os.environ)
    env.pop(_CORRUPT_ENV, None)
    if corrupt is not None:
        env[_CORRUPT_ENV] = corrupt
    r = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(tmp_path / "in.pt"),
                        str(tmp_path / "out.pt"), *refuse],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return data, torch.load(tmp_path / "out.pt", weights_only=True)


def _assert_results_are_right(data, got):
    """Every run equals the scalar kernels' bits and the float64 reference."""
    avg0, srcs = data["avg0"], data["srcs"]
    for res in [*got["firsts"], got["again"]]:
        for key, t in got["scalar"].items():
            assert torch.equal(res[key], t), f"{key} differs from the scalar kernels"
    for j, s in enumerate(srcs):
        assert_ema_close(got["again"][f"ema{j}"], avg0, s, 0.37)
        assert_ema_close(got["again"][f"multi{j}a"], avg0, s, 1e-3)
        assert_ema_close(got["again"][f"multi{j}b"], avg0, s, 0.9)
    exact = torch.stack([s.double() for s in srcs]).mean(0)
    torch.testing.assert_close(got["again"]["mean"], exact.float(), rtol=2 * EPS32, atol=2.0 ** -149)


@pytest.mark.parametrize("corrupt,expected", _fallback_cases(),
                         ids=lambda v: ",".join(v) if isinstance(v, list) else v)
def test_isa_check_mismatch_falls_back_and_warns_once(tmp_path, corrupt, expected):
    data, got = _run_isa_child(tmp_path, ",".join(corrupt), refuse=corrupt)
    assert got["used"] == expected
    assert got["best_again"] == expected, "set_isa('best') returned to an unchecked set"
    assert got["rejected"] == corrupt
    assert [name for name, _ in got["refused"]] == corrupt
    assert all("different from the scalar kernels" in msg for _, msg in got["refused"])
    assert len(got["warned"]) == 1, got["warned"]
    msg = got["warned"][0]
    assert all(name in msg for name in corrupt) and f"using {expected}" in msg, msg
    _assert_results_are_right(data, got)


@pytest.mark.parametrize("corrupt", [None, "foreign"])
def test_isa_check_keeps_the_best_isa_without_a_mismatch(tmp_path, corrupt):
    chain = _checked_isas()
    if not chain:
        pytest.skip("no vector set to check")
    if corrupt == "foreign":  # a set this host never checks: naming it must change nothing
        corrupt = "avx2" if chain == ["neon"] else "neon"
    data, got = _run_isa_child(tmp_path, corrupt)
    assert got["used"] == got["best_again"] == chain[0]
    assert got["rejected"] == [] and got["refused"] == []
    assert got["warned"] == []
    _assert_results_are_right(data, got)


def test_isa_check_passes_every_set_in_this_process(cpp_backend):
    # The real check on real kernel outputs, for each set the fixtures run the other tests on.
    if os.environ.get(_CORRUPT_ENV):
        pytest.skip(f"{_CORRUPT_ENV} is set")
    assert ops._C.matches_scalar(cpp_backend.split("-", 1)[1])
    assert ops._C.rejected_isas() == []
    assert ops._C.best_isa() == ops._C.detected_isa()
    # A set this host cannot run is never run, not even by the check.
    foreign = "avx2" if ops._C.detected_isa() == "neon" else "neon"
    assert not ops._C.matches_scalar(foreign)


# ---- folding K snapshots in one pass ------------------------------------------------------------

@pytest.mark.parametrize("n,K", [(1, 3), (17, 1), (17, 16), (2048 * 2 + 5, 2), (2048 * 2 + 5, 7),
                                 (2 * 65536 + 13, 4), (1_000_003, 4)])
@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=str)
def test_fold_equals_the_same_updates_one_by_one(backend, n, dtype, K):
    """Tails and blocks of every vector width, K from 1 to the maximum, several accumulators."""
    srcs = [sample(n, dtype, seed=20 + k) for k in range(K)]
    weights = [[0.5 / (k + 1) for k in range(K)], [min(1.0, 0.05 * (k + 1)) for k in range(K)],
               [1e-3] * K]
    avgs = [sample(n, torch.float32, seed=40 + j) for j in range(3)]
    singles = [a.clone() for a in avgs]
    ops.ema_fold_multi_(avgs, srcs, weights)
    for a, row in zip(singles, weights):
        for s, w in zip(srcs, row):
            ops.ema_update_(a, s, w)
    for j, (f, s) in enumerate(zip(avgs, singles)):
        assert torch.equal(f, s), f"accumulator {j}: folding {K} differs from {K} updates"
    one = sample(n, torch.float32, seed=40)
    ops.ema_fold_(one, srcs, weights[0])
    assert torch.equal(one, avgs[0])
    # And against float64 recurrences, so that a bug shared by both paths cannot hide.
    ref = sample(n, torch.float32, seed=40).double()
    for s, w in zip(srcs, weights[0]):
        ref += w * (s.double() - ref)
    torch.testing.assert_close(avgs[0].double(), ref, rtol=1e-5 * K, atol=1e-5 * K)


@pytest.mark.parametrize("m", [2, 4, 5, 9])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_number_of_accumulators_equals_the_updates_one_by_one(backend, m, K, dtype):
    """Up to four accumulators are updated together per vector, more in groups of four over
    blocks of the sources: every count, across block boundaries and with a ragged tail, gives
    the bits of one update per accumulator and snapshot (K = 1: ema_update_multi_)."""
    n = 3 * 32768 + 37
    srcs = [sample(n, dtype, seed=60 + k) for k in range(K)]
    weights = [[min(1.0, 0.07 * (j + 1) + 0.01 * k) for k in range(K)] for j in range(m)]
    avgs = [sample(n, torch.float32, seed=80 + j) for j in range(m)]
    singles = [a.clone() for a in avgs]
    if K == 1:
        ops.ema_update_multi_(avgs, srcs[0], [row[0] for row in weights])
    else:
        ops.ema_fold_multi_(avgs, srcs, weights)
    for a, row in zip(singles, weights):
        for src, w in zip(srcs, row):
            ops.ema_update_(a, src, w)
    for j, (got, want) in enumerate(zip(avgs, singles)):
        assert torch.equal(got, want), f"accumulator {j} of {m} differs (K={K})"


def test_fold_propagates_nan_like_single_updates(backend):
    srcs = [torch.tensor([1.0, float("nan"), 3.0, float("inf")]) for _ in range(3)]
    a = torch.zeros(4)
    b = a.clone()
    ops.ema_fold_(a, srcs, [0.5, 0.25, 0.125])
    for s, w in zip(srcs, [0.5, 0.25, 0.125]):
        ops.ema_update_(b, s, w)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


BAD_FOLD = [
    ("srcs must hold 1 to 16 snapshots", ValueError, lambda: ([_f32(8)], [], [[]])),
    ("srcs must hold 1 to 16 snapshots", ValueError,
     lambda: ([_f32(8)], [_f32(8)] * 17, [[0.1] * 17])),
    ("weights must have one row per avgs tensor", ValueError, lambda: ([_f32(8)], [_f32(8)], [])),
    ("weights\\[0\\] must have one entry per srcs tensor", ValueError,
     lambda: ([_f32(8)], [_f32(8), _f32(8)], [[0.1]])),
    ("weights\\[1\\] must be in", ValueError, lambda: ([_f32(8)], [_f32(8), _f32(8)], [[0.1, 1.5]])),
    ("srcs\\[1\\] must have the dtype of srcs\\[0\\]", TypeError,
     lambda: ([_f32(8)], [_f32(8), torch.ones(8, dtype=torch.bfloat16)], [[0.1, 0.2]])),
    ("srcs\\[1\\] must have the shape of avgs\\[0\\]", ValueError,
     lambda: ([_f32(8)], [_f32(8), _f32(7)], [[0.1, 0.2]])),
    ("avgs\\[1\\] must have the shape of avgs\\[0\\]", ValueError,
     lambda: ([_f32(8), _f32(7)], [_f32(8)], [[0.1], [0.1]])),
    ("avgs\\[0\\] must be float32", TypeError,
     lambda: ([torch.ones(8, dtype=torch.float16)], [_f32(8)], [[0.1]])),
]


@pytest.mark.parametrize("message,exc,make", BAD_FOLD, ids=[f"{i}" for i in range(len(BAD_FOLD))])
def test_fold_rejects_bad_input_and_writes_nothing(backend, message, exc, make):
    avgs, srcs, ws = make()
    _rejected_unwritten(avgs, exc, message, lambda: ops.ema_fold_multi_(avgs, srcs, ws))


# ---- host_copy_plan: the CPU-only staging copy ------------------------------------------------

needs_cpp = pytest.mark.skipif(ops.backend() != "cpp", reason="the C++ extension is not built")


def _copy_case(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8]
    srcs = [torch.randn(n, generator=g, dtype=torch.float64).to(dtypes[i % len(dtypes)])
            for i, n in enumerate(sizes)]
    dsts = [torch.full_like(s, 7) for s in srcs]
    return dsts, srcs


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_host_copy_plan_copies_every_byte_whatever_the_split(threads):
    """Thousands of small tensors, empty ones and a few large ones whose bytes straddle the
    per-thread ranges (split by bytes, not by tensor): each destination equals its source."""
    g = torch.Generator().manual_seed(1)
    sizes = [int(x) for x in torch.randint(0, 300, (5000,), generator=g)] + [0, 1, 300_001, 0,
                                                                               700_003, 5]
    dsts, srcs = _copy_case(sizes)
    old = ops.get_num_threads()
    ops.set_num_threads(threads)
    try:
        plan = ops.host_copy_plan(dsts, srcs)
        assert len(plan) == len(srcs)
        assert plan.nbytes == sum(s.nbytes for s in srcs)
        assert plan.run() == -1
    finally:
        ops.set_num_threads(old)
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        assert torch.equal(d, s), f"dsts[{i}] differs"
    for s in srcs:  # a second run reads the sources as they are now
        s.add_(1) if s.dtype != torch.uint8 else s.sub_(1)
    assert plan.run() == -1
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


@needs_cpp
@pytest.mark.parametrize("how", ["freed", "reallocated"])
def test_host_copy_plan_refuses_a_source_whose_memory_moved_and_copies_nothing(how):
    dsts, srcs = _copy_case([100, 200, 300])
    plan = ops.host_copy_plan(dsts, srcs)
    storage = srcs[1].untyped_storage()
    nbytes = storage.nbytes()
    # Grown: torch allocates the new memory before freeing the old, so the address changes.
    storage.resize_(0 if how == "freed" else 2 * nbytes)
    assert plan.run() == 1
    assert all(bool((d == 7).all()) for d in dsts), "a copy ran although a source moved"


@needs_cpp
@pytest.mark.parametrize("make, exc, message", [
    (lambda: ([torch.empty(3)], [torch.empty(3), torch.empty(3)]), ValueError,
     "dsts and srcs must have the same length, got 1 and 2"),
    (lambda: ([torch.empty(3)], [torch.empty(3, dtype=torch.bfloat16)]), TypeError,
     r"dsts\[0\] must have the dtype of srcs\[0\]"),
    (lambda: ([torch.empty(3)], [torch.empty(4)]), ValueError,
     r"dsts\[0\] must have the element count of srcs\[0\] \(4\), got 3"),
    (lambda: ([torch.empty(4)], [torch.empty(4, 2)[:, 0]]), ValueError,
     r"dsts\[0\] and srcs\[0\] must be contiguous"),
])
def test_host_copy_plan_rejects_bad_input(make, exc, message):
    dsts, srcs = make()
    with pytest.raises(exc, match=message):
        ops.host_copy_plan(dsts, srcs)
