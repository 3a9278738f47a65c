"""Small models, a deterministic training loop and float64 references for the Averager tests."""
import collections
import importlib.util
import os

import torch
from torch import nn

from offload_ema import ops


class TinyNet(nn.Module):
    def __init__(self, dtype=torch.float32, width=16):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 4)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.to(self.fc1.weight.dtype)))))


def make(seed=0, dtype=torch.float32, lr=0.05, model_cls=TinyNet, **kw):
    torch.manual_seed(seed)
    model = model_cls(dtype=dtype, **kw) if model_cls is TinyNet else model_cls(**kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    return model, opt


def train_step(model, opt, step, batch=4):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, 8, generator=g)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def snapshot(model, names=None):
    """{name: float64 copy} of the trainable parameters (the reference's view of a snapshot)."""
    return {n: p.detach().double().clone() for n, p in model.named_parameters()
            if p.requires_grad and (names is None or n in names)}


class RefEMA:
    """float64 EMA with the library's semantics: first snapshot initialises, then
    avg = beta * avg + (1 - beta) * theta per applied snapshot."""

    def __init__(self, beta):
        self.beta, self.avg = beta, None

    def update(self, snap, periods=1):
        if self.avg is None:
            self.avg = {k: v.clone() for k, v in snap.items()}
        else:
            w = 1 - self.beta ** periods
            for k, v in snap.items():
                self.avg[k] = self.avg[k] + w * (v - self.avg[k])


class RefDecay:
    """float64 avg_k = beta_k * avg + (1 - beta_k) * theta, with the betas given by a function
    of k, the count of due periods (a coalesced snapshot stands for several: their betas
    multiply)."""

    def __init__(self, beta_at):
        self.beta_at, self.avg, self.k = beta_at, None, 0

    def update(self, snap, periods=1):
        keep = 1.0
        for _ in range(periods):
            self.k += 1
            keep *= self.beta_at(self.k)
        if self.avg is None:
            self.avg = {k: v.clone() for k, v in snap.items()}
        else:
            self.avg = {k: keep * self.avg[k] + (1 - keep) * v for k, v in snap.items()}


class RefLAWA:
    """A plain deque of the last `window` snapshots and their float64 mean."""

    def __init__(self, window):
        self.q = collections.deque(maxlen=window)

    def update(self, snap):
        self.q.append(snap)

    @property
    def avg(self):
        return {k: sum(s[k] for s in self.q) / len(self.q) for k in self.q[0]}


def assert_matches(got, ref, rtol=2e-6, atol=1e-7):
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


class Reg(nn.Module):
    """A tiny regression model in the Hugging Face style: forward(x, labels) -> {"loss", ...}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class RegData(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x.sum(1, keepdim=True).sin()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def load_bench_script(name):
    """bench/<name>.py as a module (the scripts are not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def call_with_timeout(fn, timeout, what, abandon=()):
    """``fn()`` on a daemon thread; fails the test (never hangs it) if it has not returned
    after ``timeout`` seconds. ``abandon``: Averagers to leave to their daemon threads then, so
    that the interpreter's exit does not wait on them either. Returns ``fn``'s result or
    re-raises its exception."""
    import threading

    import pytest

    from offload_ema import hooks

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True, name=f"test: {what}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        for avg in abandon:
            hooks._open.discard(avg)
        pytest.fail(f"{what} did not return within {timeout} s (hung)")
    if "error" in out:
        raise out["error"]
    return out.get("value")


class Slab(nn.Module):
    """Low arithmetic density: a trivial SGD step on fixed gradients, so that a copy that reads
    the parameters after the next step has started shows up as a wrong average."""

    def __init__(self, n=4, size=4096, dtype=torch.bfloat16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = nn.ParameterList(
            [nn.Parameter(torch.randn(size, generator=g).to(dtype)) for _ in range(n)])
        self.grads = [[torch.randn(size, generator=g).to(dtype) for _ in self.ps] for _ in range(3)]

    def fake_backward(self, step):
        for p, grad in zip(self.ps, self.grads[step % 3]):
            p.grad = grad


def slab(size=4096):
    model = Slab(size=size)
    return model, torch.optim.SGD(model.parameters(), lr=1e-2)


def slab_reference(beta, steps, size=4096):
    """The same training with each snapshot averaged synchronously by the same kernel."""
    model, opt = slab(size)
    acc = None
    for s in range(1, steps + 1):
        model.fake_backward(s)
        opt.step()
        snap = [p.detach().clone() for p in model.ps]
        if acc is None:
            acc = [x.float() for x in snap]
        else:
            for a, x in zip(acc, snap):
                ops.ema_update_(a, x, 1 - beta)
    return acc


def run_steps(model, opt, avg, steps, start=0, on_step=None):
    for s in range(start + 1, start + steps + 1):
        train_step(model, opt, s)
        if on_step:
            on_step(s)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))
