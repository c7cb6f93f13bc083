"""Train a PaLM model on text.

    python train.py                                  # the `small` preset on Python's bundled docs, on the CPU
    python train.py --data my.txt --tokenizer bpe --vocab-size 2048 --max-steps 5000
    python train.py --data big.txt --prepare big.tok # tokenise once into a memory-mapped token file
    python train.py --resume                         # continue out/last.npz exactly where it stopped
    python train.py --init-from out/best.npz --data new.txt --out finetuned   # fine-tune
    python train.py --init-from out/best.npz --data new.txt --out lora --lora-rank 8   # LoRA adapters only
    mpiexec -n 4 python train.py --zero 1            # data parallel over 4 processes, optimizer state split

Writes to --out: last.npz (every evaluation, every --save-every-s seconds, and on Ctrl-C), best.npz (best
validation loss so far), metrics.jsonl (one JSON record per log line and evaluation) and loss.svg (the loss
curves). A new run refuses an --out that holds a trained run, unless --overwrite is given.
"""

import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)     # Ctrl-C while the modules below load: a quiet exit

import argparse
import math
import os
import sys
import time

import numpy as np

from tinypalm import Config, PaLM, TinyPalmError
from tinypalm import checkpoint, data, dist, instruct, lora
from tinypalm.backend import read_scalars
from tinypalm.cli import (SHAPE_FLAGS, ArgumentParser, StdoutThatMayClose, add_adamw_flags, add_shape_flags,
                          check_ranges, finite_float, format_duration, json_line, run_cli, shell_quote,
                          with_shape_flags)
from tinypalm.config import PRESETS
from tinypalm.evaluate import evaluate_batches, token_byte_lengths
from tinypalm.files import check_writable
from tinypalm.generate import stream
from tinypalm.model import layer_storage_names
from tinypalm.optim import AdamW, lr_at
from tinypalm.plot import read_metrics, write_loss_svg
from tinypalm.run import Progress, SaveSchedule, StopRequest, check_memory, prepare_out_dir, start_out_dir
from tinypalm.tokenizer import ByteTokenizer, BPETokenizer, tokenizer_from_dict

WEIGHT_SHAPE_FLAGS = tuple(SHAPE_FLAGS)[:6]      # the ones a checkpoint's weights fix


def build_parser():
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", help=f"model shape: one of {', '.join(PRESETS)}")
    add_shape_flags(g, SHAPE_FLAGS, "the preset's")
    g.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (NVIDIA GPU)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"],
                   help="floating-point type of the model (bfloat16: mixed precision, float32 master weights)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="text file, directory of text files, token file, or JSONL of prompt/response "
                                                "pairs for instruction tuning (default: Python's bundled docs)")
    g.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"],
                   help="byte (the 256 bytes and end-of-text, nothing to learn) or bpe (byte-level BPE learnt from the corpus)")
    g.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (with --tokenizer bpe)")
    g.add_argument("--bpe-train-bytes", type=int, default=32 << 20, help="train BPE on at most this many bytes of the corpus")
    g.add_argument("--prepare", default=None, metavar="TOKEN_FILE", help="tokenise --data into TOKEN_FILE and exit")
    g = p.add_argument_group("training")
    g.add_argument("--out", default="out", help="directory for last.npz, best.npz, metrics.jsonl and loss.svg")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one, replacing it (with --prepare: replace TOKEN_FILE)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per rank under mpiexec)")
    g.add_argument("--zero", type=int, default=0, choices=[0, 1],
                   help="under mpiexec, 1 splits the AdamW state over the ranks (ZeRO-1)")
    g.add_argument("--lr", type=finite_float, default=2e-3, help="peak learning rate, reached at the end of warmup")
    g.add_argument("--min-lr", type=finite_float, default=None,
                   help="learning rate at the end of the cosine decay; at most --lr (default: --lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=50,
                   help="steps of linear warmup: step s runs at --lr x (s + 1) / N")
    g.add_argument("--max-steps", type=int, default=600, help="optimizer steps in all (raise it to --resume a finished run)")
    g.add_argument("--decay-steps", type=int, default=None, help="the step at which the cosine decay reaches "
                   "--min-lr, counted from step 0, warmup included (default: --max-steps)")
    add_adamw_flags(g, weight_decay=0.1, beta2=0.95)
    g.add_argument("--dropout", type=finite_float, default=0.0,
                   help="dropout rate on each block's attention + MLP output, before the residual add")
    g.add_argument("--eval-every", type=int, default=100, help="evaluate and save last.npz (best.npz if better) every N steps")
    g.add_argument("--eval-steps", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-every", type=int, default=10, help="print progress every N steps")
    g.add_argument("--save-every-s", type=finite_float, default=300,
                   help="also save last.npz every this many seconds between evaluations (0: only at evaluations)")
    g.add_argument("--patience", type=int, default=0, help="stop after this many evaluations without improvement (0: never)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the batches and dropout")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.npz (a LoRA run: adapter_last.npz)")
    g.add_argument("--init-from", default=None, metavar="CKPT", help="fine-tune: load weights and tokenizer, fresh optimizer")
    g.add_argument("--freeze-layers", type=int, default=0, help="train only the top layers: the bottom N and the "
                   "embedding stay fixed (the embedding is also the output layer, tied)")
    lora.add_arguments(g)
    g.add_argument("--sample-tokens", type=int, default=200, help="length of the sample printed at the end (0: none)")
    return p


def explicit_flags(parser, argv):
    """The flags actually given on the command line (a resumed run keeps its saved values for the rest)."""
    saved = {a.dest: a.default for a in parser._actions}
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]


