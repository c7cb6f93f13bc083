"""Evaluate a checkpoint on a whole text: loss, perplexity and bits per byte.

    python -m tinypalm.evaluate --ckpt out                          # on the data it trained on, all of it
    python -m tinypalm.evaluate --ckpt out --split val              # only the part training held out
    python -m tinypalm.evaluate --ckpt out/best.npz --data my.txt --seq-len 256 --json
    python -m tinypalm.evaluate --ckpt out --data corpus.tok        # a token file made with train.py --prepare
    python -m tinypalm.evaluate --ckpt sft --data pairs.jsonl       # instruction pairs: the responses' loss

Every token of the input is predicted exactly once, except the first, which has nothing before it and is
context only. The tokens are cut into windows of --seq-len; each window predicts the targets no earlier window
predicted, so with the default --stride (= --seq-len) the windows do not overlap and a window's first targets
see little context, as in training. --stride S < --seq-len slides windows S tokens at a time: each target after
the first window then sees at least seq_len - S tokens of context, at seq_len / S times the cost. The last window
is moved back to end at the last token, so that every window is full; what it repeats is context, not scored.

loss is the mean cross-entropy in nats per predicted token (without the z-loss), perplexity is exp(loss), and
bits per byte is the total in bits over the number of bytes those tokens decode to. Per-token figures depend
on the tokenizer (a BPE token holds several bytes); bits per byte measures the same text either way.
"""

import math
import os
import sys
import time

import numpy as np

from . import data
from .backend import DTYPES, read_scalars
from .cli import ArgumentParser, check_ranges, format_duration, json_line, run_cli
from .errors import TinyPalmError
from .instruct import PairsData, is_pairs_file, read_pairs
from .loading import load_model, trained_length


def token_byte_lengths(tokenizer):
    """(V,) int64: how many bytes each token id decodes to (end-of-text: none)."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def nll_sum(model, x, y, loss_mask=None):
    """Summed cross-entropy in nats (no z-loss) over the counted targets of a batch, and how many were counted.

    x, y (B, T) ints; loss_mask (B, T), 1 where a target counts (all of them when None)."""
    xp = model.xp
    y = xp.asarray(y).reshape(-1)
    mask = xp.ones(y.shape, dtype=xp.int32) if loss_mask is None else xp.asarray(loss_mask).reshape(-1)
    logits = model.forward(x)
    mean, _ = model.ops.masked_cross_entropy_forward(xp, logits.reshape(y.shape[0], -1), y, mask, 0.0)
    mean, count = read_scalars(xp, mean, mask.sum())              # one device-to-host read per batch
    return mean * count, int(count)


def evaluate_batches(model, batches, byte_lengths):
    """(loss, bits per byte) over batches of (x, y, loss_mask or None): nats per counted target, no z-loss."""
    nats, count, n_bytes = 0.0, 0, 0
    for x, y, mask in batches:
        batch_nats, batch_count = nll_sum(model, x, y, mask)
        nats, count = nats + batch_nats, count + batch_count
        n_bytes += int(byte_lengths[y if mask is None else y[mask == 1]].sum())
    return nats / max(count, 1), nats / math.log(2) / n_bytes if n_bytes else math.nan


def windows(n_tokens, seq_len, stride):
    """[(start, first_scored, end)]: window inputs tokens[start:end], targets tokens[start+1:end+1], scoring the
    targets of positions first_scored..end-1. Each of the n_tokens - 1 targets is scored by exactly one window."""
    n_targets, done, out = n_tokens - 1, 0, []
    while done < n_targets:
        end = min(done + (stride if done else seq_len), n_targets)
        out.append((max(0, end - seq_len), done, end))
        done = end
    return out


class Progress:
    """One line on stderr: rewritten in place on a terminal, else printed every few seconds."""

    def __init__(self, total, what="tokens", stream=None):
        self.total, self.what, self.stream = total, what, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.shown = time.time()

    def update(self, done, loss, final=False):
        now = time.time()
        if not final and now - self.shown < (0.2 if self.tty else 5.0):
            return
        self.shown = now
        elapsed = max(now - self.start, 1e-9)
        left = (self.total - done) * elapsed / max(done, 1)
        line = (f"eval: {done:,}/{self.total:,} {self.what} ({100 * done / max(self.total, 1):.0f}%) | "
                f"loss {loss:.4f} | {done / elapsed:,.0f} {self.what}/s | "
                + (f"{format_duration(elapsed)} elapsed" if final else f"{format_duration(left)} left"))
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()


def _summary(nats, n_scored, n_bytes):
    loss = nats / n_scored
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else math.nan,
            "tokens": int(n_scored), "bytes": int(n_bytes)}


def evaluate_tokens(model, tokens, seq_len, batch_size=8, stride=None, byte_lengths=None, progress=None,
                    what="the text"):
    """Loss, perplexity and bits per byte of a token stream (an array or memmap), every target scored once:
    windows of seq_len (1 to the model's max_seq_len) moving by stride (1 to seq_len; default seq_len)."""
    stride = seq_len if stride is None else stride
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise TinyPalmError(f"seq_len {seq_len}: must be between 1 and the model's max_seq_len {model.config.max_seq_len}")
    if not 1 <= stride <= seq_len:
        raise TinyPalmError(f"stride {stride}: must be between 1 and seq_len {seq_len} (a longer one skips targets)")
    if not 1 <= batch_size:
        raise TinyPalmError(f"batch_size {batch_size}: must be at least 1")
    if len(tokens) < 2:
        raise TinyPalmError(f"{what} is {len(tokens)} token{'s' * (len(tokens) != 1)} long; evaluation needs at least "
                            "2 (one to predict from)")
    spans = windows(len(tokens), seq_len, stride)
    nats, n_scored, n_bytes = 0.0, 0, 0
    for k in range(0, len(spans), batch_size):
        group = spans[k:k + batch_size]
        length = group[0][2] - group[0][0]                # every window is full: min(seq_len, number of targets)
        starts = np.array([s for s, _, _ in group], dtype=np.int64)
        w = np.asarray(tokens[starts[:, None] + np.arange(length + 1)]).astype(np.int32)   # (B, L+1)
        x, y = w[:, :-1], w[:, 1:]
        mask = (starts[:, None] + np.arange(length) >= np.array([d for _, d, _ in group])[:, None]).astype(np.int32)
        batch_nats, count = nll_sum(model, x, y, mask)
        nats, n_scored = nats + batch_nats, n_scored + count
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[y[mask == 1]].sum())
        if progress is not None:
            progress.update(n_scored, nats / n_scored, final=k + batch_size >= len(spans))
    return {**_summary(nats, n_scored, n_bytes), "seq_len": seq_len, "stride": stride, "windows": len(spans)}


