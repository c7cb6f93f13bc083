"""Text classification with a pretrained tinypalm model: fine-tuning, and few-shot prompting with no training.

    python -m tinypalm.classify make-example --out topics.csv          # a labelled task from Python's own docs
    python -m tinypalm.classify train --data topics.csv --ckpt out --mode lora --out clf.npz
    python -m tinypalm.classify eval --model clf.npz [--json]           # the held-out split again
    python -m tinypalm.classify predict --model clf.npz --input texts.txt   # one label per input line
    python -m tinypalm.classify fewshot --ckpt out --data topics.csv --shots 3

Data: a CSV with a header, or JSONL (one object per line), with a text and a label field (--text-field,
--label-field; default text, label). The held-out split is 20% of each label's examples, drawn with --seed
(stratified, so every label is in both parts in proportion; a label too small to give one held-out example,
fewer than 3 at 20%, stays wholly in training), or a separate file with --test-data. Few-shot prompting and
every fine-tuning mode are scored on the same split.

The head reads the final LayerNorm output, mean-pooled over the text's tokens (--pool mean, the default) or at
its last token (--pool last, as causal-LM classifiers such as GPT-2's do: with causal attention only the last
position has seen the whole text). For a small byte-level model the last position's state is mostly about the
next byte, so the mean, which gathers evidence from every position, is the default. Padding sits at the right,
where causal attention keeps it from touching the real positions, and gets zero pooling weight.

Modes (--mode): head (the model frozen: its pooled features are computed once), top (the top --top-layers
layers, the final norm and the head), lora (adapters as in lora.py, and the head), full (everything). AdamW with
the usual fine-tuning defaults: lr 2e-5, batch 16, 3 epochs, betas (0.9, 0.999), no weight decay, linear decay
to zero, gradient clipping at 1.0. The classifier file holds the head and what training changed (the top
layers, every parameter, or the adapters), and names its base checkpoint by content hash.
"""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
import zipfile

import numpy

from .backend import read_scalars, to_numpy
from .cli import ArgumentParser, add_adamw_flags, check_ranges, finite_float
from .errors import TinyPalmError
from .files import check_writable, write_atomically
from .flat import flatten
from .loading import load_model, trained_length
from .lora import LoRA, TARGETS, DEFAULT_TARGETS, params_hash, format_bytes
from .model import LAYER_PARAMS, Layer, layer_storage_names
from .optim import AdamW, clip_together, update_runs

FORMAT, VERSION = "tinypalm-classifier", 1
MODES = ("head", "top", "lora", "full")


# --- the classification head --------------------------------------------------------------------------------

def classifier_head_forward(h, pool, w, b):
    # h (B, T, D) final hidden states, pool (B, T) pooling weights (each row sums to 1, zero on padding),
    # w (D, C), b (C,) -> logits (B, C) = (sum_t pool[:, t] h[:, t]) @ w + b
    pooled = (pool[:, None, :] @ h)[:, 0]                          # (B, D)
    return pooled @ w + b, (pooled, pool)


def classifier_head_backward(dlogits, w, dw, db, cache):
    # dw (D, C), db (C,) accumulate; returns dh (B, T, D): each position gets its pooling weight's share
    pooled, pool = cache
    dw += pooled.T @ dlogits
    db += dlogits.sum(axis=0)
    d_pooled = dlogits @ w.T                                       # (B, D)
    return pool[:, :, None] * d_pooled[:, None, :]


def pooling_weights(xp, lengths, T, pool, dtype):
    # lengths (B,) -> (B, T): 1/length on each real token (mean), or 1 at the last real token (last)
    positions = xp.arange(T)[None, :]
    lengths = xp.asarray(lengths)[:, None]
    if pool == "mean":
        return ((positions < lengths) / lengths).astype(dtype)
    return (positions == lengths - 1).astype(dtype)


# --- the model up to its final hidden state, and back ---------------------------------------------------------

def hidden_forward(model, tokens):
    # tokens (B, T) -> h (B, T, D): the final LayerNorm's output (what the tied logits would read), and caches
    ops, cfg = model.ops, model.config
    B, T = tokens.shape
    x = ops.embedding_forward(model.embed, tokens)
    block_caches = []
    for i, layer in enumerate(model.layers):
        x, cache = model._block_forward(x, layer, 0, None, i)
        block_caches.append(cache)
    h, ln_cache = ops.layernorm_forward(x.reshape(B * T, cfg.d_model), model.norm, cfg.norm_eps)
    return h.reshape(B, T, cfg.d_model), (block_caches, ln_cache)


def hidden_backward(model, dh, caches, tokens, grads, lowest_layer=0, embed=True):
    # dh (B, T, D) -> accumulates into grads (a Flat like model.params; grads.adapter with adapters), going down
    # only to lowest_layer (the layers below are frozen, so nothing there needs a gradient)
    ops, cfg = model.ops, model.config
    B, T, D = dh.shape
    block_caches, ln_cache = caches
    dx = ops.layernorm_backward(dh.reshape(B * T, D), model.norm, grads.stored["norm"], ln_cache).reshape(B, T, D)
    for i in reversed(range(lowest_layer, cfg.n_layers)):
        dx = model._block_backward(dx, model.layers[i], Layer(cfg, grads.stored, i), block_caches[i],
                                   getattr(grads, "adapter", None))
    if embed and lowest_layer == 0:
        ops.embedding_backward(model.xp, grads.stored["embed"], dx, tokens)


