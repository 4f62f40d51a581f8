"""Load ``torch.save`` files without running code from them.

Every file lit-robust reads (checkpoints, caches, surrogates, shipped or user-supplied weights) goes through
:func:`load_plain`: ``torch.load(weights_only=True)``, which unpickles tensors and plain containers (dict, list,
tuple, str, numbers) only, so a crafted file cannot execute anything. Its failures become two errors that name the
file: :class:`NotPlainFileError` (the file asks to unpickle some other object) and :class:`CorruptFileError`.
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch


class NotPlainFileError(ValueError):
    """The file would unpickle objects other than tensors and plain containers (possibly code)."""


class CorruptFileError(ValueError):
    """The file is not a readable ``torch.save`` file (truncated, overwritten, empty)."""


def load_plain(source: str | Path | bytes, what: str = "file", name: str | None = None, mmap: bool = False):
    """``torch.load(source, weights_only=True)`` on the CPU; ``source`` is a path or the file's bytes. ``what`` and
    ``name`` (default: the path) are how errors call it; ``mmap`` leaves tensor data on disk (zip-format files)."""
    in_memory = isinstance(source, bytes)
    name = str(name or ("<bytes>" if in_memory else source))
    try:
        return torch.load(io.BytesIO(source) if in_memory else source, map_location="cpu", weights_only=True,
                          mmap=mmap and not in_memory)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CorruptFileError(f"{what} {name} is corrupt or truncated ({_first_line(error)}); delete it and "
                                   "create it again") from None
        found = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global|\. Please|$)", str(error),
                          re.MULTILINE)
        raise NotPlainFileError(
            f"{what} {name} is not a plain-tensor file: loading it would unpickle "
            f"objects other than tensors and plain containers ({found.group(1) if found else 'see torch.load'}), "
            f"which can run code; "
            f"refused. Save state dicts and plain values only (e.g. torch.save(model.state_dict(), path)), or "
            f"re-save it yourself if you trust its source") from None
    except RuntimeError as error:
        if mmap and "mmap can only be used" in str(error):  # a legacy-format file: read it whole
            return load_plain(source, what, name)
        raise CorruptFileError(f"{what} {name} is corrupt or truncated ({_first_line(error)}); delete it and "
                               "create it again") from None
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CorruptFileError(f"{what} {name} is corrupt or truncated ({_first_line(error)}); delete it and "
                               "create it again") from None


def check_plain(payload: bytes, name: str) -> None:
    """Raise :class:`NotPlainFileError` unless ``payload`` (``torch.save`` bytes) loads with :func:`load_plain`."""
    load_plain(payload, "object to save at", name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
