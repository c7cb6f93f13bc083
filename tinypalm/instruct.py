"""Instruction data: a JSONL file of {"prompt": ..., "response": ...} lines, one example per line.

Each example becomes the tokens prompt + response + end-of-text, and the loss counts only the predictions of the
response's tokens and of the end-of-text: the model learns to answer and then to stop, not to write prompts. An
empty prompt becomes one end-of-text token (what ends the example before), so that the response's first token is
predicted from something.

Padding, not packing. A batch holds one example per row, starting at position 0, right-padded with end-of-text
to its longest example; padded positions are masked out of the loss. So every response is learned with exactly
its own prompt as context, as it will be asked at generation time. Packing examples into a stream would waste
no compute on padding, but a window would then start mid-example (a response learned without its prompt) and
attend across example boundaries; for the short examples of instruction data, padding costs little.
An example longer than seq_len + 1 tokens keeps its last seq_len + 1 (the prompt is cut from the left, as
generation cuts a long prompt), so the response and its end-of-text stay, unless those two together are longer
than seq_len (their first target needs the token before it): then the response's start is cut too (`n_cut` counts
both kinds).

The last 10% of the examples (at least one) are the validation split. Batches are drawn from (seed, step)
alone, as for text.
"""

import json
import os

import numpy as np

from .errors import TinyPalmError

FIELDS = ("prompt", "response")
_SHAPE = 'each line must be one JSON object like {"prompt": "...", "response": "..."}'
_SNIFF = 1 << 16