# --- data ---------------------------------------------------------------------------------------------------

def read_examples(path, text_field="text", label_field="label"):
    """[(text, label)] from a CSV with a header or a JSONL file (by extension: .jsonl, .json, .ndjson)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:     # -sig: without the BOM Excel writes
            content = f.read()
    except FileNotFoundError:
        raise TinyPalmError(f"{path}: no such file; pass a CSV or JSONL file of {text_field},{label_field}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinyPalmError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__}); pass a UTF-8 CSV or JSONL file") from None
    if not content.strip():
        raise TinyPalmError(f"{path}: the file is empty; it needs a {text_field},{label_field} header and one example per row")
    jsonl = path.lower().endswith((".jsonl", ".json", ".ndjson"))
    examples = _read_jsonl(path, content, text_field, label_field) if jsonl else _read_csv(path, content, text_field, label_field)
    if not examples:
        raise TinyPalmError(f"{path}: no examples, only a header; add one {text_field},{label_field} row per example")
    return examples


def _example(path, where, text, label, text_field, label_field):
    if text is None or label is None:
        missing = text_field if text is None else label_field
        raise TinyPalmError(f"{path} {where}: no value for {missing!r}; every example needs a {text_field} and a {label_field}")
    text, label = str(text), str(label).strip()
    if not text.strip() or not label:
        raise TinyPalmError(f"{path} {where}: empty {text_field if not text.strip() else label_field}; "
                            "remove the row or fill it in")
    return text, label


def _read_csv(path, content, text_field, label_field):
    try:
        reader = csv.DictReader(io.StringIO(content))
        columns = reader.fieldnames or []
        for field, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field not in columns:
                raise TinyPalmError(f"{path}: no column {field!r} in the header ({', '.join(map(repr, columns))}); "
                                    f"name the right one with {flag}")
        examples = []
        for n, row in enumerate(reader, start=2):
            if None in row:            # more fields than the header: a comma in a text that is not quoted
                raise TinyPalmError(f"{path} row {n}: {len(columns) + len(row[None])} fields under a header of "
                                    f"{len(columns)}; put a text that holds commas in double quotes")
            examples.append(_example(path, f"row {n}", row.get(text_field), row.get(label_field), text_field,
                                     label_field))
        return examples
    except csv.Error as e:
        raise TinyPalmError(f"{path}: not valid CSV ({e}); quote fields that hold commas or newlines") from None


def _read_jsonl(path, content, text_field, label_field):
    examples = []
    for n, line in enumerate(content.split("\n"), start=1):     # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyPalmError(f"{path} line {n}: not JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise TinyPalmError(f"{path} line {n}: a JSON {type(record).__name__}, not an object; write one "
                                f'{{"{text_field}": ..., "{label_field}": ...}} object per line')
        for field, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field not in record:
                raise TinyPalmError(f"{path} line {n}: no field {field!r} (fields: {', '.join(map(repr, record))}); "
                                    f"add it, or name the right one with {flag}")
        examples.append(_example(path, f"line {n}", record[text_field], record[label_field], text_field, label_field))
    return examples


def split_examples(examples, test_fraction=0.2, seed=0):
    """(train, test): test_fraction of each label's examples, drawn with the seed; at least one stays in train."""
    if not 0 < test_fraction < 1:
        raise TinyPalmError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    by_label = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    rng = numpy.random.default_rng(seed)
    test = set()
    for label in sorted(by_label):
        idx = rng.permutation(by_label[label])
        test.update(int(i) for i in idx[:min(int(len(idx) * test_fraction + 0.5), len(idx) - 1)])
    return [e for i, e in enumerate(examples) if i not in test], [e for i, e in enumerate(examples) if i in test]


def check_labels(labels, examples, what="the test split"):
    unknown = sorted({label for _, label in examples} - set(labels))
    if unknown:
        raise TinyPalmError(f"labels {', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''} appear only "
                            f"in {what}, never in training; add training examples of them or remove them")


def load_split(args):
    """(train, test) examples from --data (split) or --data and --test-data."""
    examples = read_examples(args.data, args.text_field, args.label_field)
    if getattr(args, "test_data", None):
        train, test = examples, read_examples(args.test_data, args.text_field, args.label_field)
    else:
        train, test = split_examples(examples, args.test_fraction, args.seed)
    if not test:
        raise TinyPalmError(f"{args.data}: too few examples for a held-out split ({len(examples)}); add examples or pass --test-data")
    check_labels(sorted({label for _, label in train}), test)
    return train, test


# --- metrics ----------------------------------------------------------------------------------------------------

