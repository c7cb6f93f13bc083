"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained on your own text.

Both map text to int32 ids and back, and both are lossless: the 256 byte values are always ids 0..255,
so any string (any script, emoji) and any byte string, even one that is not valid UTF-8, round-trips.

Both reserve one more id, after all the others, for the end-of-text token (`eot_id`): it ends each example of
instruction data, and generation stops when the model emits it. No text ever encodes to it (the string
"<|endoftext|>" is just its bytes), and it decodes to no bytes. Tokenizers saved before it existed (their dict
has no "eot" entry) load without it, with their old vocabulary size, so old checkpoints keep working.

BPE works like GPT-2's: the text is first split into chunks (words with their leading space, numbers,
runs of punctuation, whitespace) and merges never cross a chunk boundary. Bytes that are not valid UTF-8
are carried through the split as surrogate escapes and turned back into the same bytes afterwards; they
just end up as single-byte tokens, or merged with their neighbours if that pattern is common.
"""

import heapq
import re
from array import array
from collections import Counter, defaultdict

import numpy as np

from .errors import TinyPalmError

# GPT-2's split, written for Python's `re`: [^\W\d_] is a letter, \d a digit, and (?:[^\s\w]|_) anything
# else that is not whitespace. Together the alternatives cover every character, so no text is dropped.
SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
LONG_CHUNK = 64       # bytes; a longer chunk (a DNA line, base64) is encoded by BPETokenizer._encode_long_chunk
CACHE_CHUNKS = 1_000_000   # chunks BPETokenizer.encode remembers the ids of (text repeats its words)


def _to_str(text):
    # bytes -> str that maps back to exactly these bytes, invalid UTF-8 included
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="surrogateescape")
    if isinstance(text, str):
        return text
    raise TinyPalmError(f"can only tokenize str or bytes, got {type(text).__name__}; pass text or raw bytes")


def _to_bytes(s):
    try:
        return s.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        raise TinyPalmError("text contains unpaired surrogates that UTF-8 cannot hold; clean the text first") from None


def _chunks(text):
    """text (str or bytes) -> list of byte strings that join back to its UTF-8 bytes."""
    return [_to_bytes(c) for c in SPLIT.findall(_to_str(text))]


def _check_ids(ids, vocab_size):
    ids = np.asarray(ids).reshape(-1).tolist()
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise TinyPalmError(f"token id out of range [0, {vocab_size}); was the model trained with this tokenizer?")
    return ids


def _merge(ids, pair, new):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, with `new`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _eot_from_dict(d, expected):
    """The end-of-text flag of a saved tokenizer: absent in tokenizers saved before it existed."""
    eot = d.get("eot")
    if eot is None:
        return False
    if eot != expected:
        raise TinyPalmError(f"tokenizer dict has end-of-text id {eot!r} where {expected} belongs; the file is corrupt")
    return True


class ByteTokenizer:
    """One token per UTF-8 byte, plus end-of-text (id 256). No training, nothing can be out of vocabulary."""

    kind = "byte"

    def __init__(self, end_of_text=True):
        self.eot_id = 256 if end_of_text else None
        self.vocab_size = 257 if end_of_text else 256

    def encode(self, text):
        return np.frombuffer(_to_bytes(_to_str(text)), dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids):
        return bytes(i for i in _check_ids(ids, self.vocab_size) if i != self.eot_id)

    def decode(self, ids):
        # a model can emit byte sequences that are not UTF-8; show them as U+FFFD rather than fail
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        return self.decode_bytes([i])

    def to_dict(self):
        return {"kind": "byte", "eot": self.eot_id} if self.eot_id is not None else {"kind": "byte"}

    @classmethod
    def from_dict(cls, d):
        return cls(end_of_text=_eot_from_dict(d, 256))


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, merge i makes id 256+i out of two earlier ids, end-of-text comes last."""

    kind = "bpe"

    def __init__(self, merges, end_of_text=True):
        self.merges = [tuple(int(x) for x in m) for m in merges]
        self.ranks = {}  # (a, b) -> merge index; lower means learned earlier, applied first
        self.vocab = [bytes([i]) for i in range(256)]  # id -> its bytes
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise TinyPalmError(f"bad BPE merge {i}: {[a, b]} uses an id not yet defined; the tokenizer file is corrupt")
            if (a, b) in self.ranks:
                raise TinyPalmError(f"bad BPE merge {i}: {[a, b]} repeats merge {self.ranks[a, b]}; the tokenizer file "
                                    "is corrupt")
            self.ranks[(a, b)] = i
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.eot_id = None
        if end_of_text:
            self.eot_id = len(self.vocab)
            self.vocab.append(b"")  # a control token: it stands for no bytes
        self.vocab_size = len(self.vocab)
        self._cache = {}  # chunk bytes -> ids; text repeats the same words over and over

    @classmethod
    def train(cls, text, vocab_size, verbose=False):
        """Learn merges until the vocabulary (bytes, merges and end-of-text) holds vocab_size tokens."""
        if vocab_size < 257:
            raise TinyPalmError(f"BPE vocab_size must be at least 257 (the 256 byte values and end-of-text), got {vocab_size}")
        n_merges = vocab_size - 257
        # Work on unique chunks with their counts (a few MB of text has only tens of thousands of them), laid end to
        # end as one doubly linked list of positions, so that a merge touches only the places where its pair occurs,
        # however long a chunk is (DNA, base64 or minified code can be one chunk a line).
        counts = Counter(_chunks(text))
        n = sum(len(c) for c in counts)
        kind = "i" if n < 2**31 else "q"
        sym = array(kind)                        # sym[i]: the id at position i; -1 once merged into its left
        freq = array("q")                        # freq[i]: how often the chunk holding position i occurs
        for chunk, c in counts.items():
            sym.extend(chunk)
            freq.extend(array("q", [c]) * len(chunk))
        nxt, prv = array(kind, range(1, n + 1)), array(kind, range(-1, n - 1))   # -1: the chunk ends there
        end = 0
        for chunk in counts:
            prv[end] = -1
            end += len(chunk)
            nxt[end - 1] = -1
        pair_count = defaultdict(int)            # (a, b) -> occurrences in the whole text
        where = defaultdict(lambda: array(kind))  # (a, b) -> positions where it starts (some stale: checked on use)
        for i in range(n - 1):
            if nxt[i] != -1:
                p = (sym[i], sym[i + 1])
                pair_count[p] += freq[i]
                where[p].append(i)
        # Max-heap of (-count, pair); ties pop the smaller pair, so training is reproducible.
        # Entries go stale when a count changes; we push the new count and skip entries that disagree.
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges, vocab = [], [bytes([i]) for i in range(256)]
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg:
                continue
            if -neg < 2:
                break  # nothing left that repeats; merging singletons only memorises the text
            a, b = pair
            new = 256 + len(merges)
            merges.append(pair)
            vocab.append(vocab[a] + vocab[b])
            changed = {pair}

            def count(p, f, at=None):       # pair p occurs f more (or fewer) times; at: the position it starts at
                pair_count[p] += f
                changed.add(p)
                if at is not None:
                    where[p].append(at)

            # Left to right, so that overlapping occurrences ("aaa") merge as _merge does: the first one wins.
            for i in sorted(where.pop(pair)):
                j = nxt[i]
                if sym[i] != a or j == -1 or sym[j] != b:
                    continue  # stale: an earlier merge consumed this occurrence
                f, h, k = freq[i], prv[i], nxt[j]
                pair_count[pair] -= f
                if h != -1:                        # [x a] b  ->  [x new]
                    count((sym[h], a), -f)
                    count((sym[h], new), f, at=h)
                if k != -1:                        # a [b y]  ->  [new y]
                    count((b, sym[k]), -f)
                    count((new, sym[k]), f, at=i)
                sym[i], sym[j], nxt[i] = new, -1, k
                if k != -1:
                    prv[k] = i
            for p in changed:
                c = pair_count[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    del pair_count[p]
            if verbose and (len(merges) % 256 == 0 or len(merges) == n_merges):
                print(f"bpe: merge {len(merges)}/{n_merges}: {vocab[-1]!r} x{-neg}")
        if verbose and len(merges) < n_merges:
            print(f"bpe: stopped at {257 + len(merges)} tokens, no pair occurs twice")
        return cls(merges)

    def _encode_chunk(self, chunk):
        ids = list(chunk)
        while len(ids) >= 2:
            # apply the earliest-learned merge present, exactly as training would have
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, 256 + self.ranks[pair])
        return ids

    def _encode_long_chunk(self, chunk):
        """_encode_chunk's result in time n log n rather than n x merges used: the chunk as a linked list of
        positions and a heap of (merge rank, position) for every pair present that has a merge. Popping the
        lowest rank first and, within a rank, the leftmost position first applies merges in _encode_chunk's order;
        a merge can only make pairs of later rank (they hold its new id), pushed as they form. A heap entry is
        the one int rank * n + position, and the list's links are arrays of int32: a long line costs tens of
        bytes a byte, not hundreds."""
        n, ranks = len(chunk), self.ranks
        sym = array("i", list(chunk))         # sym[i]: the id at position i; -1 once merged into its left
        nxt, prv = array("i", range(1, n + 1)), array("i", range(-1, n - 1))
        nxt[-1] = -1
        heap = [ranks[p] * n + i for i, p in enumerate(zip(chunk, chunk[1:])) if p in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = divmod(heapq.heappop(heap), n)
            j = nxt[i]
            if j == -1 or (sym[i], sym[j]) != self.merges[rank]:
                continue                      # stale: a merge at this place changed it since
            new, h, k = 256 + rank, prv[i], nxt[j]
            sym[i], sym[j], nxt[i] = new, -1, k
            if k != -1:
                prv[k] = i
                if (new, sym[k]) in ranks:
                    heapq.heappush(heap, ranks[new, sym[k]] * n + i)
            if h != -1 and (sym[h], new) in ranks:
                heapq.heappush(heap, ranks[sym[h], new] * n + h)
        return [s for s in sym if s != -1]

    def encode(self, text):
        cache, out = self._cache, []
        for c in _chunks(text):
            if len(c) > LONG_CHUNK:
                out += self._encode_long_chunk(c)   # not cached: long chunks seldom repeat, and would fill memory
                continue
            ids = cache.get(c)
            if ids is None:
                if len(cache) >= CACHE_CHUNKS:
                    cache.clear()  # bound memory when encoding a huge, varied corpus
                ids = cache[c] = self._encode_chunk(c)
            out += ids
        return np.array(out, dtype=np.int32)

    def decode_bytes(self, ids):
        return b"".join([self.vocab[i] for i in _check_ids(ids, self.vocab_size)])

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        return self.vocab[_check_ids([i], self.vocab_size)[0]]

    def to_dict(self):
        d = {"kind": "bpe", "merges": [list(m) for m in self.merges]}
        if self.eot_id is not None:
            d["eot"] = self.eot_id
        return d

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d.get("merges"), list):
            raise TinyPalmError("BPE tokenizer dict has no 'merges' list; save it with BPETokenizer.to_dict()")
        return cls(d["merges"], end_of_text=_eot_from_dict(d, 256 + len(d["merges"])))


def tokenizer_from_dict(d):
    kinds = {"byte": ByteTokenizer, "bpe": BPETokenizer}
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in kinds:
        raise TinyPalmError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind].from_dict(d)
