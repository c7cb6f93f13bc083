import os

import numpy as np
import pytest

from tinypalm import data
from tinypalm.errors import TinyPalmError


class ByteTok:
    """Stand-in tokenizer: one token per byte, so chunking can never change the tokens."""

    vocab_size = 256

    def encode(self, text):
        b = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(b, dtype=np.uint8).astype(np.int32)

    def to_dict(self):
        return {"kind": "byte-standin", "vocab_size": self.vocab_size}


class PairTok(ByteTok):
    """Stand-in with merges: greedy left-to-right "th" and "e " pairs, so a cut between a pair changes the tokens."""

    vocab_size = 258
    pairs = {b"th": 256, b"e ": 257}

    def encode(self, text):
        b = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        out, i = [], 0
        while i < len(b):
            if b[i : i + 2] in self.pairs:
                out.append(self.pairs[b[i : i + 2]])
                i += 2
            else:
                out.append(b[i])
                i += 1
        return np.array(out, dtype=np.int32)

    def decode(self, ids):
        inv = {v: k for k, v in self.pairs.items()}
        return b"".join(inv[t] if t in inv else bytes([t]) for t in map(int, ids))

    def to_dict(self):
        return {"kind": "pair-standin", "pairs": {k.decode(): v for k, v in self.pairs.items()}}


def make_tree(root):
    """A small corpus directory with a nested folder, hidden files and folders, and a binary file."""
    (root / "b.txt").write_text("the second file\nwith two lines\n")
    (root / "a.txt").write_text("the first file, héllo\n")
    (root / "sub").mkdir()
    (root / "sub" / "c.md").write_text("the third file is in a folder\n")
    (root / "sub" / ".hidden.txt").write_text("hidden file")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("hidden folder")
    (root / "image.bin").write_bytes(b"\x89PNG\0\0\0binary")
    return [root / "a.txt", root / "b.txt", root / "sub" / "c.md"]  # the text files, in corpus order


def test_default_corpus_is_deterministic_utf8_text():
    b1, desc = data.default_corpus()
    b2, _ = data.default_corpus()
    assert isinstance(b1, bytes) and len(b1) > 100_000
    assert b1 == b2
    assert len(b1.decode("utf-8")) > 100_000
    assert "pydoc_data" in desc


def test_read_corpus_file_keeps_raw_bytes(tmp_path):
    p = tmp_path / "x.txt"
    raw = "héllo wörld\n".encode() + b"\xff\xfe not utf-8\n"
    p.write_bytes(raw)
    assert data.read_corpus(p) == raw
    assert data.read_corpus(str(p)) == raw


def test_read_corpus_directory_order_skips_hidden_and_binary(tmp_path):
    files = make_tree(tmp_path)
    got = data.read_corpus(tmp_path)
    assert got == b"\n".join(f.read_bytes() for f in files)
    assert b"hidden" not in got and b"PNG" not in got


