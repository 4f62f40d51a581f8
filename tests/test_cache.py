"""The checksummed tensor cache: the digest, the cache key, the atomic write and the verified read, on real files under
tmp_path, checked against hashlib and numpy computed here."""
import datetime
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_robust.storage import cache
from lit_robust.storage.cache import check_writable, fingerprint, load_verified, save_atomic, sha256_bytes
from lit_robust.storage.serialization import NotPlainFileError


def test_sha256_of_the_nist_vector():
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_fingerprint_of_a_tensor_is_the_digest_of_its_bytes():
    expected = hashlib.sha256(np.arange(6, dtype=np.int32).tobytes()).hexdigest()[:16]
    assert fingerprint(torch.arange(6, dtype=torch.int32)) == expected
    strided = torch.arange(12, dtype=torch.int32).reshape(6, 2).t()[0]  # non-contiguous view of 0, 2, 4, …
    assert fingerprint(strided) == fingerprint(torch.arange(0, 12, 2, dtype=torch.int32))


def test_fingerprint_separates_what_a_cache_entry_depends_on():
    big = torch.zeros(5000)
    changed = big.clone()
    changed[2500] = 1.0  # in the middle, where a tensor's printed form elides the values
    weights = {"b": torch.ones(2), "a": torch.zeros(3)}
    assert fingerprint(big) != fingerprint(changed)
    assert fingerprint({"w": big}) != fingerprint({"w": changed})
    assert fingerprint(weights) == fingerprint({"a": torch.zeros(3), "b": torch.ones(2)})  # key order
    assert fingerprint(weights) != fingerprint({"a": torch.ones(2), "b": torch.zeros(3)})  # names matter
    assert fingerprint({"lr": 0.1, "steps": 3}) == fingerprint({"steps": 3, "lr": 0.1})
    assert fingerprint({"lr": 0.1}) != fingerprint({"lr": 0.2})
    assert fingerprint("a", "b") != fingerprint("b", "a") and fingerprint({}) != fingerprint()
    assert fingerprint(Path("x")) == fingerprint("x")  # non-JSON parts by their str
    assert len(fingerprint("x")) == 16 and int(fingerprint("x"), 16) >= 0


def test_save_atomic_writes_the_payload_and_its_checksum(tmp_path):
    state = {"weight": torch.randn(3, 4), "steps": torch.tensor(7)}
    path = tmp_path / "two" / "levels" / "entry.pt"
    checksum = save_atomic(path, state)
    payload = path.read_bytes()
    assert checksum == hashlib.sha256(payload).hexdigest()
    assert path.with_name("entry.pt.sha256").read_text() == checksum
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.pt", "entry.pt.sha256"]  # no temporary left
    loaded = load_verified(str(path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    save_atomic(path, {"weight": torch.zeros(1)})  # replaced, with its new checksum
    assert torch.equal(load_verified(path)["weight"], torch.zeros(1))


def test_load_verified_returns_none_for_missing_partial_or_corrupted_entries(tmp_path):
    path = tmp_path / "entry.pt"
    sidecar = tmp_path / "entry.pt.sha256"
    assert load_verified(path) is None
    save_atomic(path, torch.arange(10))
    sidecar.write_text(sidecar.read_text() + "\n")  # a hand-edited sidecar with a newline still verifies
    assert torch.equal(load_verified(path), torch.arange(10))
    payload = path.read_bytes()
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # one flipped bit
    assert load_verified(path) is None
    path.write_bytes(payload[: len(payload) // 2])  # truncated, with a checksum that matches the truncated bytes
    sidecar.write_text(sha256_bytes(path.read_bytes()))
    assert load_verified(path) is None
    path.write_bytes(payload)
    sidecar.unlink()
    assert load_verified(path) is None


def test_a_write_interrupted_before_the_checksum_leaves_no_valid_entry(tmp_path, monkeypatch):
    path = tmp_path / "entry.pt"
    save_atomic(path, torch.zeros(2))
    replaced = []

    def replace_then_crash(src, dst):
        if replaced:
            raise KeyboardInterrupt
        replaced.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(cache.os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(path, torch.ones(2))
    assert replaced == [path] and load_verified(path) is None  # new payload, old checksum


def test_entries_that_are_not_plain_tensors_are_refused_by_name(tmp_path):
    path = tmp_path / "entry.pt"
    with pytest.raises(NotPlainFileError, match=r"^object to save at .*entry\.pt is not a plain-tensor file"):
        save_atomic(path, {"when": datetime.date(2026, 1, 1)})
    assert not list(tmp_path.iterdir())
    buffer = io.BytesIO()
    torch.save({"when": datetime.date(2026, 1, 1)}, buffer)  # written by hand, with a matching checksum
    path.write_bytes(buffer.getvalue())
    path.with_name("entry.pt.sha256").write_text(sha256_bytes(buffer.getvalue()))
    with pytest.raises(NotPlainFileError, match=r"^cache entry .*entry\.pt is not a plain-tensor file"):
        load_verified(path)


def test_check_writable_creates_the_folder_writes_in_it_and_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    written_in = []
    real = tempfile.NamedTemporaryFile

    def spy(*args, **kwargs):
        handle = real(*args, **kwargs)
        written_in.append(Path(handle.name).parent)
        return handle

    monkeypatch.setattr(cache.tempfile, "NamedTemporaryFile", spy)
    folder = check_writable("~/a/b", "data.cache_dir")
    assert folder == tmp_path / "a" / "b" and folder.is_dir() and not list(folder.iterdir())
    assert written_in == [folder]  # the check wrote into the folder itself, then removed the file
    assert check_writable(folder, "data.cache_dir") == folder  # an existing folder is fine
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"^data.cache_dir=.*file is a file, not a folder: set data.cache_dir"):
        check_writable(tmp_path / "file", "data.cache_dir")
    with pytest.raises(PermissionError, match=r"^data.cache_dir=.*sub cannot be written \(NotADirectoryError: Not a "
                                              r"directory\): set data.cache_dir to a folder you can write"):
        check_writable(tmp_path / "file" / "sub", "data.cache_dir")
