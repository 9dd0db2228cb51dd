"""The shared I/O helpers: atomic writes never leave half a file, digests are the file's."""

import hashlib

import pytest

from brainenc.ioutil import atomic_path, atomic_write, ddp_world, file_digest


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    atomic_write(path, "a,b\n1,2\n")
    atomic_write(path, b"a,b\n3,4\n")
    assert path.read_text() == "a,b\n3,4\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]


def test_atomic_path_error_keeps_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("crash in the middle of a write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_path_error_on_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.h5") as tmp:
            tmp.write_bytes(b"\0" * 10)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_file_digest_is_the_hash_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "w.bin").write_bytes(data)
    assert file_digest(tmp_path / "w.bin", chunk=1000) == hashlib.sha256(data).hexdigest()
    assert file_digest(tmp_path / "w.bin", "md5") == hashlib.md5(data).hexdigest()


def test_ddp_world_without_a_process_group():
    assert ddp_world() == (1, 0)
