"""Averaged weights on disk: safetensors files written atomically in the background, and loaded
back into a model.

A file holds one tensor per state_dict entry of the unwrapped model (averaged entries in float32
by default, or the dtype asked for; integer buffers in their own dtype) and string metadata:
``format`` ("offload_ema.snapshot"), ``version``, ``name``, ``average`` (JSON: kind, beta /
window, every, start), ``step``, ``applied``, ``created`` (ISO 8601, UTC), ``dtype``,
``passthrough`` (JSON list of the entries not averaged: buffers, frozen parameters) and, in a
sharded snapshot's per-rank files, ``world``, ``rank`` and ``shards`` (split tensors' offsets).

Writes go to a temporary file in the destination directory, are flushed and fsynced, then renamed
over the final path, and the directory is fsynced: a process killed at any moment leaves the
previous complete file or the new complete file under the final name, never a partial one.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import errno
import glob
import itertools
import json
import os
import re
import shutil
import socket
import string
import threading
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from offload_ema._version import __version__
from offload_ema.layout import local_tensor, normalise_name, unwrap_model

__all__ = ["load_snapshot", "apply_snapshot", "SnapshotFuture"]

FORMAT = "offload_ema.snapshot"
_TMP_INFIX = ".tmp-"
# Our temporaries: ".<final name>.tmp-<pid>-<n>@<host>". The host says whose pid it is: on a
# disk shared by several machines (a multi-node run's ranks), only this machine can tell whether
# the writer is gone. (Names without a host are from earlier versions: taken as this host's.)
_TMP_NAME = re.compile(r"^\..+" + re.escape(_TMP_INFIX) + r"(\d+)-\d+(?:@(.+))?$")
_HOST = socket.gethostname().replace("/", "_")
_counter = itertools.count()
_writing: set = set()  # this process's temporaries being written now
_writing_lock = threading.Lock()


class SnapshotFuture(concurrent.futures.Future):
    """The future ``Averager.save`` returns. Its result is the final path. An error it carries is
    also raised once by the Averager's next ``step`` / ``flush`` unless ``result()`` or
    ``exception()`` has already shown it."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.observed = False
        self.seconds = 0.0  # time spent writing (serialise, fsync, rename)
        self.nbytes = 0     # size of the file written

    def result(self, timeout=None):
        self.observed = True
        return super().result(timeout)

    def exception(self, timeout=None):
        self.observed = True
        return super().exception(timeout)

    def _exception_unseen(self):
        """The error, if it carries one nobody has looked at yet (does not mark it seen)."""
        if self.observed:
            return None
        return super().exception(0)