def check_args(args):
    check_ranges(args, at_least_1=["batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "eval_steps",
                                   "log_every", "bpe_train_bytes", "decay_steps"],
                 not_negative=["warmup_steps", "patience", "freeze_layers", "sample_tokens", "save_every_s", "grad_clip",
                               "weight_decay", "seed"],
                 fraction=["beta1", "beta2", "dropout"])
    if args.lr <= 0:
        raise TinyPalmError(f"--lr must be positive, got {args.lr}")
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise TinyPalmError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}: it is the floor the "
                            "learning rate decays to; lower it, or leave it out for --lr / 10")
    if args.decay_steps is not None and args.decay_steps < args.warmup_steps < args.max_steps:
        raise TinyPalmError(f"--decay-steps {args.decay_steps} ends the decay before --warmup-steps {args.warmup_steps} "
                            "ends the warmup (the rate would drop from --lr to --min-lr at once, at step "
                            f"{args.warmup_steps}); --decay-steps counts "
                            "from step 0, warmup included: raise it, or leave it out for --max-steps")
    if args.resume and args.overwrite:
        raise TinyPalmError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                            "overwrite replaces it with a new one")
    Config.preset(args.preset)            # an unknown preset is refused before any data is read


def check_tokenizer_flags(args, given, tokenizer_dict, source):
    """--tokenizer and --vocab-size cannot change a tokenizer that a checkpoint or a token file already fixes."""
    fixed = tokenizer_from_dict(tokenizer_dict)
    clash = ("tokenizer" in given and args.tokenizer != fixed.kind) or \
            ("vocab_size" in given and (fixed.kind != "bpe" or fixed.vocab_size > args.vocab_size))
    if clash:
        flags = " and ".join(f"--{f.replace('_', '-')}" for f in ("tokenizer", "vocab_size") if f in given)
        raise TinyPalmError(f"{source} comes with its own tokenizer ({fixed.kind}, {fixed.vocab_size} tokens), which "
                            f"{flags} cannot change; drop {flags}" +
                            (", or --prepare the text again with them" if source.startswith("--data") else ""))
    if "vocab_size" in given and args.vocab_size != fixed.vocab_size:    # BPE may learn fewer than it was asked
        print(f"note: --vocab-size {args.vocab_size} is not used: {source} comes with its own tokenizer ({fixed.kind}, "
              f"{fixed.vocab_size} tokens)")


def lr_floor(args):
    return args.min_lr if args.min_lr is not None else args.lr / 10