def evaluate_pairs(model, pairs, indices, seq_len, batch_size=8, byte_lengths=None, progress=None):
    """The loss of instruction examples: each one's response and end-of-text, with its prompt as context."""
    nats, n_scored, n_bytes = 0.0, 0, 0
    for k, (x, y, mask) in enumerate(pairs.batches(indices, batch_size, seq_len)):
        batch_nats, count = nll_sum(model, x, y, mask)
        nats, n_scored = nats + batch_nats, n_scored + count
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[y[mask == 1]].sum())
        if progress is not None:
            done = min((k + 1) * batch_size, len(indices))
            progress.update(done, nats / max(n_scored, 1), final=done == len(indices))
    return {**_summary(nats, n_scored, n_bytes), "seq_len": seq_len, "examples": len(indices)}


def _same_tokenizer(a, b):
    # a token file from before the end-of-text token holds the same ids as one made after it
    strip = lambda d: {k: v for k, v in d.items() if k != "eot"} if isinstance(d, dict) else d
    return strip(a) == strip(b)


def build_parser():
    p = ArgumentParser(prog="python -m tinypalm.evaluate", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint .npz, or a training --out directory")
    p.add_argument("--adapter", default=None, metavar="PATH", help="adapter weights trained on top of --ckpt")
    p.add_argument("--data", default=None, help="text file, directory of text files, token file, or JSONL of "
                                                "prompt/response pairs (default: the data the checkpoint, or the "
                                                "adapter, trained on)")
    p.add_argument("--split", default="all", choices=["all", "train", "val"],
                   help="all of the data, or the part train.py trains on / holds out (the last 10%%)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the one the checkpoint trained with)")
    p.add_argument("--stride", type=int, default=None, help="new targets per window (default: --seq-len, no overlap)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results, for scripts")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="CPU or NVIDIA GPU")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the checkpoint's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_ranges(args, at_least_1=["batch_size"])
    model, tokenizer, ckpt = load_model(args.ckpt, args.adapter, backend=args.backend, dtype=args.dtype, trains=False)
    # the run that trained last (the adapter's, with one) gives the defaults: its data, its --seq-len
    run_args = model.adapter.meta.get("train_args", {}) if model.adapter is not None else ckpt.train_args
    max_len = model.config.max_seq_len
    seq_len = args.seq_len if args.seq_len is not None else min(int(run_args.get("seq_len", max_len)), max_len)
    if not 1 <= seq_len <= max_len:
        raise TinyPalmError(f"--seq-len {seq_len}: must be between 1 and the model's max_seq_len {max_len}")
    stride = args.stride if args.stride is not None else seq_len
    if not 1 <= stride <= seq_len:
        raise TinyPalmError(f"--stride {stride}: must be between 1 and --seq-len {seq_len}")
    trained_len = trained_length(model, ckpt)
    if seq_len > trained_len:
        print(f"note: --seq-len {seq_len} is longer than the {trained_len} positions the model trained on; it never "
              f"learned positions past {trained_len}, so expect a higher loss than at --seq-len {trained_len}",
              file=sys.stderr)
    if args.data is None and run_args.get("data") is not None:    # what it trained on, as train.py's split sees it
        args.data = run_args["data"]
        if not os.path.exists(args.data):
            raise TinyPalmError(f"{args.data}, the data {model.adapter.path if model.adapter else ckpt.path} trained "
                                "on, is not there (a path is relative to where train.py ran); pass it with --data")
        print(f"data: {args.data}, what {'the adapter' if model.adapter else 'the checkpoint'} trained on "
              "(--data evaluates another)", file=sys.stderr)
    byte_lengths = token_byte_lengths(tokenizer)
    head = {"checkpoint": ckpt.path, "step": ckpt.step, "data": args.data or "default corpus", "split": args.split,
            "adapter": model.adapter.path if model.adapter is not None else None}

    t0 = time.time()
    if args.data and is_pairs_file(args.data):
        if args.stride is not None:
            raise TinyPalmError(f"--stride slides windows over text; {args.data} holds prompt/response examples, each "
                                "scored in one window: drop --stride")
        pairs = PairsData(read_pairs(args.data), tokenizer, args.data, needs_train=args.split == "train")
        indices = {"all": np.arange(len(pairs.examples)), "train": np.arange(pairs.n_train),
                   "val": pairs.val_indices()}[args.split]
        cut = pairs.describe_cut(seq_len, "--seq-len", indices)
        if cut:
            print(cut, file=sys.stderr)
        source = f"{args.data}: {len(indices):,} prompt/response examples ({args.split})"
        progress = Progress(len(indices), "examples")
        result = evaluate_pairs(model, pairs, indices, seq_len, args.batch_size, byte_lengths, progress)
    else:
        if args.data and data.is_token_file(args.data):
            tokens, file_tok = data.open_token_file(args.data)
            if not _same_tokenizer(file_tok, ckpt.tokenizer_dict):
                raise TinyPalmError(f"--data {args.data}: this token file was made with another tokenizer than the "
                                    "checkpoint's; prepare it again with train.py --init-from CKPT --prepare")
            source = f"{args.data}: {len(tokens):,} tokens"
        else:
            corpus, desc = (data.read_corpus(args.data), args.data) if args.data else data.default_corpus()
            tokens = tokenizer.encode(corpus)
            source = f"{desc}: {len(corpus):,} bytes -> {len(tokens):,} {tokenizer.kind} tokens"
        if args.split != "all":
            tokens = data.split_train_val(tokens, byte_lengths=byte_lengths)[args.split == "val"]
            source += f", {args.split} split {len(tokens):,}"
        progress = Progress(max(len(tokens) - 1, 0))
        result = evaluate_tokens(model, tokens, seq_len, args.batch_size, stride, byte_lengths, progress,
                                 what="the text" if args.split == "all" else f"its {args.split} split")
    result = {**head, **result, "seconds": time.time() - t0}

    if args.json:
        print(json_line(result))
        return
    adapter = f" with the adapter {model.adapter.path}" if model.adapter is not None else ""
    print(f"{ckpt.path} (step {ckpt.step}){adapter} on {source}")
    shape = (f"windows of {seq_len}, stride {stride}" if "stride" in result
             else f"responses of {result['examples']:,} examples")
    bpb = f"{result['bits_per_byte']:.4f}" if result["bytes"] else "n/a (no bytes)"
    print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | bits per byte "
          f"{bpb} ({result['tokens']:,} tokens scored, {result['bytes']:,} bytes; {shape})")


if __name__ == "__main__":
    run_cli(main)