def report(labels, truth, predicted):
    """Accuracy, per-class precision / recall / F1 / support, macro F1, and the confusion matrix (rows: truth)."""
    index = {label: i for i, label in enumerate(labels)}
    C = len(labels)
    confusion = numpy.zeros((C, C), dtype=int)
    for t, p in zip(truth, predicted):
        confusion[index[t], index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp, predicted_i, actual_i = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual_i)}
    return {"n": len(truth), "accuracy": float(numpy.trace(confusion) / max(1, len(truth))),
            "macro_f1": float(numpy.mean([c["f1"] for c in per_class.values()])), "per_class": per_class,
            "labels": list(labels), "confusion": confusion.tolist()}


def format_report(r):
    width = max(12, *(len(label) for label in r["labels"]))
    lines = [f"accuracy {r['accuracy']:.4f} ({round(r['accuracy'] * r['n'])}/{r['n']}), macro F1 {r['macro_f1']:.4f}", "",
             f"{'label':<{width}}  precision  recall      f1  support"]
    for label, c in r["per_class"].items():
        lines.append(f"{label:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:6.3f}  {c['support']:7d}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted, in the order above)"]
    lines += [f"{label:<{width}}  " + " ".join(f"{n:4d}" for n in row) for label, row in zip(r["labels"], r["confusion"])]
    return "\n".join(lines)


# --- the classifier --------------------------------------------------------------------------------------------

class Classifier:
    """A model (with its adapter, if any), the head and how texts become batches."""

    def __init__(self, model, tokenizer, labels, pool="mean", max_tokens=128, head=None):
        self.model, self.tokenizer, self.labels = model, tokenizer, list(labels)
        self.pool, self.max_tokens = pool, min(max_tokens, model.config.max_seq_len)
        xp, D, C = model.xp, model.config.d_model, len(labels)
        # zero head: at step 0 every label is equally likely and the loss is exactly log C
        self.head = head if head is not None else flatten(xp, {"w": xp.zeros((D, C)), "b": xp.zeros(C)}, model.dtype)

    def encode(self, texts):
        return [[int(t) for t in self.tokenizer.encode(text)[:self.max_tokens]] or [0] for text in texts]

    def batch(self, seqs):
        # right-padded tokens (B, T) and pooling weights (B, T)
        xp, T = self.model.xp, max(len(s) for s in seqs)
        tokens = numpy.zeros((len(seqs), T), dtype=numpy.int64)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = s
        lengths = numpy.array([len(s) for s in seqs])
        return xp.asarray(tokens), pooling_weights(xp, lengths, T, self.pool, self.model.dtype)

    def features(self, seqs, batch_size=32):
        """Pooled final hidden states (n, D) of a frozen model: the head-only mode's inputs, computed once."""
        out = []
        for a in range(0, len(seqs), batch_size):
            tokens, pool = self.batch(seqs[a:a + batch_size])
            h, _ = hidden_forward(self.model, tokens)
            out.append((pool[:, None, :] @ h)[:, 0])
        return self.model.xp.concatenate(out)

    def logits(self, seqs, batch_size=32):
        out = []
        for a in range(0, len(seqs), batch_size):
            tokens, pool = self.batch(seqs[a:a + batch_size])
            h, _ = hidden_forward(self.model, tokens)
            out.append(to_numpy(classifier_head_forward(h, pool, self.head["w"], self.head["b"])[0]))
        return numpy.concatenate(out)

    def predict(self, texts):
        return [self.labels[i] for i in self.logits(self.encode(texts)).argmax(axis=1)]


def save_classifier(path, clf, meta, changed_params):
    arrays = {"meta": numpy.array(json.dumps({"format": FORMAT, "version": VERSION, **meta}))}
    arrays.update({f"head.{k}": to_numpy(v) for k, v in clf.head.items()})
    arrays.update({f"param.{name}": to_numpy(clf.model.params[name]) for name in changed_params})
    if clf.model.adapter is not None:
        arrays.update({f"lora.{name}": to_numpy(p) for name, p in clf.model.adapter.params.items()})
    write_atomically(path, lambda f: numpy.savez(f, **arrays), "classifier", " or pass another --out")


def load_classifier(path, ckpt=None, backend="numpy"):
    """A Classifier from its file, on its base checkpoint (recorded in the file, or --ckpt), checked by hash."""
    if not os.path.isfile(path):
        raise TinyPalmError(f"--model {path}: no such file; pass a classifier written by `python -m tinypalm.classify train`")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise TinyPalmError(f"--model {path}: not a tinypalm classifier (this tinypalm reads classifier "
                                    f"format version {VERSION}); pass a file written by `python -m tinypalm.classify "
                                    "train`")
            arrays = {k: npz[k] for k in npz.files if k != "meta"}
    except TinyPalmError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise TinyPalmError(f"--model {path}: cannot read the classifier, the file is truncated or corrupt ({type(e).__name__})") from None
    model, tokenizer, ck = load_model(ckpt or meta["base"], backend=backend, dtype=meta["dtype"], trains=False)
    if params_hash(ck.params) != meta["base_sha256"]:
        raise TinyPalmError(f"--model {path} was trained on another base model than {ck.path}; pass the checkpoint "
                            "it was trained from with --ckpt")
    model.load_params({**model.params_numpy(), **{k[6:]: v for k, v in arrays.items() if k.startswith("param.")}})
    if meta.get("lora"):
        model.adapter = LoRA(model.config, meta["lora"]["rank"], meta["lora"]["alpha"], meta["lora"]["targets"],
                             xp=model.xp, dtype=model.dtype)
        for name, p in model.adapter.params.items():
            p[...] = model.xp.asarray(arrays[f"lora.{name}"])
    head = flatten(model.xp, {"w": model.xp.asarray(arrays["head.w"]), "b": model.xp.asarray(arrays["head.b"])})
    return Classifier(model, tokenizer, meta["labels"], meta["pool"], meta["max_tokens"], head), meta


