"""Files from elsewhere (a downloaded checkpoint, a colleague's run): reading them never runs
code from them, and a damaged or crafted file is a ValueError naming it, with the model and the
Averager left as they were."""
import json
import pickle
import random
import struct

import pytest
import torch

import offload_ema as oe
from offload_ema import resume
from helpers import make, train_step

N_SNAPSHOT, N_STATE = 130, 110  # mutations of each kind (240 in all)


class Planted:
    """A pickle that would create a file when loaded with plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("untrusted")
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=1)}).attach(opt)
    for s in range(1, 6):
        train_step(model, opt, s)
    avg.save(tmp / "ema.safetensors", "ema").result(timeout=60)
    state = avg._rank_state_dict()  # the per-rank format (the integrations' files)
    torch.save(state, tmp / "state.pt")
    torch.save(avg.state_dict(), tmp / "global.pt")
    avg.close()
    return tmp, state


def _same_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def _snapshot_mutations(raw: bytes, rng: random.Random):
    """(label, bytes) of damaged or crafted safetensors snapshot files."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = []
    for cut in sorted(rng.sample(range(1, len(raw)), 30)):
        out.append((f"truncated at {cut}", raw[:cut]))
    for _ in range(40):  # flipped bytes in the length and the JSON header
        b = bytearray(raw)
        i = rng.randrange(0, 8 + n)
        b[i] ^= 1 << rng.randrange(8)
        out.append((f"bit flipped at {i}", bytes(b)))
    for big in (2 ** 62, 2 ** 40, 2 ** 31, n + 1, len(raw)):
        out.append((f"header length {big}", struct.pack("<Q", big) + raw[8:]))

    def crafted(label, edit):
        h = json.loads(json.dumps(header))
        edit(h)
        head = json.dumps(h).encode()
        head += b" " * (-len(head) % 8)
        out.append((label, struct.pack("<Q", len(head)) + head + raw[8 + n:]))
    tensors = [k for k in header if k != "__metadata__"]
    for key, value in [("step", "abc"), ("step", "-"), ("applied", "1e999"), ("average", "[1,2]"),
                       ("average", "{"), ("average", '"ema"'), ("format", "other"),
                       ("world", "x"), ("dtype", "complex128"), ("passthrough", "{")]:
        crafted(f"metadata {key}={value!r}",
                lambda h, k=key, v=value: h["__metadata__"].__setitem__(k, v))
    crafted("no metadata", lambda h: h.pop("__metadata__"))
    crafted("metadata not strings", lambda h: h["__metadata__"].__setitem__("step", 5))
    while len(out) < N_SNAPSHOT:
        k = rng.choice(tensors)
        kind = rng.choice(["offsets", "shape", "dtype", "name", "drop"])
        if kind == "offsets":
            lo = rng.choice([0, 2 ** 50, -1])
            crafted(f"{k} data_offsets from {lo}",
                    lambda h, k=k, lo=lo: h[k].__setitem__("data_offsets", [lo, lo + 2 ** 40]))
        elif kind == "shape":
            shape = rng.choice([[2 ** 31, 2 ** 31], [-1], [0], [3, 3, 3, 3]])
            crafted(f"{k} shape {shape}", lambda h, k=k, s=shape: h[k].__setitem__("shape", s))
        elif kind == "dtype":
            dt = rng.choice(["F64", "I8", "BOOL", "XX"])
            crafted(f"{k} dtype {dt}", lambda h, k=k, d=dt: h[k].__setitem__("dtype", d))
        elif kind == "name":
            crafted(f"{k} renamed", lambda h, k=k: h.__setitem__(k + ".x", h.pop(k)))
        else:
            crafted(f"{k} dropped", lambda h, k=k: h.pop(k))
    return out


def test_damaged_and_crafted_snapshots_are_refused_naming_the_file(trained, tmp_path):
    src, _ = trained
    raw = (src / "ema.safetensors").read_bytes()
    original, _ = oe.load_snapshot(src / "ema.safetensors")
    model, _ = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mutations = _snapshot_mutations(raw, random.Random(0))
    assert len(mutations) >= N_SNAPSHOT
    refused = 0
    for i, (label, data) in enumerate(mutations):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(data)
        try:
            oe.load_snapshot(path)  # a ValueError naming the file, or tensors (checked next)
        except ValueError as exc:
            assert str(path) in str(exc), (label, str(exc))
        try:
            oe.apply_snapshot(model, path)
        except ValueError as exc:
            assert str(path) in str(exc), (label, str(exc))
            refused += 1
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), label
            continue
        # Applied: only a change the format cannot see (a timestamp's digit, JSON spacing);
        # the model holds what was written.
        for k, v in model.state_dict().items():
            assert torch.equal(v.to(original[k].dtype), original[k]), f"{label}: {k} differs"
        model.load_state_dict(before)
    assert refused >= 0.9 * len(mutations), (refused, len(mutations))
    print(f"{refused} of {len(mutations)} damaged or crafted snapshots refused, the others "
          "held the written tensors")


