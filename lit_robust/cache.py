"""Atomic, checksummed caches of tensors (crafted poisons, purified datasets, shards of either).

A cache entry is ``<name>.pt`` plus ``<name>.pt.sha256``; both are written to temporary files and renamed, the
checksum last, so an interrupted write leaves no entry that passes verification. ``load_verified`` returns None for a
missing, truncated or corrupted entry — callers rebuild it. Entries hold tensors and plain containers only
(``lit_robust.serialization``): ``save_atomic`` refuses anything else, and ``load_verified`` refuses to unpickle
anything else even when the checksum matches (whoever can write the entry can write its checksum).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from lit_robust.serialization import CorruptFileError, check_plain, load_plain


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
    folder = Path(folder).expanduser()
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def load_verified(path: str | Path):
    """The object saved at ``path`` if its checksum matches, else None (missing, partial or corrupted); raises
    ``NotPlainFileError`` for an entry that is not tensors and plain containers."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if not path.exists() or not sidecar.exists():
        return None
    payload = path.read_bytes()
    if sha256_bytes(payload) != sidecar.read_text().strip():
        return None
    try:
        return load_plain(payload, "cache entry", str(path))
    except CorruptFileError:
        return None
