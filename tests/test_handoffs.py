"""Each hand-off between the engine's threads, raced on the simulated copy engine
(``offload_ema.testing.lazy_device``: CPU models take the asynchronous path with seeded, deferred
copies), so that a missing fence, an early read of staging or a lost ticket gives a wrong average
or a hang here, without a GPU. One section per hand-off (see ``offload_ema/engine/job.py``):

- training thread -> issuer: the inbox and ``Job.claim`` (the fence or the issuer issues a whole
  snapshot's copies);
- issuer / fence -> worker and the next step: ``Job.issued`` and the copy event the main and the
  side stream wait on; the worker issuing later chunks when a snapshot does not fit;
- worker -> training thread: ``Pools`` (tickets and free staging buffers), under each busy policy;
- training thread / any thread -> worker: ``run_after`` callables, in order with the jobs;
- worker -> readers: the worker's lock (reads from another thread);
- worker / issuer -> every thread: ``ErrorSlot`` and ``Job.issue_error``.
"""
import contextlib
import threading
import time

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema import ops
from offload_ema.testing import lazy_device
from helpers import (RefEMA, RefLAWA, assert_matches, call_with_timeout, make, slab, slab_reference,
                     snapshot, train_step)


SEEDS = [0, 1, 2, 3, 4]


def _run_slab(seed, steps, beta, staging=None, manual_no_fence=False, manual=False,
              claim_policy="race", max_delay=0.004):
    model, opt = slab()
    with lazy_device(seed=seed, max_delay=max_delay, claim_policy=claim_policy):
        with oe.Averager(model, {"ema": oe.EMA(beta)}, staging_bytes=staging) as avg:
            if not (manual_no_fence or manual):
                avg.attach(opt)
            for s in range(1, steps + 1):
                model.fake_backward(s)
                opt.step()
                if manual_no_fence:
                    avg.step(fence=False)  # breaks the contract: no fence() before the next step
                elif manual:
                    avg.step()  # fences at once: the training thread may issue the copies itself
            sd = avg.averaged_state_dict("ema")
            st = avg.stats()
    return [sd[f"ps.{i}"] for i in range(len(model.ps))], st


# ---- training thread -> issuer: the inbox and Job.claim ------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("staging", ["default", "chunked", "unpacked", "manual_step"])
def test_race_low_density_model_matches_synchronous_reference(seed, staging, monkeypatch):
    """Default: the slab's small tensors are packed on the "device" and leave in one copy;
    unpacked: one copy per tensor; chunked: the worker issues a quarter snapshot at a time;
    manual_step: avg.step() fences at once (the copies issued by whichever thread comes first)."""
    if staging == "unpacked":
        monkeypatch.setenv("OFFLOAD_EMA_PACK_BYTES", "0")
    steps, beta = 200, 0.9
    nbytes = 4 * 4096 * 2
    # Chunked: two buffers of a quarter snapshot, 4 chunks per snapshot.
    got, st = _run_slab(seed, steps, beta, nbytes // 2 if staging == "chunked" else None,
                        manual=staging == "manual_step")
    assert st["snapshots_applied"] == steps
    if staging != "chunked":  # (a chunk here holds one tensor: nothing to pack)
        assert (st["device_pack_bytes"] > 0) == (staging != "unpacked")
    if staging == "chunked":
        assert st["chunks_per_snapshot"] > 1
    for i, (a, b) in enumerate(zip(got, slab_reference(beta, steps))):
        assert torch.equal(a, b), f"ps.{i} differs from the synchronous reference (seed {seed})"


def _failing_from(k, message, real, only_once=False):
    """``real``, raising from its k-th call on (or at the k-th call only)."""
    calls = [0]

    def wrapped(*args, **kw):
        calls[0] += 1
        if calls[0] == k or (calls[0] > k and not only_once):
            raise RuntimeError(message)
        return real(*args, **kw)
    return wrapped


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("claim_policy", ["fence", "issuer"])
def test_each_side_of_the_claim_issues_whole_snapshots_exactly(seed, claim_policy):
    """The race above lets the first comer issue; here every snapshot's copies are issued by one
    side (the training thread's fence, or the issuer thread), each path alone under delays."""
    steps, beta = 60, 0.9
    got, st = _run_slab(seed, steps, beta, claim_policy=claim_policy, max_delay=0.002)
    assert st["snapshots_applied"] == steps
    for i, (a, b) in enumerate(zip(got, slab_reference(beta, steps))):
        assert torch.equal(a, b), f"ps.{i} differs ({claim_policy} issues, seed {seed})"


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_a_copy_the_fence_fails_to_issue_is_issued_by_the_issuer(seed, monkeypatch):
    """The fence's copy fails once (e.g. out of memory for a reshape): it hands the claim back
    and the issuer issues the whole snapshot again; nothing is lost or read twice."""
    from offload_ema.engine.staging import Staging
    wrap = _failing_from(5, "injected: the fence's copy failed", Staging.issue_whole,
                         only_once=True)
    monkeypatch.setattr(Staging, "issue_whole", lambda self, job: wrap(self, job))
    steps, beta = 30, 0.9
    got, st = _run_slab(seed, steps, beta, claim_policy="fence", max_delay=0.002)
    assert st["snapshots_applied"] == steps
    for i, (a, b) in enumerate(zip(got, slab_reference(beta, steps))):
        assert torch.equal(a, b), f"ps.{i} differs after the issuer's retry (seed {seed})"