def _state_mutations(state: dict, raw: bytes, rng: random.Random, marker):
    """(label, bytes) of damaged or crafted Averager state files."""
    out = []
    for cut in sorted(rng.sample(range(1, len(raw)), 25)):
        out.append((f"truncated at {cut}", raw[:cut]))
    # Flipped bits anywhere but in the tensors' bytes (the pickle, the zip's headers and
    # directory): a torch.save file carries no checksum of its tensor records, so a flip there
    # reads as another value (keep checksums of checkpoints that travel).
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        data = []
        for i in z.infolist():
            if "/data/" in i.filename:  # local header: 30 bytes, the name, its own extra field
                lo = i.header_offset + 30 + struct.unpack_from("<H", raw, i.header_offset + 26)[0] \
                    + struct.unpack_from("<H", raw, i.header_offset + 28)[0]
                data.append((lo, lo + i.compress_size))
    outside = [i for i in range(len(raw)) if not any(lo <= i < hi for lo, hi in data)]
    for i in rng.sample(outside, 25):
        b = bytearray(raw)
        b[i] ^= 1 << rng.randrange(8)
        out.append((f"bit flipped at {i}", bytes(b)))

    def crafted(label, edit):
        s = pickle.loads(pickle.dumps(state))
        edit(s)
        import io
        buf = io.BytesIO()
        torch.save(s, buf)
        out.append((label, buf.getvalue()))
    ema, lawa = "ema", "lawa"
    edits = [
        ("format 2", lambda s: s.__setitem__("format", 2)),
        ("step -1", lambda s: s.__setitem__("step", -1)),
        ("step a string", lambda s: s.__setitem__("step", "5")),
        ("step a float", lambda s: s.__setitem__("step", 5.0)),
        ("no averages", lambda s: s.pop("averages")),
        ("averages a list", lambda s: s.__setitem__("averages", [1])),
        ("layout a number", lambda s: s.__setitem__("layout", 3)),
        ("layout reshaped", lambda s: s["layout"].__setitem__(0, [s["layout"][0][0], [1, 1],
                                                                  s["layout"][0][2]])),
        ("counts a string", lambda s: s.__setitem__("counts", "x")),
        ("counts negative", lambda s: s["counts"].__setitem__("snapshots_taken", -4)),
        ("acc shorter", lambda s: s["averages"][ema].__setitem__(
            "acc", [t[:-1] for t in s["averages"][ema]["acc"]])),
        ("acc float64", lambda s: s["averages"][ema].__setitem__(
            "acc", [t.double() for t in s["averages"][ema]["acc"]])),
        ("acc missing", lambda s: s["averages"][ema].pop("acc")),
        ("acc a dict", lambda s: s["averages"][ema].__setitem__("acc", {"0": 1})),
        ("applied a string", lambda s: s["averages"][ema].__setitem__("applied", "3")),
        ("ring order out of range", lambda s: s["averages"][lawa].__setitem__("order", [0, 9])),
        ("ring order repeated", lambda s: s["averages"][lawa].__setitem__("order", [0, 0])),
        ("ring slot missing", lambda s: s["averages"][lawa]["slots"].pop(
            s["averages"][lawa]["order"][0])),
        ("ring slot wrong shape", lambda s: s["averages"][lawa]["slots"].__setitem__(
            s["averages"][lawa]["order"][0],
            [torch.zeros(2) for _ in s["averages"][lawa]["slots"][0]])),
        ("next_pos 7", lambda s: s["averages"][lawa].__setitem__("next_pos", 7)),
        ("config changed", lambda s: s["averages"][ema]["config"].__setitem__("beta", 0.5)),
        ("another average", lambda s: s["averages"].__setitem__("x", {})),
        ("rank 1", lambda s: s.__setitem__("rank", 1)),
    ]
    for label, edit in edits:
        crafted(label, edit)
    import io
    for payload in (Planted(str(marker)), {"format": 1, "x": Planted(str(marker))},
                    [state, Planted(str(marker))]):
        buf = io.BytesIO()
        torch.save(payload, buf)
        out.append(("planted pickle", buf.getvalue()))
    while len(out) < N_STATE:
        label, edit = rng.choice(edits)
        crafted(label + " (again)", edit)
    return out


def test_damaged_and_crafted_states_are_refused_naming_the_file(trained, tmp_path):
    src, state = trained
    raw = (src / "state.pt").read_bytes()
    marker = tmp_path / "code-ran"
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=1)}) as avg:
        avg.attach(opt)
        for s in range(1, 4):
            train_step(model, opt, s + 10)  # its own averages: they must survive every refusal
        before = avg._rank_state_dict()
        mutations = _state_mutations(state, raw, random.Random(1), marker)
        assert len(mutations) >= N_STATE
        refused = 0
        for i, (label, data) in enumerate(mutations):
            path = tmp_path / f"s{i}.pt"
            path.write_bytes(data)
            try:
                resume.load_into(avg, path)
            except ValueError as exc:
                assert str(path) in str(exc), (label, str(exc))
                refused += 1
                assert not marker.exists(), f"{label}: code in the file ran"
                assert _same_state(avg._rank_state_dict(), before), f"{label}: the Averager changed"
                continue
            # Accepted: only a change that leaves the same state (a flip the zip reader does
            # not see, in bytes nothing reads).
            assert _same_state(avg._rank_state_dict(), state), f"{label}: loaded a different state"
            avg.load_state_dict(before)
        assert not marker.exists()
        # (The rest: flips in zip fields or strings that nothing reads.)
        assert refused >= 0.8 * len(mutations), (refused, len(mutations))
        print(f"{refused} of {len(mutations)} damaged or crafted states refused, the others "
              "held the saved state")