def metadata(name: str, config: dict, step: int, applied: int, dtype: torch.dtype) -> Dict[str, str]:
    return {
        "format": FORMAT,
        "version": __version__,
        "name": name,
        "average": json.dumps(config, sort_keys=True),
        "step": str(step),
        "applied": str(applied),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _replace_atomically(path: str, write) -> None:
    """Calls ``write(tmp)`` for a temporary file in ``path``'s directory, then renames it over
    ``path`` and fsyncs the directory; the temporary is removed if anything fails. ``write`` must
    flush and fsync what it writes."""
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    tmp = _temporary(directory, base)
    with _writing_lock:
        _writing.add(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _user_error(exc, path) from exc
        raise
    finally:
        with _writing_lock:
            _writing.discard(tmp)
    _fsync_dir(directory)  # the rename itself survives a crash
    _remove_stale_temporaries(directory)


def _temporary(directory: str, base: str) -> str:
    return os.path.join(directory,
                        f".{base}{_TMP_INFIX}{os.getpid()}-{next(_counter)}@{_HOST}")


def _user_error(exc: OSError, path: str) -> OSError:
    """``exc`` (met on one of our temporaries, named after it) told about the path the user
    asked for."""
    if exc.errno is None:
        return OSError(f"cannot write {path}: {exc}")
    return type(exc)(exc.errno, f"cannot write it: {exc.strerror}", path)


def write_atomic(path: str, tensors: Mapping[str, torch.Tensor], meta: Dict[str, str]) -> int:
    """Writes a safetensors file so that ``path`` is never seen half-written; returns its size."""
    _replace_atomically(path, lambda tmp: _write_file(tmp, tensors, meta))
    return os.path.getsize(path)


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _write_file(path: str, tensors: Mapping[str, torch.Tensor], meta: Dict[str, str]) -> None:
    """Writes the safetensors format (an 8-byte little-endian header length, a JSON header padded
    to 8 bytes, then the tensors' bytes back to back) straight from the tensors' memory.

    safetensors.torch.save / save_file first build the whole file as one bytes object (an extra
    copy of the average, written at a fraction of the disk's speed while it holds the GIL), and
    save_file keeps temporaries of its own that a killed process would leave under names we could
    not recognise. Files are read back with safetensors (load_snapshot), which checks them.
    """
    header: Dict[str, object] = {"__metadata__": dict(meta)}
    views, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which snapshots cannot store")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + raw.numel()]}
        offset += raw.numel()
        views.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "xb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in views:
            if raw.numel():
                f.write(memoryview(raw.numpy()))  # releases the GIL while the bytes go out
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the final name points at them


def shard_paths(path: str, rank: int, world: int) -> Tuple[str, str]:
    """(this rank's file, the index) for a sharded snapshot named ``path``, in the Hugging Face
    sharded-checkpoint convention: ``ema-00001-of-00002.safetensors`` and
    ``ema.safetensors.index.json``."""
    path = os.fspath(path)
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    return f"{stem}-{rank + 1:05d}-of-{world:05d}.safetensors", f"{stem}.safetensors.index.json"


def write_index(path: str, weight_map: Dict[str, object], meta: Dict[str, str]) -> None:
    """Writes the sharded-files index atomically. ``weight_map`` maps each name to its file, or
    (a tensor split across ranks) to the list of files holding its row blocks."""
    meta = {k: v for k, v in meta.items() if k not in ("rank", "shards")}
    data = json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1)

    def write(tmp):
        with open(tmp, "x") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _replace_atomically(path, write)


DCP_META = "offload_ema.json"


def write_dcp(path: str, state: Mapping[str, torch.Tensor], meta: Dict[str, str], group,
              rank: int, tag: str) -> int:
    """Writes a torch.distributed.checkpoint directory (every rank of ``group`` calls this with
    its own shards). It is written under a temporary name that is the same on every rank and,
    once complete, renamed to ``path`` by rank 0; a previous checkpoint there is replaced.
    Returns the bytes this rank wrote."""
    import torch.distributed.checkpoint as dcp

    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}{_TMP_INFIX}dcp-{tag}")
    dcp.save(dict(state), storage_writer=dcp.FileSystemWriter(tmp), process_group=group)
    # Counted from the tensors: rank 0 may already be renaming the directory.
    mine = sum(local_tensor(t).numel() * t.element_size() for t in state.values())
    if rank != 0:
        return mine
    # dcp.save has returned on rank 0 only after every rank's data and the metadata are written.
    with open(os.path.join(tmp, DCP_META), "x") as f:
        json.dump({k: v for k, v in meta.items() if k not in ("rank", "shards")}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    _put_directory(tmp, path, os.path.join(directory, f".{base}{_TMP_INFIX}old-{tag}"))
    return mine


def _put_directory(tmp: str, path: str, old: str) -> None:
    """Renames the complete directory ``tmp`` to ``path``; a directory already there is moved to
    ``old`` first and removed only after."""
    moved = os.path.exists(path)
    if moved:
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def write_directory(path: str, write) -> int:
    """Calls ``write(tmp)`` for a temporary directory beside ``path``, then puts it in place of
    ``path`` (``_put_directory``); the temporary is removed if anything fails, and those of
    writers killed mid-write are removed too. Returns the bytes of the files written."""
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise _user_error(exc, path) from exc
    _remove_stale_temporaries(directory)
    tmp, old = _temporary(directory, base), _temporary(directory, base)
    with _writing_lock:
        _writing.update((tmp, old))
    try:
        os.makedirs(tmp)
        write(tmp)
        nbytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)
                     if os.path.isfile(os.path.join(tmp, f)))
        _fsync_dir(tmp)
        _put_directory(tmp, path, old)
        return nbytes
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _user_error(exc, path) from exc
        raise
    finally:
        with _writing_lock:
            _writing.difference_update((tmp, old))