def test_read_corpus_errors_name_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt"
    with pytest.raises(TinyPalmError, match="no such file") as e:
        data.read_corpus(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / ".hidden").write_text("text")
    (empty_dir / "blob").write_bytes(b"\0\1\2")
    with pytest.raises(TinyPalmError, match="no text files") as e:
        data.read_corpus(empty_dir)
    assert str(empty_dir) in str(e.value)

    for content in (b"", b"  \n\t\n"):
        p = tmp_path / "blank.txt"
        p.write_bytes(content)
        with pytest.raises(TinyPalmError, match="empty") as e:
            data.read_corpus(p)
        assert str(p) in str(e.value)

    p = tmp_path / "locked.txt"
    p.write_text("secret")

    def deny(path, *args, **kwargs):  # tests may run as root, where chmod 000 does not stop reads
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", deny, raising=False)
    with pytest.raises(TinyPalmError, match="Permission denied") as e:
        data.read_corpus(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("vocab_size, dtype", [(256, np.uint16), (65536, np.uint16), (70_000, np.uint32)])
def test_token_file_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, vocab_size, size=n) for n in (1000, 0, 37, 5000)]
    tok_dict = {"kind": "test", "vocab_size": vocab_size, "merges": [[1, 2], [3, 4]], "name": "ünïcode"}
    path = tmp_path / "tokens.bin"
    n = data.write_token_file(str(path), iter(chunks), tok_dict)
    assert n == sum(len(c) for c in chunks)
    assert data.is_token_file(path)
    assert not os.path.exists(str(path) + ".tmp")

    tokens, got_dict = data.open_token_file(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype and not tokens.flags.writeable
    np.testing.assert_array_equal(tokens, np.concatenate(chunks))
    assert got_dict == tok_dict
    assert os.path.getsize(path) == data._ALIGN + n * np.dtype(dtype).itemsize  # header, then the tokens


def test_token_file_large_tokenizer_dict(tmp_path):
    tok_dict = {"merges": [[i, i + 1] for i in range(2000)], "vocab_size": 2256}  # more than one header page
    path = tmp_path / "t.bin"
    data.write_token_file(path, [np.arange(100)], tok_dict)
    tokens, got = data.open_token_file(path)
    assert got == tok_dict
    np.testing.assert_array_equal(tokens, np.arange(100))


def test_token_file_write_leaves_other_writers_temporaries(tmp_path):
    path = tmp_path / "t.bin"
    other = tmp_path / "t.bin.tmp"                  # another process's half-written file, by an older name
    other.write_bytes(b"in progress")
    data.write_token_file(path, [np.arange(10)], {"vocab_size": 10})
    assert other.read_bytes() == b"in progress"
    np.testing.assert_array_equal(data.open_token_file(path)[0], np.arange(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.bin.tmp"]      # its own temporary is gone


def test_token_file_errors(tmp_path):
    path = tmp_path / "t.bin"
    data.write_token_file(path, [np.arange(1000)], {"vocab_size": 1000})
    raw = path.read_bytes()

    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw[:-1])
    with pytest.raises(TinyPalmError, match="truncated") as e:
        data.open_token_file(cut)
    assert str(cut) in str(e.value)
    cut.write_bytes(raw[:20])
    with pytest.raises(TinyPalmError):
        data.open_token_file(cut)

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOTMAGIC" + raw[8:])
    assert not data.is_token_file(bad)
    with pytest.raises(TinyPalmError, match="magic") as e:
        data.open_token_file(bad)
    assert str(bad) in str(e.value)

    text = tmp_path / "plain.txt"
    text.write_text("just text")
    assert not data.is_token_file(text)
    assert not data.is_token_file(tmp_path / "missing")
    assert not data.is_token_file(tmp_path)


def test_write_token_file_failure_leaves_nothing(tmp_path):
    def chunks():
        yield np.arange(10)
        raise RuntimeError("tokenizer broke")

    path = tmp_path / "t.bin"
    with pytest.raises(RuntimeError):
        data.write_token_file(path, chunks(), {"vocab_size": 10})
    assert list(tmp_path.iterdir()) == []


def test_write_token_file_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    import errno

    def chunks():
        yield np.arange(10)
        raise OSError(errno.ENOSPC, "No space left on device")     # what a write to a full disk raises

    path = tmp_path / "t.bin"
    data.write_token_file(path, [np.arange(5)], {"vocab_size": 10})
    before = path.read_bytes()
    with pytest.raises(TinyPalmError, match=f"cannot write token file {path}: No space left on device; the previous "
                                            f"{path} is intact; free some disk space"):
        data.write_token_file(path, chunks(), {"vocab_size": 10})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_prepare_token_file_matches_whole_encoding(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    make_tree(src)
    (src / "long.txt").write_text("the theme of these lines is the the " * 50 + "\n" + "short line\n" * 20)
    tok = PairTok()
    whole = tok.encode(data.read_corpus(src))

    n = data.prepare_token_file(src, tmp_path / "big.bin", tok)  # one chunk: identical
    tokens, d = data.open_token_file(tmp_path / "big.bin")
    assert n == len(whole) and d == tok.to_dict()
    np.testing.assert_array_equal(tokens, whole)

    # tiny chunks: the long line has no newline to cut at, so some cuts split a pair; nearly the same tokens
    data.prepare_token_file(src, tmp_path / "small.bin", tok, chunk_bytes=61)
    small, _ = data.open_token_file(tmp_path / "small.bin")
    assert tok.decode(small) == data.read_corpus(src)
    assert len(small) != len(whole) and abs(len(small) - len(whole)) <= 0.02 * len(whole)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_prepare_token_file_byte_tokenizer_exact(tmp_path, chunk_bytes):
    src = tmp_path / "corpus"
    src.mkdir()
    make_tree(src)
    tok = ByteTok()
    out = tmp_path / "t.bin"
    n = data.prepare_token_file(src, out, tok, chunk_bytes=chunk_bytes)
    tokens, _ = data.open_token_file(out)
    assert n == len(tokens)
    np.testing.assert_array_equal(tokens, tok.encode(data.read_corpus(src)))


def test_prepare_token_file_errors(tmp_path):
    with pytest.raises(TinyPalmError, match="no such file"):
        data.prepare_token_file(tmp_path / "missing", tmp_path / "t.bin", ByteTok())
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(TinyPalmError, match="empty") as e:
        data.prepare_token_file(blank, tmp_path / "t.bin", ByteTok())
    assert str(blank) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]  # no half-written token file


def test_split_is_last_ten_percent():
    tokens = np.arange(1000)
    train, val = data.split_train_val(tokens)
    np.testing.assert_array_equal(train, np.arange(900))
    np.testing.assert_array_equal(val, np.arange(900, 1000))
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    train, val = data.split_train_val(tokens, 0.25)
    assert len(train) == 750 and val[0] == 750


def test_split_by_bytes_is_the_same_text_for_every_tokenizer(monkeypatch):
    rng = np.random.default_rng(0)
    byte_lengths = np.array([1] * 256 + [0] + list(rng.integers(2, 9, 300)))       # bytes, end-of-text, merges
    tokens = rng.integers(0, len(byte_lengths), 5000)
    total = int(byte_lengths[tokens].sum())
    for chunk in (1 << 22, 7, 1):                            # one pass, and a file counted a few tokens at a time
        monkeypatch.setattr(data, "_COUNT_CHUNK", chunk)
        train, val = data.split_train_val(tokens, byte_lengths=byte_lengths)
        # the most tokens at the end that hold at most 10% of the bytes
        assert byte_lengths[val].sum() <= total // 10 < byte_lengths[tokens[-len(val) - 1:]].sum()
        assert len(train) + len(val) == len(tokens) and np.shares_memory(val, tokens)
    with pytest.raises(TinyPalmError, match=r"ids from \d+ to 9999, outside \[0, 557\)"):      # another tokenizer's
        data.split_train_val(np.append(tokens, 9999), byte_lengths=byte_lengths)
    # one token per byte: the fraction of the bytes is the fraction of the tokens, as without byte_lengths
    ones = np.ones(256, dtype=np.int64)
    byte_tokens = rng.integers(0, 256, 1003)
    assert all(np.array_equal(a, b) for a, b in zip(data.split_train_val(byte_tokens, byte_lengths=ones),
                                                    data.split_train_val(byte_tokens)))


def test_split_memmap_stays_memmap(tmp_path):
    path = tmp_path / "t.bin"
    data.write_token_file(path, [np.arange(500)], {"vocab_size": 500})
    tokens, _ = data.open_token_file(path)
    train, val = data.split_train_val(tokens)
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)
    assert len(train) + len(val) == 500 and val[-1] == 499


def test_check_length():
    data.check_length(100, 10, 9)  # exactly seq_len + 1 in each split is enough
    with pytest.raises(TinyPalmError, match="no tokens"):
        data.check_length(0, 0, 8)
    for n_train, n_val in [(100, 9), (9, 100)]:
        with pytest.raises(TinyPalmError) as e:
            data.check_length(n_train, n_val, 9)
        msg = str(e.value)
        assert f"{n_train} training" in msg and f"{n_val} validation" in msg and "--seq-len" in msg


def test_get_batch_shapes_shift_and_determinism():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 8, 32, seed=1, step=5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y[:, 0] - x[:, 0], 1)  # consecutive tokens, so y is x shifted by one

    x2, y2 = data.get_batch(tokens, 8, 32, seed=1, step=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, data.get_batch(tokens, 8, 32, seed=1, step=6)[0])
    assert not np.array_equal(x, data.get_batch(tokens, 8, 32, seed=2, step=5)[0])