def schedule_notes(args, decay_steps, saved_max_steps, start_step):
    """Notes on learning-rate schedules that surprise: a warmup longer than the run, and a resumed run whose new
    --max-steps moves the end of its cosine decay (saved_max_steps: the run's before)."""
    if args.warmup_steps > args.max_steps:
        print(f"note: --warmup-steps {args.warmup_steps} is beyond --max-steps {args.max_steps}: the learning rate "
              f"climbs to {lr_at(args.max_steps - 1, args.lr, lr_floor(args), args.warmup_steps, decay_steps):.2e}, "
              f"never to --lr {args.lr:g}")
    if args.decay_steps is None and saved_max_steps not in (None, args.max_steps):   # the decay follows --max-steps
        before, after = (lr_at(start_step, args.lr, lr_floor(args), args.warmup_steps, total)
                         for total in (saved_max_steps, args.max_steps))
        if not math.isclose(before, after):
            print(f"note: the cosine decay now ends at --max-steps {args.max_steps}, not {saved_max_steps}: the "
                  f"learning rate at step {start_step} is {after:.2e} instead of {before:.2e}; pass --decay-steps "
                  f"{saved_max_steps} to keep the run's schedule")


def model_config(args, vocab_size, base=None):
    """The preset (or a checkpoint's config), with shape flags applied and room for --seq-len."""
    shape = with_shape_flags(base.to_dict() if base else Config.preset(args.preset).to_dict(), args,
                             derive=base is None)
    if base is None:
        shape["vocab_size"] = vocab_size
        if args.max_seq_len is None:
            shape["max_seq_len"] = max(shape["max_seq_len"], args.seq_len)
    cfg = Config(**shape)
    if args.seq_len > cfg.max_seq_len:
        raise TinyPalmError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                            "lower --seq-len or raise --max-seq-len")
    return cfg


def make_tokenizer(args, corpus, tokenizer_dict):
    """A saved tokenizer (resume, fine-tune) is reused, never retrained; else byte, or BPE trained on corpus."""
    if tokenizer_dict is not None:
        return tokenizer_from_dict(tokenizer_dict)
    if args.tokenizer == "byte":
        return ByteTokenizer()
    t0 = time.time()
    tokenizer = BPETokenizer.train(corpus[:args.bpe_train_bytes], args.vocab_size)
    short = ""
    if tokenizer.vocab_size < args.vocab_size:
        short = (f", not the {args.vocab_size} of --vocab-size: no other pair of tokens repeats in the text it "
                 "learned from")
    print(f"trained BPE: {tokenizer.vocab_size} tokens in {time.time() - t0:.1f}s{short}")
    return tokenizer


def prepare(args, tokenizer_dict):
    """--prepare: tokenise --data chunk by chunk into a token file (BPE learns from the corpus's head only)."""
    if not args.data:
        raise TinyPalmError("--prepare needs --data: the text file or directory to tokenise")
    if os.path.isdir(args.prepare):
        raise TinyPalmError(f"--prepare {args.prepare} is a directory; give the token file's name, e.g. "
                            f"{os.path.join(args.prepare, 'train.tok')}")
    if data.is_token_file(args.data):
        raise TinyPalmError(f"--data {args.data} is a token file already; train on it with --data {args.data}")
    if os.path.exists(args.prepare):
        if not os.path.isfile(args.prepare):
            raise TinyPalmError(f"--prepare {args.prepare} is not a plain file; give the token file a name of its own")
        if os.path.exists(args.data) and os.path.samefile(args.prepare, args.data):
            raise TinyPalmError(f"--prepare {args.prepare} is --data itself; give the token file a name of its own")
        if not args.overwrite:
            raise TinyPalmError(f"--prepare {args.prepare} exists; choose another name, or pass --overwrite to replace it")
    check_writable(args.prepare, "--prepare")            # before tokenising, which can take long
    head = data.read_corpus_head(args.data, args.bpe_train_bytes) if args.tokenizer == "bpe" else b""
    tokenizer = make_tokenizer(args, head, tokenizer_dict)
    n = data.prepare_token_file(args.data, args.prepare, tokenizer)
    print(f"wrote {n:,} tokens to {args.prepare}; train with --data {shell_quote(args.prepare)}")