# ---- issuer / fence -> worker and the next step: Job.issued and the copy events ------------------


def test_breaking_the_fence_contract_is_caught():
    steps, beta = 40, 0.9
    ref = slab_reference(beta, steps)
    caught = []
    for seed in SEEDS:
        try:
            got, _ = _run_slab(seed, steps, beta, manual_no_fence=True)
        except RuntimeError as exc:
            # The next step recorded its event before this snapshot's copies were issued: the
            # simulated device refuses a copy not ordered after the latest main-stream work.
            assert "simulated device" in str(exc)
            caught.append(True)
            continue
        caught.append(any(not torch.equal(a, b) for a, b in zip(got, ref)))
    assert any(caught), "no seed caught copies that read parameters after the next step"


def test_a_copy_not_ordered_after_the_optimizer_step_is_caught(monkeypatch):
    """On a GPU a side-stream copy that does not wait for the main stream can read parameters
    before the optimizer step wrote them; the simulated device refuses such a copy."""
    from offload_ema.testing import LazyOps

    real = LazyOps.stream_wait

    def forgetful(self, stream, event):  # the side stream's wait for the step is lost
        if stream == self.main_stream():
            real(self, stream, event)
    monkeypatch.setattr(LazyOps, "stream_wait", forgetful)
    model, opt = slab()
    with lazy_device(seed=0):
        avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
        model.fake_backward(1)
        opt.step()  # the copies are issued off the training thread: the error comes next call
        with pytest.raises(RuntimeError, match="without waiting on the main stream"):
            avg.flush()
        avg.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_several_averages_buffers_and_lawa_match_references(seed):
    model, opt = make()
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(3)}
    with lazy_device(seed=seed):
        with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=2)},
                         buffers="average") as avg:
            avg.attach(opt)
            for s in range(1, 13):
                train_step(model, opt, s)
                snap = snapshot(model)
                snap.update({k: v.double().clone() for k, v in model.named_buffers()
                             if v.is_floating_point()})
                refs["ema"].update(snap)
                if s % 2 == 0:
                    refs["lawa"].update(snap)
            for name, ref in refs.items():
                assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)


# ---- worker -> training thread: tickets and free staging (Pools) ---------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("policy", ["block", "skip", "coalesce"])
def test_busy_policies_stay_consistent(seed, policy):
    """One snapshot in flight at most, so every due step meets a busy worker: under block every
    step is taken, under skip / coalesce the applied snapshots must be exactly the ones counted as
    taken; the EMA equals a float64 reference of those snapshots with their elapsed periods."""
    model, opt = slab()
    beta = 0.8
    ref = RefEMA(beta)
    periods = 0
    with lazy_device(seed=seed, max_delay=0.01):
        with oe.Averager(model, {"ema": oe.EMA(beta)}, on_busy=policy,
                         staging_bytes=4 * 4096 * 2) as avg:  # one snapshot in flight at most
            avg.attach(opt)
            for s in range(1, 41):
                model.fake_backward(s)
                before = avg.stats()["snapshots_taken"]
                opt.step()
                periods += 1
                if avg.stats()["snapshots_taken"] > before:
                    snap = {f"ps.{i}": p.detach().double().clone() for i, p in enumerate(model.ps)}
                    ref.update(snap, periods=periods if policy == "coalesce" else 1)
                    periods = 0
            got = avg.averaged_state_dict("ema")
            st = avg.stats()
    assert st["snapshots_applied"] == st["snapshots_taken"]
    others = {"block": 0, "skip": st["snapshots_skipped"], "coalesce": st["snapshots_coalesced"]}
    assert st["snapshots_taken"] + others[policy] == 40
    if policy == "block":
        assert st["snapshots_taken"] == 40
    assert_matches(got, ref.avg, rtol=1e-6, atol=1e-6)


