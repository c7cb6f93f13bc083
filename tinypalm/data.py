"""Training text: the default corpus, reading text from disk, token files, and batches.

A corpus is a stream of raw bytes (the tokenizers accept bytes that are not UTF-8). A corpus larger than
memory is tokenised once, chunk by chunk, into a token file, which training then reads through a memory
map. Batches are drawn statelessly from (seed, step), so a resumed run sees exactly the batches it would
have seen had it never stopped.
"""

import json
import os
import struct
import sys

import numpy as np

from .errors import TinyPalmError
from .files import write_atomically

# Token file layout: a 32-byte prefix, the tokenizer as JSON, zero padding up to a multiple of 4096
# bytes (so the tokens start page-aligned), then the tokens as little-endian uint16 or uint32.
# prefix: magic (8s), format version (u32), bytes per token (u32), token count (u64), JSON length (u64).
MAGIC = b"TPALMTOK"
VERSION = 1
_PREFIX = struct.Struct("<8sIIQQ")
_ALIGN = 4096
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_SNIFF = 8192  # a file with a NUL byte in its first 8 KB is binary: skipped in a directory, read as bytes when named

_USAGE = "pass a UTF-8 text file, a directory of text files, or a token file made with --prepare"


def default_corpus():
    """The text that ships with every Python install, so that nothing has to be downloaded."""
    from pydoc_data.topics import topics  # ~79 help topics, ~465k characters

    text = "\n\n".join(topics[k] for k in sorted(topics))
    v = sys.version_info
    desc = f"Python {v.major}.{v.minor}'s bundled documentation (pydoc_data.topics, {round(len(text) / 1000)}k characters)"
    return text.encode("utf-8"), desc


# ---------------------------------------------------------------------------------------------- text


