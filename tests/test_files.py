"""files.py: a write that fails or is interrupted leaves the old file as it was; what a killed write left is
cleared by the next write of the same file; a path that cannot be written is refused before any work."""

import errno
import os
import subprocess
import sys

import pytest

from tinypalm import files
from tinypalm.errors import TinyPalmError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "labels.txt"
    files.write_atomically(str(path), lambda f: f.write(b"old\n"), "labels file")

    def half_then(error):
        def write(f):
            f.write(b"new, but only half")
            raise error
        return write

    with pytest.raises(KeyboardInterrupt):                   # Ctrl-C half-way
        files.write_atomically(str(path), half_then(KeyboardInterrupt()), "labels file")
    with pytest.raises(TinyPalmError, match=f"cannot write labels file {path}: No space left on device; the previous "
                                            f"{path} is intact; free some disk space or pass another --output"):
        files.write_atomically(str(path), half_then(OSError(errno.ENOSPC, "No space left on device")), "labels file",
                               " or pass another --output")
    # an error about another file (one the writer was reading) is that file's, and says so itself
    with pytest.raises(PermissionError) as e:
        files.write_atomically(str(path), half_then(PermissionError(errno.EACCES, "Permission denied", "corpus.txt")),
                               "token file")
    assert e.value.filename == "corpus.txt"
    assert path.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["labels.txt"]
    files.write_atomically(str(tmp_path / "new" / "dir" / "x.bin"), lambda f: f.write(b"x"), "file")   # dirs made
    assert (tmp_path / "new" / "dir" / "x.bin").read_bytes() == b"x"


def test_the_next_write_clears_what_a_killed_one_left(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "big.tok"
    stale = tmp_path / f"big.tok.tmp{gone.pid}"               # what a kill -9 half-way through leaves
    stale.write_bytes(b"\0" * 1000)
    unrelated = tmp_path / f"big.tokens.tmp{gone.pid}"
    unrelated.write_bytes(b"\0")
    files.write_atomically(str(path), lambda f: f.write(b"tokens"), "token file")
    assert path.read_bytes() == b"tokens" and not stale.exists() and unrelated.exists()


def test_a_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "data.csv").write_text("text,label\n")
    with pytest.raises(TinyPalmError, match="--out .*data.csv/clf.npz: .*data.csv is a file, not a directory"):
        files.check_writable(str(tmp_path / "data.csv" / "clf.npz"), "--out")
    with pytest.raises(TinyPalmError, match="--out .* is a directory; give the name of a file"):
        files.check_writable(str(tmp_path), "--out")
    files.check_writable(str(tmp_path / "not" / "yet" / "clf.npz"), "--out")          # made when written


def test_a_file_held_open_on_windows_is_replaced_once_let_go(monkeypatch, tmp_path):
    from tinypalm import files
    real, calls = os.replace, []

    def held_twice(src, dst):                 # a viewer or scanner holds the target for the first two tries
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file", dst)
        return real(src, dst)
    monkeypatch.setattr(os, "replace", held_twice)
    monkeypatch.setattr(files.time, "sleep", lambda s: None)
    target = tmp_path / "best.npz"
    with pytest.raises(TinyPalmError, match="cannot write checkpoint"):      # elsewhere: refused at once
        files.write_atomically(str(target), lambda f: f.write(b"x"), "checkpoint")
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(os, "name", "nt")
    files.write_atomically(str(target), lambda f: f.write(b"new"), "checkpoint")
    assert len(calls) == 3 and target.read_bytes() == b"new"