# ---- any thread -> worker: run_after callables, in order with the jobs ---------------------------


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_callables_run_after_every_snapshot_submitted_before_them(seed):
    """A callable queued after step s (saves, flush and reads are such callables) runs on the
    worker once step s's snapshot is applied and before step s+1's: the issuer passes jobs and
    callables on in the order received, whichever side issued the copies."""
    model, opt = slab()
    seen, expected = [], []
    with lazy_device(seed=seed, max_delay=0.002):
        with oe.Averager(model, {"last": oe.LAWA(1, every=1)}) as avg:
            avg.attach(opt)
            worker = avg._engine.worker
            for s in range(1, 31):
                model.fake_backward(s)
                opt.step()
                expected.append((s, {f"ps.{i}": p.detach().float().clone()
                                     for i, p in enumerate(model.ps)}))
                # On the worker thread, which owns its counters and the averages here.
                avg._engine.run_after(lambda s=s: seen.append(
                    (s, worker.stats["snapshots_applied"],
                     avg._engine.copies("last"))))
            call_with_timeout(avg.flush, 60, "flush", abandon=[avg])
    assert [s for s, _, _ in seen] == list(range(1, 31))
    for (s, applied, values), (_, weights) in zip(seen, expected):
        assert applied == s, f"the callable after step {s} saw {applied} snapshots applied"
        for n, w in weights.items():
            assert torch.equal(values[n], w), f"{n} after step {s} is not step {s}'s weights"


# ---- worker -> readers: the worker's lock --------------------------------------------------------


@pytest.mark.parametrize("device", ["host", "lazy"])
def test_reads_from_another_thread_are_never_torn(device):
    """LAWA(window=1) equals one step's weights exactly: a read mixing two steps is visible."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 300
    history = {}  # step -> the weights of that step
    reads, problems = [], []
    stop = threading.Event()
    ctx = lazy_device(seed=0, max_delay=0.001) if device == "lazy" else contextlib.nullcontext()
    with ctx, oe.Averager(model, {"last": oe.LAWA(1, every=1)}) as avg:
        avg.attach(opt)

        def reader():
            while not stop.is_set():
                if not avg.ready("last"):
                    continue
                try:
                    sd = avg.averaged_state_dict("last")
                    st = avg.stats()
                    state = avg._rank_state_dict()  # (the ring's positions: flat buffers)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    problems.append(repr(exc))
                    return
                reads.append((sd, st, state))
        t = threading.Thread(target=reader)
        t.start()
        for s in range(1, steps + 1):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            history[s] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stop.set()
        t.join(60)
        assert not t.is_alive(), "the reader thread did not finish in 60 s"
    assert not problems, problems
    assert len(reads) >= 20, f"only {len(reads)} reads happened"
    for sd, st, state in reads:
        matching = [s for s, w in history.items() if all(torch.equal(sd[k], w[k]) for k in w)]
        assert matching, "a read mixed tensors of different steps"
        assert st["snapshots_applied"] <= st["snapshots_taken"] <= st["step"]
        # A state read from another thread is the state after one applied snapshot.
        ring = state["averages"]["last"]
        assert ring["applied"] == state["step"] == ring["last_step"]
        assert all(torch.equal(a, b) for a, b in zip(
            ring["slots"][ring["order"][0]], _flat(history[state["step"]])))


def _flat(weights):
    return [torch.cat([v.reshape(-1) for v in weights.values()])]


# ---- worker / issuer -> every thread: ErrorSlot and Job.issue_error ------------------------------


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("where", ["issuer", "worker"])
def test_a_failure_on_a_background_thread_reaches_the_training_thread(seed, where, monkeypatch):
    """Copies that fail to issue (on the fence, then the issuer: ``Job.issue_error``) or an update
    that fails on the worker (``ErrorSlot``), with the copies deferred: the next call on the
    training thread raises it, every ticket and staging buffer comes back, close returns."""
    from offload_ema.engine.staging import Staging
    message = f"injected {where} failure"
    if where == "issuer":
        wrap = _failing_from(4, message, Staging.issue_whole)
        monkeypatch.setattr(Staging, "issue_whole", lambda self, job: wrap(self, job))
    else:
        monkeypatch.setattr(ops, "ema_update_multi_",
                            _failing_from(4, message, ops.ema_update_multi_))
    model, opt = slab()
    with lazy_device(seed=seed, max_delay=0.002):
        avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)

        def train():
            for s in range(1, 21):
                model.fake_backward(s)
                opt.step()
            avg.flush()
        with pytest.raises(RuntimeError, match=message):
            call_with_timeout(train, 60, "training until the failure is reported", abandon=[avg])
        # The error is reported at once; snapshots queued behind the failed one are then
        # released by the worker without being applied: every ticket and buffer comes back.
        deadline = time.monotonic() + 30
        while avg.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert avg.stats()["in_flight"] == 0, "staging still held 30 s after the failure"
        with pytest.raises(RuntimeError, match="failed earlier"):
            call_with_timeout(avg.flush, 60, "a flush after the failure", abandon=[avg])
        call_with_timeout(avg.close, 60, "close", abandon=[avg])