def _global_mutations(state):
    """Crafted global states (state_dict(): tensors under global names, metadata as JSON in a
    uint8 tensor), each as (label, state)."""
    import json

    meta = resume.read_meta(state[resume.META_KEY])

    def with_meta(edit):
        m = json.loads(json.dumps(meta))
        edit(m)
        return {**state, resume.META_KEY: resume._meta_tensor(m)}

    some_key = next(k for k in state if k.startswith("ema/"))
    slot_key = next(k for k in state if k.startswith("lawa/slot0/"))
    raw = state[resume.META_KEY].clone()
    raw[:8] = torch.tensor(list(b"garbage!"), dtype=torch.uint8)
    return [
        ("metadata not json", {**state, resume.META_KEY: raw}),
        ("metadata a float tensor", {**state, resume.META_KEY: torch.zeros(4)}),
        ("metadata cut short", {**state, resume.META_KEY: state[resume.META_KEY][:100]}),
        ("format 3", with_meta(lambda m: m.__setitem__("format", 3))),
        ("step -1", with_meta(lambda m: m.__setitem__("step", -1))),
        ("step a string", with_meta(lambda m: m.__setitem__("step", "5"))),
        ("counts negative", with_meta(lambda m: m["counts"].__setitem__("snapshots_taken", -1))),
        ("no averages", with_meta(lambda m: m.pop("averages"))),
        ("another average", with_meta(lambda m: m["averages"].__setitem__("x", {}))),
        ("config changed", with_meta(lambda m: m["averages"]["ema"]["config"].__setitem__(
            "beta", 0.5))),
        ("filled 9", with_meta(lambda m: m["averages"]["lawa"].__setitem__("filled", 9))),
        ("filled a string", with_meta(lambda m: m["averages"]["lawa"].__setitem__("filled",
                                                                                   "2"))),
        ("applied negative", with_meta(lambda m: m["averages"]["ema"].__setitem__("applied",
                                                                                   -2))),
        ("a tensor missing", {k: v for k, v in state.items() if k != some_key}),
        ("a slot missing", {k: v for k, v in state.items() if k != slot_key}),
        ("a tensor reshaped", {**state, some_key: state[some_key].reshape(-1)}),
        ("a tensor a number", {**state, some_key: 3}),
        ("a tensor float64", {**state, some_key: state[some_key].double()}),
    ]


def test_crafted_global_states_are_refused_and_change_nothing(trained, tmp_path):
    """The global state (state_dict(), what DCP saves): every crafted field refused naming the
    file, the Averager unchanged; the untouched state loads."""
    src, _ = trained
    state = resume.load_file(src / "global.pt")
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=1)}) as avg:
        avg.attach(opt)
        for s in range(1, 4):
            train_step(model, opt, s + 10)
        before = avg._rank_state_dict()
        for i, (label, crafted) in enumerate(_global_mutations(state)):
            path = tmp_path / f"g{i}.pt"
            torch.save(crafted, path)
            with pytest.raises(ValueError) as info:
                resume.load_into(avg, path)
            assert str(path) in str(info.value), (label, str(info.value))
            assert _same_state(avg._rank_state_dict(), before), f"{label}: the Averager changed"
        resume.load_into(avg, src / "global.pt")
        assert avg.stats()["step"] == resume.read_meta(state[resume.META_KEY])["step"]


def test_a_planted_pickle_in_a_dcp_checkpoints_metadata_is_refused(trained, tmp_path):
    """torch.distributed.checkpoint's .metadata is a pickle by design: it is read with an allow
    list, so a planted one runs nothing and is refused naming the file (load_snapshot,
    apply_snapshot, consolidate all read DCP directories this way)."""
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "ema.dcp"
    ckpt.mkdir()
    (ckpt / "offload_ema.json").write_text(json.dumps({"format": "offload_ema.snapshot",
                                                       "name": "ema", "step": "1",
                                                       "average": "{}"}))
    (ckpt / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(ValueError, match=r"\.metadata.*nothing in it ran"):
        oe.load_snapshot(ckpt)
    model, _ = make()
    with pytest.raises(ValueError, match=r"\.metadata"):
        oe.apply_snapshot(model, ckpt)
    from offload_ema import cli
    assert cli.main(["consolidate", str(ckpt), str(tmp_path / "one.safetensors")]) == 1
    assert not marker.exists()
    assert not (tmp_path / "one.safetensors").exists()
