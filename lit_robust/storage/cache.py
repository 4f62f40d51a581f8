"""Atomic, checksummed caches of tensors (crafted poisons, purified datasets, shards of either).

A cache entry is ``<name>.pt`` plus ``<name>.pt.sha256``; both are written to temporary files and renamed, the
checksum last, so an interrupted write leaves no entry that passes verification. ``load_verified`` returns None for a
missing, truncated or corrupted entry, and for one that is not what the caller declares (type, shape, dtype, value
range) or holds NaN/inf, with a warning naming the file — callers rebuild it. Entries hold tensors and plain
containers only
(``lit_robust.storage.serialization``): ``save_atomic`` refuses anything else, and ``load_verified`` refuses to unpickle
anything else even when the checksum matches (whoever can write the entry can write its checksum).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from lit_robust.storage.run_paths import expand_path
from lit_robust.storage.serialization import CorruptFileError, check_plain, load_plain


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def fingerprint(*parts) -> str:
    """A short stable key from JSON-able parts and tensors/state dicts (e.g. model weights + data manifest + params)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, dict) and part and all(isinstance(v, torch.Tensor) for v in part.values()):
            for key in sorted(part):
                digest.update(key.encode())
                digest.update(part[key].detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def check_writable(folder: str | Path, key: str) -> Path:
    """Create ``folder`` and write (then remove) a file in it, so a cache or download folder that cannot be written
    fails at the start, naming the config ``key``, instead of after the work whose result it would hold."""
    folder = Path(expand_path(str(folder), key))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{key}={folder} is a file, not a folder: set {key} to a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise PermissionError(f"{key}={folder} cannot be written ({type(error).__name__}: {error.strerror or error}): "
                              f"set {key} to a folder you can write") from error
    return folder


def _replace_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path`` and rename it there; a failed write (disk full, an
    interrupt) leaves neither a partial ``path`` nor the temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(path: str | Path, obj) -> str:
    """``torch.save`` ``obj`` (tensors and plain containers, e.g. a state dict) to ``path`` atomically with a sha256
    sidecar; returns the checksum."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    check_plain(payload, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    checksum = sha256_bytes(payload)
    _replace_atomic(path, payload)
    _replace_atomic(path.with_name(path.name + ".sha256"), checksum.encode())
    return checksum


def load_verified(path: str | Path, kind: type | None = None, shape: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None, value_range: tuple[float, float] | None = None):
    """The object saved at ``path`` if its checksum matches and it is what the caller declares, else None (missing,
    partial, corrupted, or not as declared: a warning names the file); raises ``NotPlainFileError`` for an entry that
    is not tensors and plain containers. ``kind``: its type (a tensor when ``shape``, ``dtype`` or ``value_range``
    is given); ``shape``, ``dtype``: the tensor's; ``value_range``: (low, high) bounds of its values. Tensors in any
    entry must be finite (a matching checksum only says the file is as written, not that what was written is sane)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if not path.exists() or not sidecar.exists():
        return None
    payload = path.read_bytes()
    if sha256_bytes(payload) != sidecar.read_text().strip():
        return None
    try:
        entry = load_plain(payload, "cache entry", str(path))
    except CorruptFileError:
        return None
    problem = entry_problem(entry, torch.Tensor if kind is None and (shape or dtype or value_range) else kind,
                            shape, dtype, value_range)
    if problem:
        # warnings.warn, not rank_zero_warn: under DDP each rank loads its own entries (purified chunks)
        warnings.warn(f"cache entry {path} {problem}; rebuilding it", stacklevel=2)
        return None
    return entry


def entry_problem(entry, kind: type | None, shape: tuple[int, ...] | None, dtype: torch.dtype | None,
                  value_range: tuple[float, float] | None) -> str | None:
    """What makes ``entry`` not the declared one (see :func:`load_verified`), or None."""
    if kind is not None and not isinstance(entry, kind):
        return f"holds a {type(entry).__name__}, not a {kind.__name__}"
    if shape is not None and tuple(entry.shape) != tuple(shape):
        return f"holds shape {tuple(entry.shape)}, not {tuple(shape)}"
    if dtype is not None and entry.dtype != dtype:
        return f"holds {entry.dtype}, not {dtype}"
    for name, tensor in _tensors(entry):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"holds NaN/inf{f' in {name}' if name else ''}"
    if value_range is not None and entry.numel():
        low, high = entry.min().item(), entry.max().item()
        if low < value_range[0] or high > value_range[1]:
            return f"holds values in [{low:g}, {high:g}], outside [{value_range[0]:g}, {value_range[1]:g}]"
    return None


def _tensors(entry, name: str = ""):
    """(dotted name, tensor) of every tensor in nested plain containers."""
    if isinstance(entry, torch.Tensor):
        yield name, entry
    elif isinstance(entry, dict):
        for key, value in entry.items():
            yield from _tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(entry, (list, tuple)):
        for index, value in enumerate(entry):
            yield from _tensors(value, f"{name}[{index}]")
