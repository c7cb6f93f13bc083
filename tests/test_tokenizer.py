import json
import random
from collections import Counter

import numpy as np
import pytest

from tinypalm.errors import TinyPalmError
from tinypalm.tokenizer import LONG_CHUNK, SPLIT, BPETokenizer, ByteTokenizer, tokenizer_from_dict

SAMPLES = [
    "hello world",
    "It's 3 o'clock, isn't it?  Yes -- 42 cats_and_dogs!\n\n\tend ",
    "你好，世界",
    "emoji: 🙂👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "mixed: naïve café Ωμέγα привет مرحبا ½ ² x\u0301",
    "",
    " ",
    "\n",
]
BAD_BYTES = [b"\xff\xfe abc \x80", bytes(range(256)), b"ok \xc3 truncated \xe4\xbd", random.Random(1).randbytes(3000)]


def corpus(n_sentences=4000, seed=0):
    """A few hundred KB of English-like text with some Chinese, numbers and punctuation."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old king", "our teacher", "this machine", "she", "they"]
    verb = ["sees", "likes", "builds", "remembers", "follows", "writes about", "doesn't trust", "carries"]
    obj = ["the river", "a small house", "the new model", "every letter", "twelve apples", "the quiet town"]
    zh = ["我们今天学习语言模型。", "天气很好。", "他在写代码。", "这是一个测试。"]
    lines = []
    for _ in range(n_sentences):
        s = f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)}"
        s += rng.choice([".", "!", "?", f" {rng.randint(0, 999)} times.", ", I'm sure."])
        if rng.random() < 0.15:
            s += " " + rng.choice(zh)
        lines.append(s)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text():
    return corpus()


@pytest.fixture(scope="module")
def bpe(text):
    return BPETokenizer.train(text, 600)


def random_unicode(rng, n):
    # any code point except surrogates, which UTF-8 cannot hold
    cps = [rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)])
           for _ in range(n)]
    return "".join(map(chr, cps))


# ---- byte tokenizer ----

def test_byte_roundtrip_str():
    tok = ByteTokenizer()
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert len(ids) == len(s.encode("utf-8"))
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 256)
        assert tok.decode(ids) == s


def test_byte_roundtrip_bytes():
    tok = ByteTokenizer()
    for b in BAD_BYTES:
        ids = tok.encode(b)
        assert ids.tolist() == list(b)
        assert tok.decode_bytes(ids) == b
    assert tok.decode([0xFF]) == "\ufffd"  # invalid model output is shown, not raised


def test_byte_token_bytes_and_errors():
    tok = ByteTokenizer()
    ids = tok.encode("你好🙂")
    assert b"".join(tok.token_bytes(int(i)) for i in ids) == "你好🙂".encode()
    with pytest.raises(TinyPalmError):
        tok.decode([257])
    with pytest.raises(TinyPalmError):
        tok.decode([-1])
    with pytest.raises(TinyPalmError):
        tok.encode(123)


# ---- pre-tokenisation ----

def test_split_covers_every_character():
    rng = random.Random(0)
    for s in SAMPLES + [random_unicode(rng, 500) for _ in range(20)]:
        assert "".join(SPLIT.findall(s)) == s
    assert SPLIT.findall("It's hello  world 123!!") == ["It", "'s", " hello", " ", " world", " 123", "!!"]


# ---- BPE ----

def test_bpe_vocab_size_and_compression(bpe, text):
    assert bpe.vocab_size == 600 == 256 + len(bpe.merges) + 1  # bytes, merges, end-of-text
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 0 and ids.max() < bpe.vocab_size
    assert len(text.encode("utf-8")) / len(ids) > 1.5


def test_bpe_roundtrip_str(bpe, text):
    rng = random.Random(2)
    for s in SAMPLES + [text[:5000], random_unicode(rng, 2000)]:
        ids = bpe.encode(s)
        assert bpe.decode(ids) == s
        assert bpe.decode_bytes(ids) == s.encode("utf-8")
        assert bpe.encode(s.encode("utf-8")).tolist() == ids.tolist()  # str and its bytes agree


def test_bpe_roundtrip_invalid_utf8(bpe):
    for b in BAD_BYTES + [b"The cat sees \xff the river.\x80\n" * 3]:
        assert bpe.decode_bytes(bpe.encode(b)) == b


def test_bpe_token_bytes(bpe, text):
    ids = bpe.encode(text[:3000])
    assert b"".join(bpe.token_bytes(int(i)) for i in ids) == bpe.decode_bytes(ids)
    for i, (a, b) in enumerate(bpe.merges):
        assert bpe.token_bytes(256 + i) == bpe.token_bytes(a) + bpe.token_bytes(b)


def test_bpe_deterministic(text):
    a = BPETokenizer.train(text, 400)
    b = BPETokenizer.train(text, 400)
    assert a.merges == b.merges


def test_bpe_runs_out_of_pairs():
    tok = BPETokenizer.train("ab ab ab cd", 10_000)
    assert 256 < tok.vocab_size < 10_000  # stopped when no pair occurs twice
    assert tok.decode(tok.encode("ab ab ab cd")) == "ab ab ab cd"
    assert BPETokenizer.train("", 300).vocab_size == 257
    assert BPETokenizer.train("abc", 257).vocab_size == 257


def test_bpe_vocab_too_small():
    with pytest.raises(TinyPalmError):
        BPETokenizer.train("hello", 256)  # no room for end-of-text


def test_bpe_serialisation(bpe, text):
    d = json.loads(json.dumps(bpe.to_dict()))
    assert d["kind"] == "bpe"
    tok = BPETokenizer.from_dict(d)
    assert tok.vocab_size == bpe.vocab_size
    sample = text[:20000] + "你好，世界 🙂"
    assert tok.encode(sample).tolist() == bpe.encode(sample).tolist()
    with pytest.raises(TinyPalmError):
        BPETokenizer.from_dict({"kind": "bpe", "merges": [[300, 1]]})  # refers to an id not yet made


def test_tokenizer_from_dict(bpe):
    assert isinstance(tokenizer_from_dict(json.loads(json.dumps(ByteTokenizer().to_dict()))), ByteTokenizer)
    tok = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert isinstance(tok, BPETokenizer) and tok.merges == bpe.merges
    with pytest.raises(TinyPalmError):
        tokenizer_from_dict({"kind": "sentencepiece"})
    with pytest.raises(TinyPalmError):
        tokenizer_from_dict({})


def naive_bpe(text, n_merges):
    """Textbook BPE: recount every pair over every chunk before each merge."""
    words = [list(c.encode("utf-8")) for c in SPLIT.findall(text)]
    merges = []
    for _ in range(n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, ties to the smaller pair
        if counts[best] < 2:
            break
        new = 256 + len(merges)
        merges.append(best)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


def test_bpe_matches_naive_reference():
    # repeated letters ("aaaa", "banana") exercise overlapping pairs; the rest exercises ties
    text = corpus(150, seed=3) + " aaaa aaa aaaaa banana bananas anna " * 5 + "你好你好，世界世界 " * 4
    tok = BPETokenizer.train(text, 257 + 200)
    assert tok.merges == naive_bpe(text, 200)
    assert len(tok.merges) > 100
    # and to exhaustion, so both stop at the same point (the last pair that occurs twice)
    small = corpus(40, seed=4) + " ab ab ab cd"
    tok = BPETokenizer.train(small, 100_000)
    assert tok.merges == naive_bpe(small, 100_000)
    assert tok.vocab_size < 100_000


def test_bpe_on_long_chunks_matches_naive_reference():
    # text that never splits (DNA, base64 come as one chunk a line): training's linked list of positions must
    # merge as the textbook does, overlapping runs ("aaaa", "abab") at a chunk's edges and middle included
    rng = np.random.default_rng(5)
    dna = "".join("ACGT"[i] for i in rng.integers(0, 4, 3000))
    text = dna + " " + "a" * 301 + " " + "ab" * 150 + "a " + dna[:500] + "aaab" * 40 + " 1234567890" * 20
    tok = BPETokenizer.train(text, 257 + 150)
    assert tok.merges == naive_bpe(text, 150)
    assert len(tok.merges) == 150


def test_bpe_long_chunk_encoding_matches_plain():
    # chunks longer than LONG_CHUNK go through the heap encoder; it must give _encode_chunk's ids exactly
    rng = np.random.default_rng(6)
    dna = "".join("ACGT"[i] for i in rng.integers(0, 4, 4000))
    tok = BPETokenizer.train(dna + " " + "a" * 200 + " " + "ab" * 100, 500)
    chunks = [dna[1000:3000], "a" * 257, "a" * 256 + "b", "ab" * 300 + "a", "aaab" * 100, "b" + "a" * 99,
              bytes(rng.integers(0, 256, 1000, dtype=np.uint8)), "ACGT" * 20]
    for chunk in chunks:
        b = chunk if isinstance(chunk, bytes) else chunk.encode()
        assert len(b) > LONG_CHUNK
        assert tok._encode_long_chunk(b) == tok._encode_chunk(b)
        assert tok.decode_bytes(tok.encode(b)) == b
    assert tok.encode(dna).tolist() == tok._encode_chunk(dna.encode())


# ---- end-of-text ----

def test_end_of_text_is_reserved(bpe):
    for tok in (ByteTokenizer(), bpe):
        eot = tok.eot_id
        assert eot == tok.vocab_size - 1 and eot >= 256
        for s in SAMPLES + ["<|endoftext|>", "end of text \x00 \xff"]:
            assert eot not in tok.encode(s).tolist()  # no text can produce it
        assert tok.token_bytes(eot) == b""
        ids = tok.encode("before").tolist() + [eot] + tok.encode(" after").tolist()
        assert tok.decode(ids) == "before after"
        with pytest.raises(TinyPalmError):
            tok.decode([tok.vocab_size])


def test_end_of_text_survives_serialisation(bpe):
    for tok in (ByteTokenizer(), bpe):
        d = json.loads(json.dumps(tok.to_dict()))
        assert d["eot"] == tok.eot_id
        again = tokenizer_from_dict(d)
        assert again.eot_id == tok.eot_id and again.vocab_size == tok.vocab_size
    with pytest.raises(TinyPalmError):
        tokenizer_from_dict({"kind": "byte", "eot": 3})  # only 256 is the byte tokenizer's end-of-text


def test_tokenizers_saved_before_end_of_text_still_load(bpe):
    # dicts written before the token existed have no "eot" entry: same ids, same vocabulary size as then
    old_byte = tokenizer_from_dict({"kind": "byte"})
    assert old_byte.eot_id is None and old_byte.vocab_size == 256
    assert old_byte.decode(old_byte.encode("你好 ok")) == "你好 ok"
    with pytest.raises(TinyPalmError):
        old_byte.decode([256])
    old_bpe = tokenizer_from_dict({"kind": "bpe", "merges": [list(m) for m in bpe.merges]})
    assert old_bpe.eot_id is None and old_bpe.vocab_size == 256 + len(bpe.merges)
    assert old_bpe.encode("The cat sees the river.").tolist() == bpe.encode("The cat sees the river.").tolist()
    assert old_bpe.to_dict() == {"kind": "bpe", "merges": [list(m) for m in bpe.merges]}


def test_a_repeated_merge_is_refused():
    # it would make a chunk's ids depend on its length (the plain and the heap encoders rank it differently)
    with pytest.raises(TinyPalmError, match=r"bad BPE merge 1: \[98, 98\] repeats merge 0"):
        BPETokenizer.from_dict({"kind": "bpe", "merges": [[98, 98], [98, 98]]})


def test_the_encode_cache_stays_bounded_within_one_call(monkeypatch):
    import tinypalm.tokenizer as tokenizer
    monkeypatch.setattr(tokenizer, "CACHE_CHUNKS", 10)
    tok = BPETokenizer.train(corpus(50, seed=1), 300)
    text = " ".join(f"w{i}" for i in range(200))                   # 200 different chunks in one call
    ids = tok.encode(text)
    assert len(tok._cache) <= 10 and tok.decode(ids) == text