def _load_dcp(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """A torch.distributed.checkpoint directory written by ``save(..., format="dcp")``, put
    together in this process. DCP's ``.metadata`` is a pickle by design: it is read with an
    unpickler that builds only DCP's metadata classes, sizes, dtypes and paths (anything else
    is refused, so no code in it runs); the tensor files are read as tensors only."""
    try:
        with open(os.path.join(path, DCP_META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not an offload_ema checkpoint directory (no readable "
                         f"{DCP_META}): {exc}") from exc

    return read_dcp_tensors(path), _parse_meta(meta, path)


def read_dcp_tensors(path: str, select=None) -> Dict[str, torch.Tensor]:
    """The tensors of a torch.distributed.checkpoint directory (those whose key ``select``
    accepts; all by default), whole, in this process (no process group): the ``.metadata``
    read with an allow list (:func:`read_dcp_metadata`), the data files as tensors only. Keys
    as DCP flattened them (``"averager.ema/fc.weight"``). Non-tensor values (an optimizer's
    settings) are never read: DCP would unpickle them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    metadata = read_dcp_metadata(path)  # before DCP's loader (which wraps errors of its own)

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if hasattr(metadata, "storage_meta"):  # as FileSystemReader does (torch >= 2.5)
                from torch.distributed.checkpoint.metadata import StorageMeta
                if metadata.storage_meta is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    tensors: Dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata) and (select is None or select(key)):
            tensors[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    try:
        _load_state_dict(tensors, storage_reader=Reader(path), planner=DefaultLoadPlanner(),
                         no_dist=True)
    except Exception as exc:  # a damaged checkpoint: reported naming it
        raise ValueError(f"{path}: the checkpoint's data cannot be read ({type(exc).__name__}: "
                         f"{exc})") from None
    return tensors  # (loaded in place, under the keys asked for)


def read_dcp_metadata(path: str):
    """The ``.metadata`` of a torch.distributed.checkpoint directory, unpickled with an allow
    list (DCP's metadata classes, torch sizes and dtypes, paths): a file asking for any other
    object is a ValueError naming it, and nothing in it runs."""
    import pickle

    import torch.distributed.checkpoint.metadata as dcp_metadata

    meta_path = os.path.join(path, ".metadata")

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module == dcp_metadata.__name__ and isinstance(
                    getattr(dcp_metadata, name, None), type):
                return getattr(dcp_metadata, name)
            if (module, name) in _DCP_GLOBALS:
                import importlib
                return getattr(importlib.import_module(module), name)
            if module == "torch" and isinstance(getattr(torch, name, None),
                                                (torch.dtype, torch.layout, torch.memory_format)):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's "
                                         "metadata")

    try:
        with open(meta_path, "rb") as f:
            metadata = Restricted(f).load()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{meta_path}: not a torch.distributed.checkpoint metadata file, or one "
                         f"asking for more than metadata (refused; nothing in it ran): "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"{meta_path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


# What else DCP's metadata pickle refers to (torch 2.4 to 2.13): sizes, the layout lookup by
# name, the filesystem writer's storage records, and the checkpoint id's path class.
_DCP_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(directory: str) -> None:
    """Our temporaries in ``directory``, of any final name (``save_every``'s names change with
    the step), left by processes of this host that no longer run (killed mid-write)."""
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(".")]
    except OSError:
        return
    for name in names:
        m = _TMP_NAME.match(name)
        if not m or (m.group(2) is not None and m.group(2) != _HOST):
            continue  # not ours, or another machine's writer: only it knows whether it runs
        pid, tmp = int(m.group(1)), os.path.join(directory, name)
        if pid != os.getpid() and _alive(pid):
            continue  # another live process is writing right now
        if pid == os.getpid() and _own_in_flight(tmp):
            continue
        try:
            if os.path.isdir(tmp):  # a directory's (write_directory)
                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
        except OSError:
            pass


def _own_in_flight(tmp: str) -> bool:
    with _writing_lock:
        return tmp in _writing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Retention:
    """Keeps the ``keep_last`` newest files of one path template (``{name}``, ``{step}`` with an
    optional format spec such as ``{step:08d}``)."""

    def __init__(self, template: str, keep_last: Optional[int]):
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if "step" not in fields:
            raise ValueError(f"path template must contain {{step}}, got {template!r}")
        self.template, self.keep_last = template, keep_last
        self._warned: set = set()  # names already warned about another run's files

    def _patterns(self, name: str) -> Tuple[str, "re.Pattern"]:
        glob_pat, regex = "", ""
        for literal, field, spec, _ in string.Formatter().parse(self.template):
            glob_pat += glob.escape(literal)
            regex += re.escape(literal)
            if field == "name":
                value = format(name, spec or "")
                glob_pat += glob.escape(value)
                regex += re.escape(value)
            elif field == "step":
                glob_pat += "*"
                regex += r"(\d+)"
        return glob_pat, re.compile(regex + "$")

    def files(self, name: str) -> List[Tuple[int, str]]:
        """(step, path) of the files this template names for ``name``, oldest first."""
        glob_pat, regex = self._patterns(name)
        found = []
        for p in glob.glob(glob_pat):
            m = regex.match(p)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def prune(self, name: str, step: int) -> None:
        """Keeps the ``keep_last`` newest files at or below ``step`` (the one just written).
        Files of higher steps are another run's (a run restarted from step 1 in the same
        directory): never removed in favour of this run's older steps, and said once."""
        if self.keep_last is None:
            return
        files = self.files(name)
        mine = [(s, p) for s, p in files if s <= step]
        ahead = len(files) - len(mine)
        if ahead and name not in self._warned:
            import warnings
            self._warned.add(name)
            warnings.warn(f"save_every: {ahead} file(s) matching {self.template!r} for {name!r} "
                          f"have steps above this run's {step} (another run's, in the same "
                          f"directory?): keep_last={self.keep_last} leaves them alone and rotates "
                          "this run's own", RuntimeWarning, stacklevel=2)
        for _, p in mine[:max(0, len(mine) - self.keep_last)]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


# ---- reading -----------------------------------------------------------------------------------

def _parse_meta(meta: Mapping[str, str], path: str) -> Dict[str, object]:
    """Snapshot metadata with ``average`` parsed from JSON and the counters as ints; a missing
    or malformed field is a ValueError naming the file and the field."""
    parsed: Dict[str, object] = dict(meta)
    if "average" not in meta:
        raise ValueError(f"{path}: snapshot metadata has no 'average' field (not written by "
                         "offload_ema, or damaged)")
    try:
        parsed["average"] = json.loads(meta["average"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: snapshot metadata field 'average' is not valid JSON: "
                         f"{exc}") from None
    if not isinstance(parsed["average"], dict):
        raise ValueError(f"{path}: snapshot metadata field 'average' must be a JSON object, got "
                         f"{meta['average']!r}")
    for k in ("step", "applied", "world"):
        if k in meta:
            try:
                parsed[k] = int(meta[k])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: snapshot metadata field {k!r} must be an integer, "
                                 f"got {meta[k]!r}") from None
    parsed.setdefault("world", 1)
    return parsed


def load_snapshot(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Reads a snapshot written by ``Averager.save``.

    Returns:
        ``(state_dict, metadata)``: CPU tensors by state_dict name, and the metadata with
        ``average`` parsed from JSON and ``step`` / ``applied`` as ints.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated or not safetensors, or not an offload_ema snapshot.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path) and os.path.isfile(shard_paths(path, 0, 1)[1]):
        path = shard_paths(path, 0, 1)[1]  # a sharded snapshot saved under this name
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata")):
        return _load_dcp(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no snapshot file", path)
    if path.endswith(".index.json"):
        return _load_sharded(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is a safetensors file but not an offload_ema snapshot (its metadata "
                    f"has no format={FORMAT!r}); load it with safetensors.torch.load_file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                         f"{exc}") from exc
    return tensors, _parse_meta(meta, path)


def _load_sharded(index_path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map, meta = index["weight_map"], index["metadata"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_path} is not a sharded-snapshot index: {exc}") from exc
    directory = os.path.dirname(os.path.abspath(index_path))
    tensors: Dict[str, torch.Tensor] = {}
    pieces: Dict[str, list] = {}  # split tensors: (first row, global shape, block)
    files = sorted({f for v in weight_map.values() for f in ([v] if isinstance(v, str) else v)})
    for shard in files:
        part, part_meta = load_snapshot(os.path.join(directory, shard))
        if (part_meta["name"], part_meta["step"]) != (meta["name"], int(meta["step"])):
            raise ValueError(
                f"shard {shard} holds {part_meta['name']!r} at step {part_meta['step']}, the "
                f"index {index_path} says {meta['name']!r} at step {meta['step']} (a save still "
                "being written, or files of different saves)")
        offsets = json.loads(part_meta.get("shards", "{}"))
        wanted = [k for k, v in weight_map.items() if v == shard or (not isinstance(v, str)
                                                                      and shard in v)]
        missing = [k for k in wanted if k not in part]
        if missing:
            raise ValueError(f"shard {shard} lacks {missing[:5]} listed in {index_path}")
        for k in wanted:
            if isinstance(weight_map[k], str):
                tensors[k] = part[k]
            else:
                # [first row, shape] (FSDP2 row blocks), or [first element, [numel], shape] (a
                # ZeRO-3 partition: a row block of the flattened tensor)
                row, shape, *view = offsets[k]
                pieces.setdefault(k, []).append((row, shape, part[k], view))
    for k, blocks in pieces.items():
        blocks.sort(key=lambda b: b[0])
        shape = blocks[0][1]
        rows = 0
        for row, _, block, _ in blocks:
            if row != rows:
                raise ValueError(f"{index_path}: the row blocks of {k!r} do not tile it "
                                 f"(expected row {rows}, found {row})")
            rows += block.shape[0] if block.dim() else 0
        if rows != shape[0]:
            raise ValueError(f"{index_path}: the row blocks of {k!r} cover {rows} of "
                             f"{shape[0]} rows")
        view = blocks[0][3]
        tensors[k] = torch.cat([b for _, _, b, _ in blocks]).reshape(view[0] if view else shape)
    return {k: tensors[k] for k in weight_map}, _parse_meta(meta, index_path)


def apply_snapshot(model: nn.Module, path: str, *, strict: bool = True) -> Dict[str, object]:
    """Copies a snapshot into ``model`` in place (compiled or wrapped models too).

    Floating-point tensors are cast to the model's dtype; integer entries must match exactly.
    With ``strict`` (default) every state_dict entry must be in the file and every file entry in
    the model. Returns the snapshot's metadata. Nothing is written unless every check passes.
    """
    tensors, meta = load_snapshot(path)
    state = {normalise_name(k): v for k, v in unwrap_model(model).state_dict(keep_vars=True).items()}
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    if strict and (missing or unexpected):
        raise ValueError(f"snapshot {path} does not fit the model: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    pairs = []
    for k, t in state.items():
        if k not in tensors:
            continue
        src = tensors[k]
        if src.shape != t.shape:
            raise ValueError(f"snapshot {path}: {k!r} has shape {list(src.shape)}, the model "
                             f"has {list(t.shape)}")
        if src.is_floating_point() != t.is_floating_point() or (
                not t.is_floating_point() and src.dtype != t.dtype):
            raise ValueError(f"snapshot {path}: {k!r} has dtype {src.dtype}, the model has "
                             f"{t.dtype}")
        pairs.append((t, src))
    with torch.no_grad():
        for t, src in pairs:
            t.copy_(src)
    return meta
