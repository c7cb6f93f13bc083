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
from collections import Counter, defaultdict

import numpy as np

from .errors import TinyPalmError

# GPT-2's split, written for Python's `re`: [^\W\d_] is a letter, \d a digit, and (?:[^\s\w]|_) anything
# else that is not whitespace. Together the alternatives cover every character, so no text is dropped.
SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


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
        # Work on unique chunks with their counts: a few MB of text has only tens of thousands of them.
        counts = Counter(_chunks(text))
        words = [list(c) for c in counts]  # words[w] = current ids of chunk w
        freq = list(counts.values())
        pair_count = defaultdict(int)  # (a, b) -> occurrences in the whole text
        where = defaultdict(set)  # (a, b) -> indices of words that contained it (may be stale)
        for w, ids in enumerate(words):
            for p in zip(ids, ids[1:]):
                pair_count[p] += freq[w]
                where[p].add(w)
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
            new = 256 + len(merges)
            merges.append(pair)
            vocab.append(vocab[pair[0]] + vocab[pair[1]])
            changed = set()
            # Only words containing the pair change: take their pairs out, merge, put the new pairs in.
            for w in where.pop(pair):
                ids = words[w]
                merged = _merge(ids, pair, new)
                if len(merged) == len(ids):
                    continue  # stale index entry: an earlier merge already consumed this pair here
                for p in zip(ids, ids[1:]):
                    pair_count[p] -= freq[w]
                    changed.add(p)
                for p in zip(merged, merged[1:]):
                    pair_count[p] += freq[w]
                    where[p].add(w)
                    changed.add(p)
                words[w] = merged
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

    def encode(self, text):
        cache, out = self._cache, []
        if len(cache) > 1_000_000:
            cache.clear()  # bound memory when encoding a huge, varied corpus
        for c in _chunks(text):
            ids = cache.get(c)
            if ids is None:
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