def test_get_batch_reaches_both_ends():
    tokens = np.arange(12)
    starts = set()
    for step in range(200):
        x, y = data.get_batch(tokens, 4, 10, seed=0, step=step)
        starts.update(x[:, 0].tolist())
        assert y.max() <= 11
    assert starts == {0, 1}  # the only two windows with a target: [0..10] and [1..11]


def test_get_batch_on_memmap(tmp_path):
    arr = np.random.default_rng(0).integers(0, 70_000, size=5000)
    path = tmp_path / "t.bin"
    data.write_token_file(path, [arr], {"vocab_size": 70_000})
    tokens, _ = data.open_token_file(path)
    x, y = data.get_batch(tokens, 4, 16, seed=3, step=7)
    xa, ya = data.get_batch(arr, 4, 16, seed=3, step=7)
    assert type(x) is np.ndarray and x.dtype == np.int32
    np.testing.assert_array_equal(x, xa)
    np.testing.assert_array_equal(y, ya)


def test_eval_batches_fixed_and_spread():
    tokens = np.arange(1000)
    a = list(data.eval_batches(tokens, 4, 16, 3))
    b = list(data.eval_batches(tokens, 4, 16, 3))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == np.int32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])
    starts = np.concatenate([x[:, 0] for x, _ in a])
    assert starts[0] == 0 and a[-1][1][-1, -1] == 999  # from the first token to the last
    assert np.all(np.diff(starts) > 0)