# --- training -----------------------------------------------------------------------------------------------------

def train(args):
    train_set, test_set = load_split(args)
    labels = sorted({label for _, label in train_set})
    if len(labels) < 2:
        raise TinyPalmError(f"{args.data}: only one label ({labels[0]!r}) in training; a classifier needs at least two")
    model, tokenizer, ck = load_model(args.ckpt, backend=args.backend, dtype=args.dtype,
                                      trains=args.mode in ("top", "full"))     # else the base stays as it is
    cfg, xp, learned = model.config, model.xp, trained_length(model, ck)
    clf = Classifier(model, tokenizer, labels, args.pool, args.max_tokens)
    betas = (args.beta1, args.beta2)

    # what trains: the head always; then per mode the model's stored arrays from layer `lowest` up, or the adapters
    lowest, trained_model = cfg.n_layers, []
    if args.mode == "top":
        args.top_layers = 1 if args.top_layers is None else args.top_layers
        if not 1 <= args.top_layers <= cfg.n_layers:
            raise TinyPalmError(f"--top-layers {args.top_layers}: the model has {cfg.n_layers} layers; pick 1 to {cfg.n_layers}")
        lowest = cfg.n_layers - args.top_layers
        trained_model = [n for i in range(lowest, cfg.n_layers) for n in layer_storage_names(i)] + ["norm"]
    elif args.mode == "full":
        lowest, trained_model = 0, list(model.layout.spans)
    elif args.mode == "lora":
        lowest = 0
        rank = LORA_RANK if args.lora_rank is None else args.lora_rank
        targets = DEFAULT_TARGETS if args.lora_targets is None else args.lora_targets    # "" is refused, not default
        model.adapter = LoRA(cfg, rank, args.lora_alpha, targets, xp=xp, dtype=model.dtype, seed=args.seed)
    optimizers = [(clf.head, lambda g: g[1], AdamW(clf.head, betas, weight_decay=args.weight_decay))]
    runs, changed = [], []           # the trained stretches of the model's flat vector; their canonical names
    if trained_model:
        frozen = [n for n in model.layout.spans if n not in trained_model]
        optimizers.append((model.params, lambda g: g[0], AdamW(model.params, betas, weight_decay=args.weight_decay, frozen=frozen)))
        runs = update_runs(model.layout, frozen)
        changed = [f"layers.{i}.{k}" for i in range(lowest, cfg.n_layers) for k in LAYER_PARAMS] + \
                  [n for n in ("norm", "embed") if n in trained_model]
    if model.adapter is not None:
        optimizers.append((model.adapter.params, lambda g: g[0].adapter,
                           AdamW(model.adapter.params, betas, weight_decay=args.weight_decay)))
    n_trainable = clf.head.flat.size + sum(b - a for a, b, _ in runs)
    n_trainable += model.adapter.n_params if model.adapter is not None else 0
    itemsize = model.master_dtype.itemsize                    # AdamW's moments: float32 for a bf16 model
    log = sys.stderr if args.json else sys.stdout             # --json: stdout holds the one JSON object alone
    print(f"data: {len(train_set) + (0 if args.test_data else len(test_set))} examples in {args.data}, "
          f"{len(labels)} labels; {len(train_set)} train, {len(test_set)} held out"
          + (f" ({args.test_data})" if args.test_data else f" (stratified {args.test_fraction:.0%}, seed {args.seed})"),
          file=log)
    print(f"mode {args.mode}: {n_trainable:,} trainable parameters of {model.params.flat.size + clf.head.flat.size:,}; "
          f"AdamW state {format_bytes(2 * itemsize * n_trainable)} against "
          f"{format_bytes(2 * itemsize * (model.params.flat.size + clf.head.flat.size))} for full fine-tuning", file=log)
    if clf.max_tokens < args.max_tokens:
        print(f"note: --max-tokens {args.max_tokens} is beyond the model's context: it reads each text's first "
              f"{clf.max_tokens} tokens", file=log)
    if clf.max_tokens > learned:
        print(f"note: the model trained on {learned} positions and never learned those past them; --max-tokens "
              f"{learned} keeps to what it knows", file=log)

    t0 = time.time()
    seqs = clf.encode([t for t, _ in train_set])
    y_all = numpy.array([labels.index(label) for _, label in train_set])
    test_seqs, test_truth = clf.encode([t for t, _ in test_set]), [label for _, label in test_set]
    features = clf.features(seqs) if args.mode == "head" else None      # a frozen model: its features once
    test_features = clf.features(test_seqs) if args.mode == "head" else None
    steps_per_epoch = math.ceil(len(seqs) / args.batch_size)
    total_steps, step = steps_per_epoch * args.epochs, 0
    for epoch in range(args.epochs):
        order = numpy.random.default_rng([args.seed, epoch]).permutation(len(seqs))
        losses = []
        for a in range(0, len(order), args.batch_size):
            idx = order[a:a + args.batch_size]
            y = xp.asarray(y_all[idx])
            if features is not None:           # frozen model: the head reads the pooled features directly
                h, pool = features[xp.asarray(idx)][:, None, :], xp.ones((len(idx), 1), dtype=model.dtype)
            else:
                tokens, pool = clf.batch([seqs[i] for i in idx])
                h, caches = hidden_forward(model, tokens)
            logits, head_cache = classifier_head_forward(h, pool, clf.head["w"], clf.head["b"])
            loss, ce_cache = model.ops.cross_entropy_forward(xp, logits, y, 0.0)
            dlogits = model.ops.cross_entropy_backward(xp, ce_cache, 0.0)
            head_grads = clf.head.zeros_like()
            dh = classifier_head_backward(dlogits, clf.head["w"], head_grads["w"], head_grads["b"], head_cache)
            grads = None
            if features is None:
                grads = model.grads_like()
                if model.adapter is not None:
                    grads.adapter = model.adapter.grads_like()
                hidden_backward(model, dh, caches, tokens, grads, lowest, embed="embed" in trained_model)
            every = (grads, head_grads)
            vectors = [head_grads.flat] + [grads.flat[a:b] for a, b, _ in runs]
            vectors += [grads.adapter.flat] if model.adapter is not None else []
            clip_together(vectors, args.grad_clip)
            lr = args.lr * (1.0 - step / total_steps)            # linear decay to zero
            for params, grads_of, optimizer in optimizers:
                optimizer.step(params, grads_of(every), lr)
            losses.append(loss)
            step += 1
        if test_features is not None:
            test_logits = to_numpy(test_features @ clf.head["w"] + clf.head["b"])
        else:
            test_logits = clf.logits(test_seqs)
        accuracy = numpy.mean(test_logits.argmax(axis=1) == numpy.array([labels.index(t) for t in test_truth]))
        print(f"epoch {epoch + 1}/{args.epochs} | train loss {numpy.mean(read_scalars(xp, *losses)):.4f} | held-out accuracy "
              f"{accuracy:.4f} | {time.time() - t0:.1f}s", file=log, flush=True)
    seconds = time.time() - t0
    meta = {"labels": labels, "pool": args.pool, "max_tokens": clf.max_tokens, "mode": args.mode, "dtype": str(model.dtype),
            "base": os.path.abspath(ck.path), "base_sha256": params_hash(ck.params), "data": os.path.abspath(args.data),
            "data_sha256": file_hash(args.data), "test_data": os.path.abspath(args.test_data) if args.test_data else None,
            "text_field": args.text_field, "label_field": args.label_field, "seed": args.seed,
            "test_fraction": args.test_fraction, "trainable_params": int(n_trainable), "train_seconds": seconds,
            "lora": {"rank": model.adapter.rank, "alpha": model.adapter.alpha, "targets": list(model.adapter.targets)}
            if model.adapter is not None else None,
            "train_args": {k: v for k, v in vars(args).items() if k not in ("command", "func")}}
    save_classifier(args.out, clf, meta, changed)
    result = report(labels, test_truth, clf.predict([t for t, _ in test_set]))
    result.update(mode=args.mode, trainable_params=int(n_trainable), train_seconds=seconds)
    print(f"wrote {args.out} ({format_bytes(os.path.getsize(args.out))}); trained in {seconds:.1f}s\n", file=log)
    print_result(result, args)


