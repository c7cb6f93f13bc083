"""Checkpoints: one .npz file that `numpy.load(path, allow_pickle=False)` reads.

Keys:
    meta            JSON text: format, version, config, tokenizer, dtype, step, training arguments, best val loss,
                    evaluations without gain (for --patience)
    param.<name>    every parameter under its canonical name, in the master dtype (float32 for a bfloat16 run,
                    whose meta dtype says "bfloat16"); any checkpoint loads into a model of any dtype
    opt.<key>       the AdamW state ('opt.step', 'opt.m.<name>', 'opt.v.<name>'); absent in weights-only files
The batch order and dropout masks are functions of (seed, step) alone, so the seed in the training arguments
and the step are the whole random and data-position state: a resumed run continues exactly.

Files are written as files.py writes every file: to `<name>.tmp<PID>` beside it, flushed to disk, then renamed
over the old one, so a crash or Ctrl-C during a save never leaves a broken or missing checkpoint.
"""

import json
import os
import zipfile

import numpy

from .backend import to_numpy
from .config import Config
from .errors import TinyPalmError
from .files import write_atomically
from .model import param_shapes

FORMAT, VERSION = "tinypalm-checkpoint", 1


def save(path, model, tokenizer, step, optimizer=None, train_args=None, best_val_loss=None, evals_without_gain=0):
    if tokenizer.vocab_size > model.config.vocab_size:      # ids the model has no embedding for: refused on loading
        raise TinyPalmError(f"the tokenizer has {tokenizer.vocab_size} tokens and the model's vocabulary only "
                            f"{model.config.vocab_size}; build the model with vocab_size={tokenizer.vocab_size}")
    meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
            "dtype": str(model.dtype), "step": int(step), "train_args": train_args or {},
            "best_val_loss": best_val_loss, "evals_without_gain": int(evals_without_gain)}
    arrays = {"meta": numpy.array(json.dumps(meta))}
    arrays.update({f"param.{name}": p for name, p in model.params_numpy().items()})
    if optimizer is not None:
        arrays.update({f"opt.{key}": to_numpy(value) for key, value in optimizer.state_dict().items()})
    write_atomically(path, lambda f: numpy.savez(f, **arrays), "checkpoint", " or pass another --out")


def describe(path):
    """One phrase naming a checkpoint file's run, read from its meta entry alone: 'step 600, best val loss 1.2350'."""
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
        best = meta.get("best_val_loss")
        return f"step {meta['step']}" + (f", best val loss {best:.4f}" if best is not None else "")
    except Exception:                     # whatever it holds, it is the user's file: only its name is needed
        return "unreadable"


class Checkpoint:
    """A loaded checkpoint: meta fields, `config`, `params` (host arrays by canonical name), `opt_state`."""

    def __init__(self, path, meta, config, params, opt_state):
        self.path, self.meta, self.config, self.params, self.opt_state = path, meta, config, params, opt_state
        self.step = meta["step"]
        self.tokenizer_dict = meta["tokenizer"]
        self.train_args = meta.get("train_args", {})
        self.best_val_loss = meta.get("best_val_loss")
        self.evals_without_gain = meta.get("evals_without_gain", 0)    # for --patience across --resume


def resolve(path):
    """A checkpoint file, or a training output directory (its best.npz, else last.npz)."""
    if os.path.isdir(path):
        for name in ("best.npz", "last.npz"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        if any(os.path.isfile(os.path.join(path, f"adapter_{name}")) for name in ("best.npz", "last.npz")):
            raise TinyPalmError(f"{path}: holds a LoRA run's adapters, not a model; pass its base checkpoint with "
                                f"--ckpt and {path} with --adapter")
        raise TinyPalmError(f"{path}: directory holds no best.npz or last.npz; train first or pass a checkpoint file")
    if not os.path.exists(path):
        raise TinyPalmError(f"{path}: no such checkpoint; pass a .npz file written by train.py or its out/ directory")
    return path


def is_npz(path):
    """Whether a file starts as an .npz does (a zip archive); a truncated one still does, and fails to load."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return True                       # let the load say what is wrong with it


def load(path, optimizer=False):
    """A Checkpoint from a file or a training --out directory. optimizer=True also reads AdamW's state (twice the
    weights' size; only --resume needs it), else opt_state is None."""
    path = resolve(path)
    if not is_npz(path):
        raise TinyPalmError(f"{path}: not a tinypalm checkpoint (not an .npz file); pass a checkpoint written by "
                            "train.py, or its --out directory")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                raise TinyPalmError(f"{path}: not a tinypalm checkpoint (no 'meta' entry); pass a file written by train.py")
            meta = json.loads(str(npz["meta"]))
            if meta.get("format") == "tinypalm-adapter":          # lora.FORMAT: what train.py --lora-rank writes
                base = meta.get("train_args", {}).get("init_from") or "its run's --init-from"
                raise TinyPalmError(f"{path} holds LoRA adapters, not a model; pass the checkpoint they were trained "
                                    f"on ({base}) as the checkpoint, and {path} with --adapter")
            if meta.get("format") != FORMAT:
                raise TinyPalmError(f"{path}: not a tinypalm checkpoint; pass a file written by train.py")
            if meta.get("version") != VERSION:
                raise TinyPalmError(f"{path}: checkpoint format version {meta.get('version')} is not supported by this "
                                    f"tinypalm (it reads version {VERSION}); use the tinypalm release that wrote it")
            config = Config(**meta["config"])
            params = {}
            for name, shape in param_shapes(config).items():
                key = f"param.{name}"
                params[name] = npz.get(key)                  # read once: each npz[key] reads it from the archive again
                if params[name] is None or params[name].shape != shape:
                    raise TinyPalmError(f"{path}: parameter {name} is missing or does not match the checkpoint's own "
                                        "config; the file is damaged, use another checkpoint")
                if not numpy.isfinite(params[name]).all():
                    raise TinyPalmError(f"{path}: parameter {name} holds NaN or infinite values (the run diverged "
                                        "before this was saved); use an earlier checkpoint or train again with a lower --lr")
            opt_state = ({k[4:]: npz[k] for k in npz.files if k.startswith("opt.")} or None) if optimizer else None
    except TinyPalmError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise TinyPalmError(f"{path}: cannot read checkpoint, the file is truncated or corrupt ({type(e).__name__}); "
                            "use another checkpoint, e.g. best.npz or last.npz") from None
    return Checkpoint(path, meta, config, params, opt_state)