def is_pairs_file(path):
    """True for a .jsonl file, or a file whose first non-blank line is a JSON object with prompt and response."""
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.exists(path):
        return False
    if path.lower().endswith(".jsonl"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except OSError:
        return False
    for line in head.split(b"\n"):
        if line.strip():
            try:
                obj = json.loads(line.decode("utf-8-sig"))
            except ValueError:
                return False
            return isinstance(obj, dict) and all(k in obj for k in FIELDS)
    return False


def read_pairs(path):
    """[(prompt, response), ...] from a JSONL file; a bad line is an error naming its line number."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TinyPalmError(f"--data {path}: cannot read it ({e.strerror or e}); check that it is a readable file") from None
    pairs = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue                                  # blank lines (a trailing newline, spacing) are not examples
        where = f"--data {path} line {number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise TinyPalmError(f"{where}: not UTF-8 text; save the file as UTF-8 ({_SHAPE})") from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise TinyPalmError(f"{where}: not JSON ({e.msg} at column {e.colno}); {_SHAPE}") from None
        if not isinstance(obj, dict):
            raise TinyPalmError(f"{where}: a JSON {type(obj).__name__}, not an object; {_SHAPE}")
        for field in FIELDS:
            if field not in obj:
                raise TinyPalmError(f'{where}: no "{field}" field; {_SHAPE}')
            if not isinstance(obj[field], str):
                raise TinyPalmError(f'{where}: "{field}" is not a string; {_SHAPE}')
            try:
                obj[field].encode("utf-8")
            except UnicodeEncodeError:      # a \ud800 escape: half of a character, which no text can hold
                raise TinyPalmError(f'{where}: "{field}" holds an unpaired surrogate escape (like \\ud800) that '
                                    "UTF-8 cannot hold; fix or remove that line") from None
        pairs.append((obj["prompt"], obj["response"]))
    if not pairs:
        raise TinyPalmError(f"--data {path}: the file holds no examples (it is empty or blank); {_SHAPE}")
    return pairs


def corpus_bytes(pairs):
    """The examples' text, for training a BPE tokenizer on it."""
    return "\n".join(p + r for p, r in pairs).encode("utf-8", errors="surrogatepass")


def split_examples(n, val_fraction=0.1):
    """(number of training examples, number of validation examples): the last val_fraction, at least one."""
    n_val = max(1, int(n * val_fraction))
    return n - n_val, n_val


class PairsData:
    """Tokenised examples and their batches: x, y (B, T) ints and the loss mask (B, T), 1 where a target counts."""

    def __init__(self, pairs, tokenizer, path="the data", needs_train=True):
        if tokenizer.eot_id is None:
            raise TinyPalmError("prompt/response examples end with an end-of-text token, and this checkpoint's tokenizer "
                                "has none (a tinypalm without it saved it); pretrain a new base model (python train.py) "
                                "and start from that")
        self.tokenizer, self.eot = tokenizer, tokenizer.eot_id
        self.examples = []                 # (ids: prompt + response + end-of-text, number of prompt tokens)
        for prompt, response in pairs:
            p, r = tokenizer.encode(prompt), tokenizer.encode(response)
            if len(p) == 0:            # an empty prompt: end-of-text stands in, so the response's first token counts
                p = np.array([self.eot])
            self.examples.append((np.concatenate([p, r, [self.eot]]).astype(np.int32), len(p)))
        self.n_train, self.n_val = split_examples(len(self.examples))
        if self.n_train < 1 and needs_train:    # (scoring all the examples, or the validation split, needs none)
            raise TinyPalmError(f"--data {path}: {len(self.examples)} example; at least 2 are needed, since the last "
                                "10% of the examples (at least one) are held out for validation")

    @classmethod
    def load(cls, path, tokenizer):
        return cls(read_pairs(path), tokenizer, path)

    def n_cut(self, seq_len, indices=None):
        """(examples longer than seq_len + 1 tokens, which lose the start of their prompt; of those, the ones
        whose response is cut too; response tokens and end-of-text that are never predicted) among indices."""
        examples = self.examples if indices is None else [self.examples[i] for i in indices]
        lost = [len(ids) - n_prompt - seq_len for ids, n_prompt in examples]     # targets: the response and eot
        return (sum(len(ids) > seq_len + 1 for ids, _ in examples), sum(n > 0 for n in lost),
                sum(n for n in lost if n > 0))

    def describe_cut(self, seq_len, flag, indices=None):
        """A note on what n_cut counts, or None when every example fits."""
        n_long, n_response, n_targets = self.n_cut(seq_len, indices)
        if not n_long:
            return None
        text = (f"note: {n_long:,} examples hold more than {flag} + 1 = {seq_len + 1} tokens: their prompts lose "
                "their start")
        if n_response:
            text += (f", and {n_response:,} of them the start of their response too ({n_targets:,} response tokens "
                     "never predicted)")
        return text + f"; raise {flag} to keep them whole"

    def batch(self, indices, seq_len):
        """Rows of the given examples, padded to the longest (at most seq_len positions)."""
        rows = []
        for i in indices:
            ids, n_prompt = self.examples[i]
            cut = max(0, len(ids) - (seq_len + 1))       # keep the last seq_len + 1 tokens: the response survives
            rows.append((ids[cut:], max(0, n_prompt - cut)))
        T = max(len(ids) - 1 for ids, _ in rows)
        x = np.full((len(rows), T), self.eot, dtype=np.int32)
        y = np.full((len(rows), T), self.eot, dtype=np.int32)
        mask = np.zeros((len(rows), T), dtype=np.int32)
        for b, (ids, n_prompt) in enumerate(rows):
            n = len(ids) - 1
            x[b, :n], y[b, :n] = ids[:-1], ids[1:]
            mask[b, max(0, n_prompt - 1):n] = 1          # target j is token j + 1: a response token from j = n_prompt - 1
        return x, y, mask

    def train_batch(self, batch_size, seq_len, seed, step):
        """Random training examples, drawn from (seed, step) alone so that a resumed run sees the same batches."""
        rng = np.random.default_rng([seed, step])
        return self.batch(rng.integers(0, self.n_train, size=batch_size), seq_len)

    def val_indices(self, n_examples=None):
        """The validation examples, or n_examples of them spread evenly over the split (the same ones every time)."""
        first = self.n_train
        if n_examples is None or n_examples >= self.n_val:
            return np.arange(first, first + self.n_val)
        return first + np.linspace(0, self.n_val - 1, n_examples).round().astype(np.int64)

    def batches(self, indices, batch_size, seq_len):
        for k in range(0, len(indices), batch_size):
            yield self.batch(indices[k:k + batch_size], seq_len)

    def val_batches(self, batch_size, seq_len, n_batches):
        """At most n_batches batches of validation examples, fixed so that evaluations compare across steps."""
        return self.batches(self.val_indices(batch_size * n_batches), batch_size, seq_len)