def vocab_bound(args):
    """The vocabulary size before the corpus is read: exact for bytes and token files, an upper bound for BPE."""
    if args.data and data.is_token_file(args.data):
        return tokenizer_from_dict(data.open_token_file(args.data)[1]).vocab_size
    return ByteTokenizer().vocab_size if args.tokenizer == "byte" else args.vocab_size


def load_tokens(args, given, tokenizer_dict):
    """(token stream, tokenizer) from --data, or from the default corpus."""
    if args.data and data.is_token_file(args.data):
        tokens, file_tok = data.open_token_file(args.data)
        if tokenizer_dict is not None and file_tok != tokenizer_dict:
            raise TinyPalmError(f"--data {args.data}: this token file was made with another tokenizer than the "
                                "checkpoint's; prepare it again with the checkpoint's tokenizer (--init-from ... --prepare)")
        check_tokenizer_flags(args, given, file_tok, f"--data {args.data} (a token file)")
        tokenizer = tokenizer_from_dict(file_tok)
        print(f"data: {args.data}, a token file of {len(tokens):,} {tokenizer.kind} tokens (vocabulary {tokenizer.vocab_size})")
        return tokens, tokenizer
    if args.data:
        corpus, source = data.read_corpus(args.data), args.data
    else:
        corpus, source = data.default_corpus()
    tokenizer = make_tokenizer(args, corpus, tokenizer_dict)
    tokens = tokenizer.encode(corpus)
    print(f"data: {source}, {len(corpus):,} bytes -> {len(tokens):,} {tokenizer.kind} tokens")
    return tokens, tokenizer


def load_pairs(args, tokenizer_dict):
    """(instruction examples, tokenizer) from a JSONL file of prompt/response pairs."""
    pairs = instruct.read_pairs(args.data)
    tokenizer = make_tokenizer(args, instruct.corpus_bytes(pairs), tokenizer_dict)
    examples = instruct.PairsData(pairs, tokenizer, args.data)
    print(f"data: {args.data}, {len(pairs):,} prompt/response examples ({examples.n_train:,} train, "
          f"{examples.n_val:,} val), {sum(len(ids) for ids, _ in examples.examples):,} {tokenizer.kind} tokens")
    cut = examples.describe_cut(args.seq_len, "--seq-len")
    if cut:
        print(cut)
    return examples, tokenizer


def evaluate(model, batches, byte_lengths, args):
    """(cross-entropy per counted token without the z-loss, bits per byte) over the fixed validation batches."""
    return evaluate_batches(model, batches.val_batches(args.batch_size, args.seq_len, args.eval_steps), byte_lengths)


def frozen_params(args, model):
    """--freeze-layers N: the embedding and the bottom N layers' parameters, announced."""
    if not args.freeze_layers:
        return []
    n_layers = model.config.n_layers
    if args.freeze_layers > n_layers:
        raise TinyPalmError(f"--freeze-layers {args.freeze_layers}: the model has {n_layers} layers; freeze fewer")
    frozen = ["embed"] + [n for i in range(args.freeze_layers) for n in layer_storage_names(i)]
    spans = model.params.layout.spans
    n_frozen, n_all = sum(spans[n][1] - spans[n][0] for n in frozen), model.params.layout.size
    first, last = args.freeze_layers, n_layers - 1
    top = "" if first > last else f"layer {first} and " if first == last else f"layers {first}-{last} and "
    bottom = "layer 0" if args.freeze_layers == 1 else f"layers 0-{args.freeze_layers - 1}"
    print(f"frozen: the embedding and {bottom} ({n_frozen:,} parameters); "
          f"training {top}the final norm ({n_all - n_frozen:,} parameters)")
    return frozen


def resume_checkpoint(out):
    """What --resume continues: out/last.npz, or a LoRA run's out/adapter_last.npz on the base it trains."""
    path = os.path.join(out, "last.npz")
    if os.path.exists(path):
        return checkpoint.load(path, optimizer=True)
    if os.path.exists(os.path.join(out, "adapter_last.npz")):
        return lora.resume_checkpoint(out)
    raise TinyPalmError(f"--resume: {path} does not exist; train without --resume first, or pass the --out of that run")


