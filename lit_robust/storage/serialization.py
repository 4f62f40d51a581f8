"""Load ``torch.save`` files without running code from them.

Every file lit-robust reads (checkpoints, caches, surrogates, shipped or user-supplied weights) goes through
:func:`load_plain`: ``torch.load(weights_only=True)``, which unpickles tensors and plain containers (dict, list,
tuple, str, numbers) only, so a crafted file cannot execute anything. Its failures become two errors that name the
file: :class:`NotPlainFileError` (the file asks to unpickle some other object) and :class:`CorruptFileError`.
Weights read from files are checked to be finite (:func:`check_finite`): a bit flip that turns a weight into NaN/inf
would otherwise evaluate at chance with exit 0; checkpoints given to ``train.py``/``evaluate.py`` must also be ones
that ``train.py`` wrote (:func:`check_checkpoint`).
"""
from __future__ import annotations

import hashlib
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


class NonFiniteWeightsError(ValueError):
    """A file's weights hold NaN or inf (a diverged run saved, or bits flipped on disk)."""


def check_finite(tensors: dict, name: str, what: str = "checkpoint") -> None:
    """Raise :class:`NonFiniteWeightsError` naming the file and the first floating tensor of ``tensors`` (a state
    dict) that holds NaN or inf."""
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(
                f"{what} {name} has non-finite weights: {key} holds {bad} NaN/inf of {tensor.numel()} values (the "
                f"run diverged before it was saved, or the file was damaged); refused. Use an earlier checkpoint or "
                f"retrain")


def check_sha256(path: str | Path, expected: str, fix: str) -> None:
    """Raise :class:`CorruptFileError` naming ``path`` and ``fix`` unless the file's SHA-256 is ``expected``."""
    found = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if found != expected:
        raise CorruptFileError(f"{path} is damaged: its SHA-256 is {found}, the package records {expected}; {fix}")


def check_checkpoint(checkpoint: dict, name: str) -> None:
    """Refuse a checkpoint that ``train.py`` did not write (no ``state_dict`` or no ``lit_robust`` record of the
    model class and image shape, so nothing can be checked against the config and data) or whose weights are not
    finite."""
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"checkpoint {name} has no state_dict: it is not a Lightning checkpoint; pass a .ckpt "
                         "written by train.py (<run>/checkpoints/)")
    if "lit_robust" not in checkpoint:
        raise ValueError(f"checkpoint {name} has no lit_robust record (model class, training image shape): it was "
                         "not written by train.py, so its model and data cannot be checked against this config; "
                         "train it with train.py, or load its weights in your own Lightning code "
                         "(Model.load_from_checkpoint)")
    check_finite(checkpoint["state_dict"], name)


def check_plain(payload: bytes, name: str) -> None:
    """Raise :class:`NotPlainFileError` unless ``payload`` (``torch.save`` bytes) loads with :func:`load_plain`."""
    load_plain(payload, "object to save at", name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