def print_result(result, args):
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))


# --- eval and predict ---------------------------------------------------------------------------------------------

def file_hash(path):
    """sha256 of a file's bytes (None when it cannot be read: then reading it as data says why)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def evaluate(args):
    if not args.data and (args.text_field or args.label_field):
        raise TinyPalmError("--text-field and --label-field name the columns of --data; without --data the "
                            "classifier's own split is read with the columns it was trained with")
    clf, meta = load_classifier(args.model, args.ckpt, args.backend)
    if args.data:             # another file, all of it held out
        test_set = read_examples(args.data, args.text_field or meta["text_field"], args.label_field or meta["label_field"])
    else:                     # the split the classifier was trained with
        if not os.path.exists(meta["data"]):
            raise TinyPalmError(f"{meta['data']}, which {args.model} was trained on, is gone; put it back, or score "
                                "another file with --data FILE")
        if meta["test_data"] is None and meta.get("data_sha256") not in (None, file_hash(meta["data"])):
            raise TinyPalmError(f"{meta['data']} has changed since {args.model} was trained on it, so its held-out "
                                "split could now hold training examples; score another file with --data FILE, or "
                                "train again on this one")
        ns = argparse.Namespace(data=meta["data"], test_data=meta["test_data"], text_field=meta["text_field"],
                                label_field=meta["label_field"], test_fraction=meta["test_fraction"], seed=meta["seed"])
        _, test_set = load_split(ns)
    check_labels(clf.labels, test_set, "the evaluation data")
    result = report(clf.labels, [label for _, label in test_set], clf.predict([t for t, _ in test_set]))
    result.update(mode=meta["mode"], trainable_params=meta["trainable_params"], train_seconds=meta["train_seconds"])
    print_result(result, args)


def predict(args):
    clf, _ = load_classifier(args.model, args.ckpt, args.backend)
    try:
        with open(args.input, encoding="utf-8-sig", newline="") as f:
            texts = f.read().split("\n")      # one label per \n, as wc -l counts: a form feed or U+2028 is text
        if texts[-1] == "":
            texts.pop()
        texts = [t[:-1] if t.endswith("\r") else t for t in texts]
    except (OSError, UnicodeDecodeError) as e:
        raise TinyPalmError(f"--input {args.input}: cannot read it as UTF-8 text ({type(e).__name__}); "
                            "pass a text file with one input per line") from None
    labels = (label for a in range(0, len(texts), 256)
              for label in clf.predict([t if t.strip() else " " for t in texts[a:a + 256]]))
    if args.output:                 # all or nothing: a run stopped half-way leaves no short file that looks whole
        lines = "".join(label + "\n" for label in labels)
        write_atomically(args.output, lambda f: f.write(lines.encode("utf-8")), "labels file", " or pass another --output")
    else:
        for label in labels:
            sys.stdout.write(label + "\n")


# --- few-shot prompting -------------------------------------------------------------------------------------------

def fewshot_prompt(tokenizer, demos, query, per_text):
    """Token ids of k demonstrations then the query, each text cut to per_text tokens:
    'Text: <text>\\nLabel: <label>\\n\\n' ... 'Text: <query>\\nLabel:'"""
    def text(t):
        return tokenizer.decode(tokenizer.encode(" ".join(t.split()))[:per_text])
    prompt = "".join(f"Text: {text(t)}\nLabel: {label}\n\n" for t, label in demos) + f"Text: {text(query)}\nLabel:"
    return [int(i) for i in tokenizer.encode(prompt)]


def label_log_likelihoods(model, prompt, continuations, score="mean"):
    """log p(continuation | prompt) for each continuation, in one batch: summed, or averaged per token."""
    if not prompt or not all(continuations):
        raise TinyPalmError("label_log_likelihoods: the prompt and every continuation need at least one token")
    xp = model.xp
    T = len(prompt) + max(len(c) for c in continuations)
    tokens = numpy.zeros((len(continuations), T), dtype=numpy.int64)
    for i, c in enumerate(continuations):
        tokens[i, :len(prompt) + len(c)] = prompt + c
    logits = to_numpy(model.forward(xp.asarray(tokens[:, :-1]))).astype(numpy.float64)   # (C, T-1, V)
    log_probs = logits - logits.max(axis=-1, keepdims=True)
    log_probs -= numpy.log(numpy.exp(log_probs).sum(axis=-1, keepdims=True))
    scores = []
    for i, c in enumerate(continuations):
        positions = numpy.arange(len(prompt) - 1, len(prompt) - 1 + len(c))   # the logits that predict c's tokens
        total = float(log_probs[i, positions, c].sum())
        scores.append(total / len(c) if score == "mean" else total)
    return scores


def fewshot(args):
    train_set, test_set = load_split(args)
    labels = sorted({label for _, label in train_set})
    model, tokenizer, ckpt = load_model(args.ckpt, args.adapter, backend=args.backend, trains=False)
    # each label is scored with the newline that ends it, so no label's score counts as a prefix of another's
    continuations = [[int(i) for i in tokenizer.encode(f" {label}\n")] for label in labels]
    budget = model.config.max_seq_len - max(len(c) for c in continuations)
    longest = max(labels, key=lambda label: len(tokenizer.encode(label)))
    overhead = len(fewshot_prompt(tokenizer, [("", longest)] * args.shots, "", 0))      # the template alone
    per_text = (budget - overhead) // (args.shots + 1)
    if per_text < 8:
        raise TinyPalmError(f"--shots {args.shots}: the model's context ({model.config.max_seq_len} tokens) leaves "
                            f"{max(per_text, 0)} tokens per text; use fewer shots")
    learned = trained_length(model, ckpt)
    if not args.json and learned < model.config.max_seq_len:
        print(f"note: prompts fill the model's {model.config.max_seq_len} positions, and it trained on {learned}: "
              f"it never learned those past them, so a long prompt's early demonstrations may count for little",
              file=sys.stderr)
    t0, predicted = time.time(), []
    # pmi: each label's log-likelihood after the bare "Label:", the model's prior for it, is subtracted
    prior = label_log_likelihoods(model, [int(i) for i in tokenizer.encode("Label:")], continuations, "sum") \
        if args.score == "pmi" else numpy.zeros(len(labels))
    for j, (text, _) in enumerate(test_set):
        rng = numpy.random.default_rng([args.seed, j])
        demos = [train_set[i] for i in rng.choice(len(train_set), min(args.shots, len(train_set)), replace=False)]
        prompt = fewshot_prompt(tokenizer, demos, text, per_text)[-(budget):]
        scores = numpy.array(label_log_likelihoods(model, prompt, continuations, "mean" if args.score == "mean" else "sum"))
        scores -= prior
        predicted.append(labels[int(numpy.argmax(scores))])
        if not args.json and (j + 1) % 20 == 0:      # rewritten in place on a terminal, a line each in a log
            print(f"{j + 1}/{len(test_set)} scored, {time.time() - t0:.0f}s", end="\r" if sys.stderr.isatty() else "\n",
                  file=sys.stderr, flush=True)
    if not args.json:
        print(f"{len(test_set)} scored in {time.time() - t0:.1f}s ({args.shots} shots, {per_text} tokens per text)",
              file=sys.stderr)
    result = report(labels, [label for _, label in test_set], predicted)
    result.update(mode=f"{args.shots}-shot", trainable_params=0, train_seconds=0.0, seconds=time.time() - t0)
    print_result(result, args)


# --- the example task ------------------------------------------------------------------------------------------------

# pydoc_data.topics holds the Language Reference's sections (and a few Library Reference pages) that `help()`
# shows; each topic's label is the chapter it comes from.
CHAPTERS = {
    "lexical analysis": "identifiers id-classes strings floating imaginary integers numbers",
    "data model": "objects types customization attribute-access callable-types numeric-types sequence-types "
                  "specialnames context-managers",
    "execution model": "execmodel naming dynamic-features exceptions",
    "expressions": "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls comparisons "
                   "conversions dict exprlists in lambda lists operator-summary power shifting slicings subscriptions unary",
    "simple statements": "assert assignment augassign break continue del global import nonlocal pass raise return yield",
    "compound statements": "compound if else for while try with function class async",
    "library": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects specialattrs string-methods "
               "truth typesfunctions typesmapping typesmethods typesmodules typesseq typesseq-mutable formatstrings debugger",
}


def example_rows(min_chars=100, per_label=150, seed=0):
    """(paragraph, chapter) pairs from pydoc_data.topics: paragraphs of at least min_chars characters, each kept once
    (a paragraph that two chapters share is dropped), at most per_label per chapter, drawn with the seed."""
    import pydoc_data.topics
    chapter_of = {topic: chapter for chapter, topics in CHAPTERS.items() for topic in topics.split()}
    seen = {}
    for topic in sorted(pydoc_data.topics.topics):
        chapter = chapter_of.get(topic)
        if chapter is None:
            continue
        for paragraph in pydoc_data.topics.topics[topic].split("\n\n"):
            paragraph = paragraph.strip("\n")
            if len(paragraph.strip()) >= min_chars and not set(paragraph.strip()) <= set("*=-~^ "):
                seen.setdefault(paragraph, set()).add(chapter)
    by_chapter = {}
    for paragraph, chapters in seen.items():
        if len(chapters) == 1:
            by_chapter.setdefault(chapters.pop(), []).append(paragraph)
    rng = numpy.random.default_rng(seed)
    rows = []
    for chapter in CHAPTERS:
        paragraphs = by_chapter.get(chapter, [])
        keep = sorted(rng.choice(len(paragraphs), min(per_label, len(paragraphs)), replace=False))
        rows += [(paragraphs[i], chapter) for i in keep]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def make_example(args):
    if os.path.exists(args.out) and not args.force:
        raise TinyPalmError(f"--out {args.out} exists; choose another name or pass --force to overwrite it")
    rows = example_rows(args.min_chars, args.per_label, args.seed)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    write_atomically(args.out, lambda f: f.write(text.getvalue().encode("utf-8")), "examples file")
    counts = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    print(f"wrote {args.out}: {len(rows)} paragraphs of Python's bundled documentation labelled by chapter: "
          + ", ".join(f"{label} {n}" for label, n in counts.items()))


# --- command line ---------------------------------------------------------------------------------------------------

def build_parser():
    p = ArgumentParser(prog="python -m tinypalm.classify", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def data_flags(q):
        q.add_argument("--data", required=True, help="CSV (with a header) or JSONL of text,label")
        q.add_argument("--test-data", default=None, help="held-out examples in their own file (default: a split of --data)")
        q.add_argument("--text-field", default="text", help="the column (CSV) or field (JSONL) of the texts")
        q.add_argument("--label-field", default="label", help="the column or field of the labels")
        q.add_argument("--test-fraction", type=finite_float, default=0.2, help="held-out share of each label (default 0.2)")
        q.add_argument("--seed", type=int, default=0,
                       help="the split, and the shuffling and LoRA's initial A (train) or the demonstrations (fewshot)")
        q.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="CPU or NVIDIA GPU")
        q.add_argument("--json", action="store_true", help="print the evaluation as one JSON object")

    q = sub.add_parser("train", help="fine-tune a classifier from a pretrained checkpoint")
    data_flags(q)
    q.add_argument("--ckpt", required=True, help="the pretrained checkpoint (or its training --out directory)")
    q.add_argument("--out", required=True, help="the classifier file to write (.npz)")
    q.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    q.add_argument("--mode", default="head", choices=MODES, help="what trains besides the head (default head)")
    # the flags of one mode: None unless given, so that check_args can refuse them with another mode
    q.add_argument("--top-layers", type=int, default=None, help="with --mode top: how many of the top layers train "
                   "(default 1)")
    q.add_argument("--lora-rank", type=int, default=None, help=f"with --mode lora (default {LORA_RANK})")
    q.add_argument("--lora-alpha", type=finite_float, default=None, help="with --mode lora (default 2 x rank)")
    q.add_argument("--lora-targets", default=None, help=f"with --mode lora: among {','.join(TARGETS)} (default "
                   f"{','.join(DEFAULT_TARGETS)})")
    q.add_argument("--pool", default="mean", choices=["mean", "last"], help="how the head reads the hidden states")
    q.add_argument("--max-tokens", type=int, default=128, help="each text's first tokens that the model reads")
    q.add_argument("--lr", type=finite_float, default=2e-5, help="AdamW's learning rate at the start, decayed linearly to 0")
    q.add_argument("--batch-size", type=int, default=16, help="examples per step")
    q.add_argument("--epochs", type=int, default=3, help="passes over the training examples")
    add_adamw_flags(q, weight_decay=0.0, beta2=0.999, decayed="the layers' matrices and LoRA adapters that train "
                    "(never the head, norms or the embedding)")
    q.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="the arithmetic's precision")
    q.set_defaults(func=train)

    q = sub.add_parser("eval", help="accuracy, per-class precision/recall/F1 and the confusion matrix")
    q.add_argument("--model", required=True, help="a classifier file")
    q.add_argument("--data", default=None, help="evaluate all of this file (default: the held-out split it was trained with)")
    q.add_argument("--text-field", default=None, help="with --data: its column or field of the texts (default: the "
                                                      "one the classifier was trained with)")
    q.add_argument("--label-field", default=None, help="with --data: its column or field of the labels (default: "
                                                       "the one the classifier was trained with)")
    q.add_argument("--ckpt", default=None, help="its base checkpoint, if it has moved")
    q.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="CPU or NVIDIA GPU")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=evaluate)

    q = sub.add_parser("predict", help="one label per input line")
    q.add_argument("--model", required=True)
    q.add_argument("--input", required=True, help="UTF-8 text file, one input per line")
    q.add_argument("--output", default=None, help="write the labels here (default: standard output)")
    q.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    q.add_argument("--ckpt", default=None, help="its base checkpoint, if it has moved")
    q.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="CPU or NVIDIA GPU")
    q.set_defaults(func=predict)

    q = sub.add_parser("fewshot", help="classify by prompting with k demonstrations, no training")
    data_flags(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--adapter", default=None, help="LoRA adapter trained on --ckpt")
    q.add_argument("--shots", type=int, default=3, help="demonstrations per prompt, drawn from the training split")
    q.add_argument("--score", default="mean", choices=["mean", "sum", "pmi"],
                   help="a label's log-likelihood per token (default; fair to long labels), in total, or in total "
                        "less its log-likelihood after a bare 'Label:' (pmi: corrects the model's preference for some labels)")
    q.set_defaults(func=fewshot)

    q = sub.add_parser("make-example", help="write the example task: pydoc topics paragraphs labelled by chapter")
    q.add_argument("--out", required=True, help="the CSV file to write")
    q.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    q.add_argument("--min-chars", type=int, default=100, help="the shortest paragraph kept")
    q.add_argument("--per-label", type=int, default=150, help="paragraphs kept of each chapter at most")
    q.add_argument("--seed", type=int, default=0, help="which paragraphs are kept")
    q.set_defaults(func=make_example)
    return p


MODE_FLAGS = {"top": ["top_layers"], "lora": ["lora_rank", "lora_alpha", "lora_targets"]}
LORA_RANK = 8


def check_args(args):
    for mode, names in MODE_FLAGS.items():
        for name in names:
            if getattr(args, name, None) is not None and args.mode != mode:
                raise TinyPalmError(f"--{name.replace('_', '-')} applies to --mode {mode} only, and this run's mode is "
                                    f"{args.mode}; add --mode {mode} or drop the flag")
    check_ranges(args, at_least_1=["batch_size", "epochs", "max_tokens", "per_label"],
                 not_negative=["shots", "seed", "weight_decay", "grad_clip"], fraction=["beta1", "beta2"])
    if getattr(args, "lr", 1.0) <= 0:
        raise TinyPalmError(f"--lr must be positive, got {args.lr}")
    if args.command == "train":         # before training, which could take hours
        check_writable(args.out, "--out")
    if args.command == "predict" and args.output:
        check_writable(args.output, "--output")
    if args.command == "train" and os.path.exists(args.out) and not args.force:
        raise TinyPalmError(f"--out {args.out} exists; choose another name or pass --force to overwrite it")
    if args.command == "predict" and args.output and os.path.exists(args.output) and not args.force:
        raise TinyPalmError(f"--output {args.output} exists; choose another name or pass --force to overwrite it")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    numpy.seterr(over="ignore", invalid="ignore")
    args.func(args)


if __name__ == "__main__":
    from .cli import StdoutThatMayClose, run_cli
    if sys.argv[1:2] == ["train"]:                   # `classify train | head` trains on and saves after head's lines
        sys.stdout = StdoutThatMayClose(sys.stdout)  # (predict and the rest stop when their reader goes)
    run_cli(main)