def parse_run(argv):
    """(args, flags given on the command line, checkpoint or None), checked before any data is read.

    A resumed run takes its saved training arguments, except the flags given again on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    ckpt = None
    if args.resume and "init_from" in given:
        raise TinyPalmError("--resume and --init-from exclude each other: resume continues a run, init-from starts a new one")
    lora_given = sorted(f"--{n.replace('_', '-')}" for n in given & set(lora.FLAGS))
    if args.resume and lora_given:
        raise TinyPalmError(f"--resume continues a run as it was started: drop {', '.join(lora_given)} (new LoRA "
                            "adapters are a new run: --init-from CKPT --lora-rank R --out NEW)")
    if args.resume:
        ckpt = resume_checkpoint(args.out)
        saved = dict(ckpt.train_args)
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in given},
                                     "resume": True})
    elif args.init_from:
        ckpt = checkpoint.load(args.init_from)
    changed = [f"--{n.replace('_', '-')}" for n in WEIGHT_SHAPE_FLAGS if n in given]
    if ckpt is not None and changed:
        raise TinyPalmError(f"{'--resume' if args.resume else '--init-from'}: the model's shape comes from the "
                            f"checkpoint; drop {', '.join(changed)}")
    if args.resume and "min_lr" not in given and args.min_lr is not None and args.min_lr > args.lr:
        raise TinyPalmError(f"--lr {args.lr} is below the --min-lr {args.min_lr} this run was started with; "
                            "pass a --min-lr at most --lr as well")
    check_args(args)
    lora.check_flags(args, given)
    if args.resume and ckpt.step >= args.max_steps:
        raise TinyPalmError(f"--resume: {ckpt.path} is already at step {ckpt.step} of --max-steps {args.max_steps}, "
                            f"nothing is left to train; raise --max-steps (e.g. --max-steps {2 * ckpt.step}) to go on")
    if args.resume and args.patience and ckpt.evals_without_gain >= args.patience:
        raise TinyPalmError(f"--resume: {ckpt.path} stopped early at step {ckpt.step}, with no improvement in its last "
                            f"{ckpt.evals_without_gain} evaluations (--patience {args.patience}); raise --patience, or "
                            "pass --patience 0 to train to --max-steps")
    if ckpt is not None:
        check_tokenizer_flags(args, given, ckpt.tokenizer_dict, ckpt.path)
    elif "vocab_size" in given and args.tokenizer != "bpe":
        raise TinyPalmError(f"--vocab-size {args.vocab_size} is the size of a BPE vocabulary: add --tokenizer bpe, "
                            "or drop --vocab-size for the byte tokenizer")
    return args, given, ckpt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    comm = dist.init(argv)          # alone, or one rank of an mpiexec run: rank 0 alone prints and writes files
    args, given, ckpt = parse_run(argv)
    np.seterr(over="ignore", invalid="ignore")      # a diverging run is caught below, by its loss and gradient norm

    is_pairs = bool(args.data) and instruct.is_pairs_file(args.data)
    if args.prepare and is_pairs:
        raise TinyPalmError(f"--prepare tokenises text; {args.data} holds prompt/response pairs: train on it directly")
    if args.prepare:
        if comm.size > 1:
            raise TinyPalmError("--prepare writes one token file: run it as one process, then train under mpiexec "
                                "with --data TOKEN_FILE")
        return prepare(args, ckpt.tokenizer_dict if ckpt else None)
    replaced = prepare_out_dir(args.out, args.resume, args.overwrite, args.init_from) if comm.is_root else []
    base = ckpt.config if ckpt else None
    cfg = model_config(args, vocab_bound(args), base)          # shape errors and memory, before reading the corpus
    check_memory(cfg, args.backend, args.batch_size, args.seq_len, args.dtype,
                 f"this model (--preset {args.preset})" if ckpt is None else f"the model of {ckpt.path}",
                 base_trains=args.lora_rank is None, ranks_here=comm.local_size)
    if is_pairs:                # instruction tuning: one example per row, the loss on the responses
        batches, tokenizer = load_pairs(args, ckpt.tokenizer_dict if ckpt else None)
        byte_lengths = token_byte_lengths(tokenizer)
    else:
        tokens, tokenizer = load_tokens(args, given, ckpt.tokenizer_dict if ckpt else None)
        byte_lengths = token_byte_lengths(tokenizer)
        train_tokens, val_tokens = data.split_train_val(tokens, byte_lengths=byte_lengths)   # the same text for
        data.check_length(len(train_tokens), len(val_tokens), args.seq_len)                 # every tokenizer
        batches = data.StreamBatches(train_tokens, val_tokens)
    comm.check_same("the data (a training and a validation batch, the tokenizer, the checkpoint step)",
                    dist.fingerprint(tokenizer.to_dict(), ckpt.step if ckpt else 0,
                                     *batches.train_batch(args.batch_size, args.seq_len, args.seed, 0)[:2],
                                     *next(iter(batches.val_batches(args.batch_size, args.seq_len, 1)))[:2]))

    cfg = model_config(args, tokenizer.vocab_size, base)
    comm.use_device(args.backend)
    model = PaLM(cfg, backend=args.backend, dtype=args.dtype, seed=args.seed, params=ckpt.params if ckpt else None,
                 trains=args.lora_rank is None)            # LoRA: the base never changes, bf16 needs no master of it
    frozen = frozen_params(args, model)
    model.frozen = frozenset(frozen)                   # the backward skips their gradients
    trained, trained_grads = model.params, (lambda grads: grads)       # what the optimizer updates
    if args.lora_rank is not None:      # LoRA: the base frozen, AdamW over the adapters' flat vector alone
        adapter, base_hash = lora.start_training(args, model, ckpt)
        model.frozen = frozenset(model.params.stored)   # the whole base: only the adapters' gradients are made
        trained, trained_grads, frozen = adapter.params, (lambda grads: grads.adapter), ()
    comm.attach(model, trained, zero=args.zero, micro_batches=args.grad_accum)
    optimizer = AdamW(trained, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, frozen=frozen,
                      shard=comm.shard)
    start_step, best_val, evals_without_gain = 0, math.inf, 0
    if args.resume:
        if ckpt.opt_state is None:
            raise TinyPalmError(f"--resume: {ckpt.path} holds weights only (no optimizer state); use --init-from instead")
        comm.load_optimizer(optimizer, ckpt.opt_state, model.xp)
        start_step, best_val = ckpt.step, ckpt.best_val_loss if ckpt.best_val_loss is not None else math.inf
        evals_without_gain = ckpt.evals_without_gain      # --patience counts on from where the run stopped
    if comm.is_root:
        start_out_dir(args.out, replaced, args.resume)      # only now, with the new run ready to start
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    last_path = os.path.join(args.out, "adapter_last.npz" if args.lora_rank is not None else "last.npz")
    train_args = {k: v for k, v in vars(args).items() if k not in ("resume", "init_from", "prepare", "overwrite")}
    train_args["ranks"] = comm.size
    saver = SaveSchedule(args.save_every_s)

    def save(name, step):
        t0 = time.time()
        whole = comm.whole_optimizer(optimizer)     # ZeRO-1: the ranks' shards, gathered on rank 0
        if comm.is_root and args.lora_rank is not None:
            lora.save_adapter(os.path.join(args.out, f"adapter_{name}"), model.adapter, base_hash, step,
                              {**train_args, "init_from": args.init_from}, whole if name == "last.npz" else None,
                              None if math.isinf(best_val) else best_val, evals_without_gain)
        elif comm.is_root:
            checkpoint.save(os.path.join(args.out, name), model, tokenizer, step, whole, train_args,
                            None if math.isinf(best_val) else best_val, evals_without_gain)
        if name == "last.npz":
            saver.saved(time.time() - t0)

    def log(record):
        if comm.is_root:
            with open(metrics_path, "a") as f:
                f.write(json_line(record) + "\n")

    decay_steps = args.decay_steps or args.max_steps
    schedule_notes(args, decay_steps, ckpt.train_args.get("max_steps") if args.resume else None, start_step)
    micro_batches = args.grad_accum * comm.size      # per step, over all ranks
    tokens_per_step = args.batch_size * args.seq_len * micro_batches
    saved_micro_batches = ckpt.train_args.get("ranks", 1) * ckpt.train_args.get("grad_accum", 1) if args.resume else None
    if saved_micro_batches not in (None, micro_batches):
        print(f"note: {micro_batches} micro-batches per step ({comm.size} rank(s) x --grad-accum {args.grad_accum}) where "
              f"the saved run had {saved_micro_batches}: the global batch changes; match it with --grad-accum")
    if ckpt is not None and "preset" in given:
        print(f"note: --preset {args.preset} is not used: the model's shape comes from {ckpt.path}")
    if args.resume and "data" in given and args.data != ckpt.train_args.get("data"):
        print(f"note: --data {args.data} is not the data this run trained on "
              f"({ckpt.train_args.get('data') or 'the default corpus'}); from here its validation losses are measured on "
              "the new data")
    print(f"model: {cfg.n_params() / 1e6:.2f}M parameters, d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads ({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}, vocab {cfg.vocab_size}; "
          f"{args.backend} {args.dtype}; {'up to ' if is_pairs else ''}{tokens_per_step:,} tokens per step"
          + (" (a batch is as long as its longest example)" if is_pairs else "")
          + (f" over {comm.size} ranks" + (", optimizer state split (ZeRO-1)" if comm.shard else "")
             if comm.size > 1 else "")
          + (f"; resuming at step {start_step}" if args.resume else ""))
    stop = StopRequest()
    progress = Progress()
    t_start = t_log = time.perf_counter()        # perf_counter: time.time() ticks every 15.6 ms on some Windows
    step, running, save_due = start_step, [], False
    picture = os.path.join(args.out, "loss.svg")        # None once it could not be written: said once, not again
    positions = 0                  # run through the model since the last log line: batches of pairs are shorter

    def diverged_advice():
        kept = f"the last good checkpoint is {last_path}" if os.path.exists(last_path) else "no checkpoint was written yet"
        return f"{kept}; lower --lr, raise --warmup-steps or set --grad-clip"

    while step < args.max_steps:
        lr = lr_at(step, args.lr, lr_floor(args), args.warmup_steps, decay_steps)
        loss, grads = 0.0, None
        first = (step * comm.size + comm.rank) * args.grad_accum      # this rank's share of the step's micro-batches
        for micro in range(first, first + args.grad_accum):           # their gradients add up in one buffer
            x, y, mask = batches.train_batch(args.batch_size, args.seq_len, args.seed, micro)
            positions += x.size
            dropout_seed = (args.seed * 1_000_003 + micro) & 0x7FFFFFFF
            micro_loss, grads = model.loss_and_grads(x, y, args.dropout, dropout_seed, grads=grads, loss_mask=mask)
            loss += micro_loss / micro_batches         # on the device: nothing is read back yet
        comm.average_gradients(trained_grads(grads), micro_batches)   # summed over the ranks, then the mean
        grad_norm = comm.clip_grad_norm(trained_grads(grads), args.grad_clip)
        loss, grad_norm = read_scalars(model.xp, loss, grad_norm)     # the step's one device-to-host read
        loss = comm.sum(loss)                         # over the ranks (alone: as it is)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TinyPalmError(f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopped "
                                f"without updating, {diverged_advice()}")
        if save_due:               # a timed save, made only now that these weights have given a finite loss
            t_pause = time.perf_counter()
            save("last.npz", step)
            t_log, save_due = t_log + time.perf_counter() - t_pause, False
        comm.update(optimizer, trained, trained_grads(grads), lr)   # ZeRO-1: each rank its shard, then gathered
        model.params_updated()                            # bf16: refresh the compute copy of the weights
        step += 1
        stopping = comm.any(stop.requested)          # Ctrl-C reaches the ranks at different steps
        running.append(loss)

        if step % args.log_every == 0 or step == args.max_steps:
            now = time.perf_counter()
            progress.add(len(running), now - t_log)
            ran = int(comm.sum(positions))                   # tokens since the last log line, over all ranks
            rate = ran / max(now - t_log, 1e-9)
            print(f"step {step}/{args.max_steps} | loss {np.mean(running):.4f} | lr {lr:.2e} | {rate:,.0f} tok/s | "
                  f"{format_duration(now - t_start)} elapsed, {format_duration(progress.left(args.max_steps - step))} left",
                  flush=True)
            log({"split": "train", "step": step, "loss": float(np.mean(running)), "lr": lr, "grad_norm": grad_norm,
                 "tokens": ran, "tokens_per_s": rate, "elapsed_s": now - t_start})
            running, t_log, positions = [], now, 0

        t_pause = time.perf_counter()
        scheduled = step % args.eval_every == 0 or step == args.max_steps
        if scheduled or stopping:
            val, val_bpb = comm.from_root(evaluate(model, batches, byte_lengths, args))   # one verdict for all ranks
            if not math.isfinite(val):
                raise TinyPalmError(f"training diverged at step {step}: validation loss {val} after the update; not "
                                    f"saved, {diverged_advice()}")
            # an evaluation only because of Ctrl-C decides nothing (best.npz, --patience): the run then goes on,
            # resumed, exactly as if it had never stopped
            improved = scheduled and val < best_val
            if scheduled:
                best_val = min(best_val, val)
                evals_without_gain = 0 if improved else evals_without_gain + 1
            bpb = f"{val_bpb:.3f} bits/byte" if math.isfinite(val_bpb) else "no bytes to count bits/byte"
            best = " (best)" if improved else f" (best {best_val:.4f})" if math.isfinite(best_val) else ""
            print(f"step {step}: val loss {val:.4f}, {bpb}{best}"
                  + ("" if scheduled else "; on stopping, off the --eval-every steps that best.npz and --patience "
                                          "go by"), flush=True)
            log({"split": "val", "step": step, "loss": val, "bits_per_byte": val_bpb})
            if improved:               # best.npz first: a kill between the two saves leaves last.npz to redo it
                save("best.npz", step)
            save("last.npz", step)
            if comm.is_root and picture:
                try:
                    write_loss_svg(picture, *read_metrics(metrics_path), title=f"tinypalm {cfg.n_params() / 1e6:.1f}M")
                except TinyPalmError as e:     # the picture is a convenience: training goes on without it
                    print(f"note: {e}; training goes on without it", file=sys.stderr)
                    picture = None
            if scheduled and args.patience and evals_without_gain >= args.patience:
                print(f"early stop: no improvement in {args.patience} evaluations")
                break
        elif comm.any(saver.due()):             # the ranks' clocks differ: saving is collective under ZeRO-1
            save_due = True
        t_log += time.perf_counter() - t_pause          # evaluating and saving are not training throughput
        if stopping:
            print(f"stopped: saved {last_path} at step {step}; continue with --resume --out {shell_quote(args.out)}")
            raise SystemExit(130)               # interrupted, so `train.py && sample.py` does not go on

    stop.release()                              # all saved: from here a Ctrl-C stops at once, with status 130
    if stop.requested:
        raise SystemExit(130)
    best_name = "adapter_best.npz" if args.lora_rank is not None else "best.npz"
    print(f"done: {step} steps in {format_duration(time.perf_counter() - t_start)}; best val loss {best_val:.4f} in "
          f"{os.path.join(args.out, best_name)}; " + (f"loss curves in {picture}, " if picture else "")
          + f"the log in {metrics_path}")
    if args.lora_rank is not None:
        print(f"sample from it: python sample.py --ckpt {shell_quote(args.init_from)} --adapter {shell_quote(args.out)}")
    else:
        print(f"sample from it: python sample.py --ckpt {shell_quote(args.out)}")
    if args.sample_tokens:
        print("--- sample ---", flush=True)
        stream(model, tokenizer, [int(i) for i in tokenizer.encode("\n")], args.sample_tokens, out=sys.stdout,
               temperature=0.8, top_k=50, seed=args.seed)


if __name__ == "__main__":
    sys.stdout = StdoutThatMayClose(sys.stdout)      # `python train.py | head` trains on after head has its lines
    run_cli(dist.ends_together(main))