def _open(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise TinyPalmError(f"--data {path}: cannot read it ({e.strerror or e}); check that it is a readable file") from None


def _is_binary(path):
    with _open(path) as f:
        return b"\0" in f.read(_SNIFF)


def _text_files(path, notify=True):
    """The files a corpus path stands for: the file itself, or the text files below a directory.

    notify: say on stderr how many files a directory gave and which were skipped, and warn about a binary file
    given by name (it is used as it is: its bytes are valid input to every tokenizer)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TinyPalmError(f"--data {path}: no such file or directory; {_USAGE}")
    if not os.path.isdir(path):
        if notify and not is_token_file(path) and _is_binary(path):
            print(f"note: --data {path} looks binary (it holds NUL bytes), not text; reading its raw bytes as they are",
                  file=sys.stderr)
        return [path]

    def fail(e):
        raise TinyPalmError(f"--data {e.filename}: cannot list it ({e.strerror or e}); check its permissions") from None

    rel, hidden, broken = [], 0, []
    for root, dirs, files in os.walk(path, onerror=fail):
        hidden += sum(d.startswith(".") for d in dirs)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden directories (.git, ...)
        for name in files:
            full = os.path.join(root, name)
            if name.startswith("."):
                hidden += 1
            elif os.path.isfile(full):
                rel.append(os.path.relpath(full, path).replace(os.sep, "/"))
            elif os.path.islink(full) and not os.path.exists(full):     # a link to nothing
                broken.append(os.path.relpath(full, path))
    files = [os.path.join(path, r) for r in sorted(rel)]
    binary = [f for f in files if _is_binary(f)]
    files = [f for f in files if f not in set(binary)]
    if not files:
        raise TinyPalmError(f"--data {path}: the directory holds no text files (hidden and binary files are skipped); {_USAGE}")
    if notify:
        skipped = [f"{len(binary)} binary" + (f" ({', '.join(os.path.relpath(b, path) for b in binary[:3])}"
                                               f"{', ...' if len(binary) > 3 else ''})" if binary else "")]
        skipped += [f"{hidden} hidden"] if hidden else []
        skipped += [f"{len(broken)} broken link{'s' * (len(broken) != 1)} ({', '.join(broken[:3])}"
                    f"{', ...' if len(broken) > 3 else ''})"] if broken else []
        print(f"note: --data {path}: reading {len(files)} text file{'s' * (len(files) != 1)}, skipping "
              f"{', '.join(skipped[:-1]) + ' and ' if len(skipped) > 1 else ''}{skipped[-1]}", file=sys.stderr)
    return files


def _empty(path):
    return TinyPalmError(f"--data {path}: the corpus is empty or only whitespace; {_USAGE}")


def read_corpus(path):
    """A text file, or every text file below a directory joined with newlines, as raw bytes."""
    parts = []
    for name in _text_files(path):
        with _open(name) as f:
            try:
                parts.append(f.read())
            except OSError as e:
                raise TinyPalmError(f"--data {name}: cannot read it ({e.strerror or e}); check that it is a readable file") from None
    data = b"\n".join(parts)
    if not data.strip():
        raise _empty(path)
    return data


def read_corpus_head(path, n_bytes):
    """The first n_bytes (cut after a newline) of what read_corpus(path) would return, without reading the rest."""
    head = next(_byte_chunks(_text_files(path, notify=False), n_bytes), b"")
    if not head.strip():
        raise _empty(path)
    return head


# ----------------------------------------------------------------------------------------- token files


def write_token_file(path, ids_chunks, tokenizer_dict, vocab_size=None):
    """Write token id arrays, one chunk at a time, after a header holding the tokenizer. Returns the count.

    vocab_size picks the dtype (uint16 when every id fits, else uint32); without it, tokenizer_dict's
    "vocab_size" is used, and failing that uint32.
    """
    path = os.fspath(path)
    vocab_size = vocab_size if vocab_size is not None else tokenizer_dict.get("vocab_size")
    itemsize = 2 if vocab_size is not None and vocab_size <= 1 << 16 else 4
    dtype = _DTYPES[itemsize]
    meta = json.dumps(tokenizer_dict, separators=(",", ":")).encode("utf-8")
    offset = -(-(_PREFIX.size + len(meta)) // _ALIGN) * _ALIGN
    count = 0

    def write(f):
        nonlocal count
        f.write(_PREFIX.pack(MAGIC, VERSION, itemsize, 0, len(meta)) + meta)
        f.write(b"\0" * (offset - f.tell()))
        for ids in ids_chunks:
            ids = np.asarray(ids)
            if ids.size and (ids.min() < 0 or ids.max() >= 1 << (8 * itemsize)):
                raise ValueError(f"token ids outside [0, {1 << (8 * itemsize)}) for a {dtype.name} token file")
            f.write(ids.astype(dtype).tobytes())
            count += ids.size
        f.seek(0)  # the count is known only now
        f.write(_PREFIX.pack(MAGIC, VERSION, itemsize, count, len(meta)))

    write_atomically(path, write, "token file")
    return count


def is_token_file(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def open_token_file(path):
    """(tokens as a read-only memmap, tokenizer dict). Nothing beyond the header is read."""
    path = os.fspath(path)
    redo = "re-create it with --prepare"
    with _open(path) as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[: len(MAGIC)] != MAGIC:
            raise TinyPalmError(f"--data {path}: not a tinypalm token file (bad magic); {_USAGE}")
        _, version, itemsize, count, meta_len = _PREFIX.unpack(prefix)
        if version != VERSION or itemsize not in _DTYPES:
            raise TinyPalmError(f"--data {path}: token file format version {version} ({itemsize}-byte tokens) is not supported; {redo}")
        meta = f.read(meta_len)
    offset = -(-(_PREFIX.size + meta_len) // _ALIGN) * _ALIGN
    need = offset + count * itemsize
    size = os.path.getsize(path)
    if len(meta) < meta_len or size < need:
        raise TinyPalmError(f"--data {path}: token file is truncated ({size} bytes, expected {need}); {redo}")
    try:
        tok_dict = json.loads(meta)
    except ValueError:
        raise TinyPalmError(f"--data {path}: token file header is corrupt (its tokenizer is not valid JSON); {redo}") from None
    if count == 0:  # mmap cannot map zero bytes; check_length reports the empty corpus
        return np.zeros(0, _DTYPES[itemsize]), tok_dict
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=offset, shape=(count,)), tok_dict


def _byte_chunks(files, chunk_bytes):
    """The bytes of the files joined with b"\n", in pieces of about chunk_bytes, each cut after a newline.

    Cutting at a line end keeps a chunk from splitting a UTF-8 character or a word, so tokenising chunk
    by chunk gives (nearly) the tokens of tokenising the whole text at once.
    """
    buf = b""
    for i, name in enumerate(files):
        with _open(name) as f:
            if i:
                buf += b"\n"
            while block := f.read(chunk_bytes):
                buf += block
                while len(buf) >= chunk_bytes:
                    cut = buf.rfind(b"\n", 0, chunk_bytes) + 1 or chunk_bytes
                    yield buf[:cut]
                    buf = buf[cut:]
    if buf:
        yield buf


def prepare_token_file(src_path, out_path, tokenizer, chunk_bytes=1 << 24):
    """Tokenise a text file or directory (the same files read_corpus reads) into a token file. Returns the count."""
    files = _text_files(src_path)
    text_seen = False

    def chunks():
        nonlocal text_seen
        for chunk in _byte_chunks(files, chunk_bytes):
            text_seen = text_seen or bool(chunk.strip())
            yield tokenizer.encode(chunk)
        if not text_seen:  # raising inside the writer removes its temporary file
            raise _empty(src_path)

    return write_token_file(out_path, chunks(), tokenizer.to_dict(), vocab_size=tokenizer.vocab_size)


# -------------------------------------------------------------------------------------------- batches


def split_train_val(tokens, val_fraction=0.1, byte_lengths=None):
    """(train, validation): the last val_fraction of the stream is validation. Slices are views, so memmaps stay
    memmaps.

    byte_lengths ((V,) ints, the bytes each token id decodes to): the fraction is of the text's bytes, not of its
    tokens, so that models with different tokenizers are validated on the same text (to within one token). A BPE
    token holds more bytes where the text is like what BPE learned from, so the last 10% of its tokens can be
    several percent more text than the last 10% of the bytes. Without it, or for bytes, the fraction of tokens."""
    if not 0 <= val_fraction < 1:
        raise TinyPalmError(f"validation fraction {val_fraction}: must be at least 0 and below 1; pass e.g. 0.1")
    if byte_lengths is None:
        n_val = int(len(tokens) * val_fraction)
    else:
        n_val = _tail_within(tokens, byte_lengths, int(_n_bytes(tokens, byte_lengths) * val_fraction))
    n_train = len(tokens) - n_val
    return tokens[:n_train], tokens[n_train:]


_COUNT_CHUNK = 1 << 22         # tokens at a time: a memmapped token file is counted without loading it whole


def _n_bytes(tokens, byte_lengths):
    total = 0
    for i in range(0, len(tokens), _COUNT_CHUNK):
        chunk = tokens[i:i + _COUNT_CHUNK]
        if chunk.min() < 0 or chunk.max() >= len(byte_lengths):      # a token file of another tokenizer
            raise TinyPalmError(f"tokens: ids from {chunk.min()} to {chunk.max()}, outside [0, {len(byte_lengths)}) of "
                                "the tokenizer's vocabulary; make the token file again with --prepare")
        total += int(byte_lengths[chunk].sum())
    return total


def _tail_within(tokens, byte_lengths, n_bytes):
    """The most tokens at the end of the stream that decode to at most n_bytes bytes."""
    n = 0
    for stop in range(len(tokens), 0, -_COUNT_CHUNK):
        start = max(0, stop - _COUNT_CHUNK)
        from_end = np.cumsum(byte_lengths[tokens[start:stop]][::-1])     # bytes of this chunk's last 1, 2, ...
        if from_end[-1] > n_bytes:
            return n + int(np.searchsorted(from_end, n_bytes, side="right"))
        n, n_bytes = n + (stop - start), n_bytes - int(from_end[-1])
    return n


def check_length(n_train, n_val, seq_len):
    if n_train + n_val == 0:
        raise TinyPalmError(f"the corpus holds no tokens; {_USAGE} with some text in it")
    need = seq_len + 1  # one full input sequence plus the target one position further on
    if n_train < need or n_val < need:
        raise TinyPalmError(
            f"the corpus is too short for --seq-len {seq_len}: {n_train} training and {n_val} validation tokens, "
            f"and each split needs at least {need}; use a longer corpus or a smaller --seq-len"
        )


def _gather(tokens, starts, seq_len):
    # one fancy index reads just the windows, also from a memmap: (B, T+1) -> x, y each (B, T)
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)]).astype(np.int32)
    return w[:, :-1], w[:, 1:]


def get_batch(tokens, batch_size, seq_len, seed, step):
    """Random windows, drawn from (seed, step) alone so that a resumed run gets the very same batches."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # s in [0, len - seq_len - 1]
    return _gather(tokens, starts, seq_len)


def eval_batches(tokens, batch_size, seq_len, n_batches):
    """A fixed set of windows spread evenly over the split, so evaluations are comparable across runs."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size * n_batches).round().astype(np.int64)
    for b in range(n_batches):
        yield _gather(tokens, starts[b * batch_size : (b + 1) * batch_size], seq_len)


class StreamBatches:
    """A token stream's training and validation batches as (x, y, loss_mask), the shape instruction data
    (instruct.PairsData) gives them too; loss_mask is None because every position counts."""

    def __init__(self, train_tokens, val_tokens):
        self.train_tokens, self.val_tokens = train_tokens, val_tokens

    def train_batch(self, batch_size, seq_len, seed, step):
        return (*get_batch(self.train_tokens, batch_size, seq_len, seed, step), None)

    def val_batches(self, batch_size, seq_len, n_batches):
        return ((x, y, None) for x, y in eval_batches(self.val_tokens, batch_size, seq_len, n_batches))
