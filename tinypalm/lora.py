"""LoRA: low-rank adapters on a frozen pretrained model (Hu et al., 2021), and the adapter file.

A projection y = x W gains a trainable low-rank path: y = x W + (alpha / r) x A B, with A (in, r) and B (r, out).
A starts N(0, 1/in) (the paper's random Gaussian A, scaled like the model's own matrices) and B starts at zero,
so at step 0 the adapted model is exactly the base model; only A and B are trained, so the optimizer keeps
moments for them alone. Vectors are rows here (x W), so this A is the paper's A transposed: the random one, and
B the zero one. The paper sets alpha to the first r it tries and keeps it, so alpha / r shrinks as r grows; here
alpha defaults to 2r, so the scale is 2 at every rank unless --lora-alpha sets alpha.

tinypalm stores the seven projections fused (model.py): wq, wk, wv, w_gate, w_up are column slices of w_in,
applied to the LayerNorm output h; wo and w_down are row slices of w_out, applied to the attention output and the
SwiGLU output. An adapter on wk adds (alpha / r) h A B to the wk columns of h @ w_in; one on w_down reads the
SwiGLU columns of [attention | SwiGLU] and adds to the block's output.

The adapter file is a .npz (numpy.load(path, allow_pickle=False) reads it):
    meta            JSON: format, version, rank, alpha, targets, the base's config and content hash, step, the
                    run's arguments (its --init-from among them) and best validation loss
    lora.<name>     the matrices, e.g. lora.layers.0.wq.A (D, r), lora.layers.0.wq.B (r, H*Dh)
    opt.<key>       in a run's adapter_last.npz only: AdamW's step and moments, for train.py --resume
The base is named by the sha256 of its parameters, so an adapter is never applied to a model it was not
trained on. `python -m tinypalm.lora merge` folds the adapters into the base: W + (alpha / r) A B.
"""

import hashlib
import json
import math
import os
import zipfile

import numpy

from .backend import check_dtype, compute_dtype, to_numpy
from .checkpoint import is_npz, resolve
from .cli import ArgumentParser, finite_float
from .errors import TinyPalmError
from .files import write_atomically
from .flat import Layout

TARGETS = ("wq", "wk", "wv", "w_gate", "w_up", "wo", "w_down")
DEFAULT_TARGETS = ("wq", "wv")           # the paper's choice
FORMAT, VERSION = "tinypalm-adapter", 1


# --- the op pair ----------------------------------------------------------------------------------------------

def lora_forward(x, A, B, scale):
    # x (N, in), A (in, r), B (r, out) -> delta (N, out) = scale * (x @ A) @ B, added to x @ W by the caller
    xa = x @ A                                                   # (N, r)
    xa *= scale
    return xa @ B, (x, xa)


def lora_backward(d_delta, A, B, dA, dB, scale, cache):
    # dA (in, r), dB (r, out) accumulate; returns dx (N, in), the adapter's share of the input gradient
    x, xa = cache                                                # xa = scale * x @ A
    dB += xa.T @ d_delta
    d_xa = d_delta @ B.T                                         # (N, r), gradient at scale * x @ A ...
    d_xa *= scale                                                # ... and now at x @ A
    dA += x.T @ d_xa
    return d_xa @ A.T


# --- where each projection sits in the fused matrices -----------------------------------------------------------

def projection_slices(cfg):
    """name -> (side, slice): "in" projections are column slices of h @ w_in, "out" ones row slices of w_out."""
    q, k, F = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    return {"wq": ("in", slice(0, q)), "wk": ("in", slice(q, q + k)), "wv": ("in", slice(q + k, q + 2 * k)),
            "w_gate": ("in", slice(q + 2 * k, q + 2 * k + F)), "w_up": ("in", slice(q + 2 * k + F, q + 2 * k + 2 * F)),
            "wo": ("out", slice(0, q)), "w_down": ("out", slice(q, q + F))}


def parse_targets(text):
    """'wq,wv' -> ('wq', 'wv'), in the canonical order; unknown names are a user error."""
    names = [t.strip() for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise TinyPalmError(f"--lora-targets {text!r}: {'unknown projection ' + ', '.join(unknown) if unknown else 'empty'}; "
                            f"choose among {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def check_rank(cfg, rank, targets):
    """A rank from 1 to the narrowest side of the smallest adapted projection (beyond it, A B is not low rank)."""
    slices = projection_slices(cfg)
    limit = min(min(cfg.d_model, s.stop - s.start) for t in targets for _, s in [slices[t]])
    if not 1 <= rank <= limit:
        raise TinyPalmError(f"--lora-rank {rank}: must be from 1 to {limit} (the narrowest side of the adapted "
                            f"projections {','.join(targets)}); pick a rank in that range, e.g. 8")


class LoRA:
    """Adapters for every layer's chosen projections: `params` and gradients are Flats (flat.py).

    Names: layers.{i}.{target}.A (in, r) and .B (r, out). The model calls in_forward / out_forward where its
    fused projections run and in_backward / out_backward in its backward (model.py)."""

    def __init__(self, cfg, rank, alpha=None, targets=DEFAULT_TARGETS, xp=numpy, dtype="float32", seed=0):
        self.config, self.xp = cfg, xp
        self.targets = parse_targets(targets)
        check_rank(cfg, rank, self.targets)
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else 2 * rank)
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise TinyPalmError(f"--lora-alpha {alpha}: must be positive (the adapters' product is scaled by "
                                f"alpha / rank); leave it out for 2 x rank = {2 * self.rank}")
        self.scale = self.alpha / self.rank
        self.slices = projection_slices(cfg)
        shapes = {}
        for i in range(cfg.n_layers):
            for t in self.targets:
                side, s = self.slices[t]
                n_in, n_out = (cfg.d_model, s.stop - s.start) if side == "in" else (s.stop - s.start, cfg.d_model)
                shapes[f"layers.{i}.{t}.A"], shapes[f"layers.{i}.{t}.B"] = (n_in, self.rank), (self.rank, n_out)
        self.layout = Layout(shapes)
        # as the model's weights (model.py): the matrices in float32 for a bf16 model (AdamW updates them, and
        # the files hold them), with a bf16 copy that the products use, refreshed by params_updated()
        self.params = self.layout.zeros(xp, compute_dtype(numpy.dtype(dtype)))
        rng = numpy.random.default_rng(seed)
        for name, shape in shapes.items():
            if name.endswith(".A"):
                self.params[name][...] = xp.asarray(rng.standard_normal(shape) / math.sqrt(shape[0]))
        same = self.params.flat.dtype == numpy.dtype(dtype)
        self.weights = self.params if same else self.layout.zeros(xp, numpy.dtype(dtype))
        self.params_updated()

    def params_updated(self):
        """Call after changing params in place (model.params_updated calls it): refreshes the bf16 copy."""
        if self.weights is not self.params:
            self.weights.flat[...] = self.params.flat

    @property
    def n_params(self):
        return self.layout.size

    def grads_like(self):
        return self.layout.zeros(self.xp, self.params.flat.dtype)

    def _pairs(self, i, side, matrices=None):
        # (target, its slice, A, B) of layer i's adapters on one side, from the compute copy unless told
        matrices = self.weights if matrices is None else matrices
        return [(t, self.slices[t][1], matrices[f"layers.{i}.{t}.A"], matrices[f"layers.{i}.{t}.B"])
                for t in self.targets if self.slices[t][0] == side]

    # h (N, D) -> proj (N, Q+2K+2F) += each "in" adapter's delta in its columns
    def in_forward(self, i, h, proj):
        caches = []
        for t, cols, A, B in self._pairs(i, "in"):
            delta, cache = lora_forward(h, A, B, self.scale)
            proj[:, cols] += delta
            caches.append(cache)
        return (i, caches)

    # branches (N, Q+F) = [attention | SwiGLU] -> y (N, D) += each "out" adapter's delta, read from its rows' input
    def out_forward(self, i, branches, y):
        caches = []
        for t, rows, A, B in self._pairs(i, "out"):
            delta, cache = lora_forward(branches[:, rows], A, B, self.scale)
            y += delta
            caches.append(cache)
        return (i, caches)

    def in_backward(self, d_proj, dh, cache, d_adapter):
        # dh (N, D) += the adapters' input gradients; d_adapter (a Flat like params) accumulates dA, dB
        i, caches = cache
        for (t, cols, A, B), c in zip(self._pairs(i, "in"), caches):
            dh += lora_backward(d_proj[:, cols], A, B, d_adapter[f"layers.{i}.{t}.A"], d_adapter[f"layers.{i}.{t}.B"],
                                self.scale, c)

    def out_backward(self, dy, d_branches, cache, d_adapter):
        i, caches = cache
        for (t, rows, A, B), c in zip(self._pairs(i, "out"), caches):
            d_branches[:, rows] += lora_backward(dy, A, B, d_adapter[f"layers.{i}.{t}.A"],
                                                 d_adapter[f"layers.{i}.{t}.B"], self.scale, c)

    def merge_into(self, model):
        """Fold the adapters into the model's parameters: W += (alpha / r) A B, in place."""
        stored = model.params.stored
        for i in range(self.config.n_layers):
            w_in, w_out = stored[f"layers.{i}.w_in"], stored[f"layers.{i}.w_out"]
            for side in ("in", "out"):
                for t, sl, A, B in self._pairs(i, side, self.params):
                    delta = self.xp.asarray((A @ B) * self.scale, dtype=w_in.dtype)
                    if side == "in":
                        w_in[:, sl] += delta
                    else:
                        w_out[sl] += delta
        model.params_updated()

    def describe(self, model):
        """Trainable parameters and AdamW state (two moments) against full fine-tuning of the same model."""
        itemsize = self.params.flat.dtype.itemsize
        full = model.params.flat.size
        return (f"LoRA rank {self.rank}, alpha {self.alpha:g} on {','.join(self.targets)}: {self.n_params:,} trainable "
                f"parameters ({100 * self.n_params / full:.2f}% of {full:,}); AdamW state {format_bytes(2 * itemsize * self.n_params)} "
                f"against {format_bytes(2 * model.master_dtype.itemsize * full)} for full fine-tuning")


def format_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# --- the base's identity and the adapter file -------------------------------------------------------------------

def params_hash(params):
    """sha256 over the canonical names, shapes and float32 values of a model's parameters (host or device arrays).

    float32 so that a checkpoint and the same weights loaded in float64 are the same base. A bfloat16 model that
    keeps no master (trains=False) holds its weights rounded to bf16, which hash differently: hash the
    checkpoint's arrays (load_model's ckpt.params), as train.py does."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = numpy.ascontiguousarray(to_numpy(params[name]), dtype="<f4")
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_adapter(path, adapter, base_hash, step=0, train_args=None, optimizer=None, best_val_loss=None,
                 evals_without_gain=0):
    """Write atomically (temporary file, then rename), like checkpoints; with the optimizer's state (opt.<key>,
    as in a checkpoint) when given, so that train.py --resume continues the run."""
    meta = {"format": FORMAT, "version": VERSION, "rank": adapter.rank, "alpha": adapter.alpha,
            "targets": list(adapter.targets), "config": adapter.config.to_dict(), "base_sha256": base_hash,
            "step": int(step), "train_args": train_args or {}, "best_val_loss": best_val_loss,
            "evals_without_gain": int(evals_without_gain)}
    arrays = {"meta": numpy.array(json.dumps(meta))}
    arrays.update({f"lora.{name}": to_numpy(p) for name, p in adapter.params.items()})
    if optimizer is not None:
        arrays.update({f"opt.{key}": to_numpy(value) for key, value in optimizer.state_dict().items()})
    write_atomically(path, lambda f: numpy.savez(f, **arrays), "adapter", " or pass another --out")


def resolve_adapter(path):
    """An adapter file, or a LoRA run's --out directory (its adapter_best.npz, else adapter_last.npz)."""
    if os.path.isdir(path):
        for name in ("adapter_best.npz", "adapter_last.npz"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise TinyPalmError(f"--adapter {path}: directory holds no adapter_best.npz or adapter_last.npz; "
                            "pass the --out of a LoRA run or an adapter file")
    if not os.path.isfile(path):
        raise TinyPalmError(f"--adapter {path}: no such file; pass an adapter written by train.py --lora-rank")
    return path


def read_adapter(path, flag="--adapter"):
    """An adapter file's (meta, {name: array} of its matrices, optimizer state or None), its format checked;
    flag names the option that gave the file in the error lines."""
    if not is_npz(path):
        raise TinyPalmError(f"{flag} {path}: not a tinypalm adapter (not an .npz file); pass a file written by "
                            "train.py --lora-rank, or its --out directory")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
            if meta.get("format") != FORMAT:
                raise TinyPalmError(f"{flag} {path}: not a tinypalm adapter; pass a file written by train.py --lora-rank")
            if meta.get("version") != VERSION:
                raise TinyPalmError(f"{flag} {path}: adapter format version {meta.get('version')} is not supported "
                                    f"(this tinypalm reads version {VERSION})")
            matrices = {k[len("lora."):]: _saved_bf16(npz[k]) for k in npz.files if k.startswith("lora.")}
            opt_state = {k[len("opt."):]: _saved_bf16(npz[k]) for k in npz.files if k.startswith("opt.")} or None
    except TinyPalmError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise TinyPalmError(f"{flag} {path}: cannot read the adapter, the file is truncated or corrupt "
                            f"({type(e).__name__}); use another one") from None
    return meta, matrices, opt_state


def _saved_bf16(array):
    """Adapter files written by bfloat16 runs of earlier versions hold raw 2-byte bf16 values (numpy saves
    ml_dtypes' bfloat16 as void): read them back as float32. Any other array is returned as it is."""
    if array.dtype.kind != "V" or array.dtype.itemsize != 2:
        return array
    return array.view(check_dtype("bfloat16")).astype(numpy.float32)


def adapter_from(meta, matrices, path, cfg, xp=numpy, dtype="float32", flag="--adapter"):
    """The LoRA an adapter file describes (read_adapter's meta and matrices) on a base of config cfg, its
    matrices checked for shape."""
    adapter = LoRA(cfg, meta["rank"], meta["alpha"], meta["targets"], xp=xp, dtype=dtype)
    for name, p in adapter.params.items():
        if name not in matrices or matrices[name].shape != p.shape:
            raise TinyPalmError(f"{flag} {path}: entry {name} is missing or misshapen; the file is damaged")
        p[...] = xp.asarray(matrices[name])
    adapter.params_updated()
    adapter.meta, adapter.path = meta, path
    return adapter


def load_adapter(path, base_params, cfg, xp=numpy, dtype="float32"):
    """A LoRA from an adapter file, checked against the base's parameters (by content hash) and config."""
    path = resolve_adapter(path)
    meta, matrices, _ = read_adapter(path)
    if meta["config"] != cfg.to_dict() or meta["base_sha256"] != params_hash(base_params):
        raise TinyPalmError(f"--adapter {path} was trained on another base model (sha256 "
                            f"{meta['base_sha256'][:12]}...); pass the checkpoint it was trained from with --ckpt")
    return adapter_from(meta, matrices, path, cfg, xp, dtype)


# --- training hook (train.py --lora-rank) ------------------------------------------------------------------------

FLAGS = ("lora_rank", "lora_alpha", "lora_targets")


def add_arguments(group):
    group.add_argument("--lora-rank", type=int, default=None, metavar="R",
                       help="with --init-from: train LoRA adapters of rank R, the base frozen")
    group.add_argument("--lora-alpha", type=finite_float, default=None, help="LoRA scale numerator: delta = (alpha/R) x A B (default 2R)")
    group.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                       help=f"projections to adapt, among {','.join(TARGETS)} (default {','.join(DEFAULT_TARGETS)})")


def check_flags(args, given):
    """LoRA's other flags mean nothing without --lora-rank: say so rather than train the whole model."""
    stray = [f"--{n.replace('_', '-')}" for n in ("lora_alpha", "lora_targets") if n in given]
    if args.lora_rank is None and stray:
        raise TinyPalmError(f"{', '.join(stray)} without --lora-rank: add --lora-rank R to train LoRA adapters, "
                            "or drop them")
    if args.lora_rank is not None:
        parse_targets(args.lora_targets)
        if args.freeze_layers:
            raise TinyPalmError("--lora-rank freezes the whole base already; drop --freeze-layers")


def start_training(args, model, ckpt):
    """For train.py --lora-rank: attach the adapter to the model (its base frozen) and print its cost: a fresh one,
    or with --resume the run's own (ckpt from resume_checkpoint).

    Returns (the adapter, its base hash). The optimizer then takes adapter.params and grads.adapter."""
    if ckpt is None:
        raise TinyPalmError("--lora-rank adapts a trained model: pass --init-from CKPT")
    if args.resume:
        meta, matrices = ckpt.adapter
        model.adapter = adapter_from(meta, matrices, ckpt.path, model.config, model.xp, model.dtype, "--resume")
        print(model.adapter.describe(model))
        return model.adapter, meta["base_sha256"]
    model.adapter = LoRA(model.config, args.lora_rank, args.lora_alpha, args.lora_targets, xp=model.xp,
                         dtype=model.dtype, seed=args.seed)
    print(model.adapter.describe(model))
    return model.adapter, params_hash(ckpt.params)


def resume_checkpoint(out):
    """For train.py --resume of a LoRA run: its base's checkpoint (the run's --init-from) carrying the run's own
    state from out/adapter_last.npz in place of the base's: path, step, train_args, opt_state, best_val_loss,
    evals_without_gain, and `adapter` (the file's meta and matrices), so that train.py resumes it as it resumes any
    run."""
    from . import checkpoint
    path = os.path.join(out, "adapter_last.npz")
    meta, matrices, opt_state = read_adapter(path, "--resume")
    base_path = meta.get("train_args", {}).get("init_from")
    if opt_state is None or not base_path:
        raise TinyPalmError(f"--resume: {path} holds the adapter only, no optimizer state (an older tinypalm wrote "
                            "it); start the LoRA run again with --init-from and --lora-rank")
    if not os.path.exists(base_path):
        raise TinyPalmError(f"--resume: {base_path}, the base checkpoint this LoRA run adapts, is not there; run "
                            "from the directory the run was started in, or put the checkpoint back")
    base = checkpoint.load(base_path)
    if meta["config"] != base.config.to_dict() or meta["base_sha256"] != params_hash(base.params):
        raise TinyPalmError(f"--resume: {base_path} is no longer the base this LoRA run started from (sha256 "
                            f"{meta['base_sha256'][:12]}...); put that checkpoint back at {base_path}")
    run = {**base.meta, "step": meta["step"], "train_args": meta["train_args"], "best_val_loss": meta.get("best_val_loss"),
           "evals_without_gain": meta.get("evals_without_gain", 0)}
    ckpt = checkpoint.Checkpoint(path, run, base.config, base.params, opt_state)
    ckpt.adapter = (meta, matrices)
    return ckpt


# --- merge ------------------------------------------------------------------------------------------------------

def merge_main(argv=None):
    p = ArgumentParser(prog="python -m tinypalm.lora merge",
                       description="Fold LoRA adapters into their base: a plain checkpoint with W + (alpha/r) A B.")
    p.add_argument("--ckpt", required=True, help="the base checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter file (or the LoRA run's --out directory)")
    p.add_argument("--out", required=True, help="the merged checkpoint to write (.npz)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    from . import checkpoint
    from .loading import load_model
    if os.path.exists(args.out) and os.path.samefile(args.out, resolve(args.ckpt)):
        raise TinyPalmError(f"--out {args.out} is the base checkpoint itself; write the merged one to a file of its own "
                            "(the adapters are only valid on their base)")
    if os.path.isdir(args.out):
        raise TinyPalmError(f"--out {args.out} is a directory; give the merged checkpoint's file name, e.g. "
                            f"{os.path.join(args.out, 'merged.npz')}")
    if os.path.exists(args.out) and not args.force:
        raise TinyPalmError(f"--out {args.out} exists; choose another name or pass --force to overwrite it")
    model, tokenizer, ck = load_model(args.ckpt, args.adapter)
    model.adapter.merge_into(model)
    n = model.adapter.n_params
    # what the merged model last trained on is the adapter's data, at its length (evaluate reads them)
    adapted = {k: v for k, v in model.adapter.meta.get("train_args", {}).items() if k in ("data", "seq_len")}
    model.adapter = None
    checkpoint.save(args.out, model, tokenizer, ck.step, train_args={**ck.train_args, **adapted,
                                                                      "merged_adapter": args.adapter})
    print(f"wrote {args.out}: {ck.path} with {n:,} adapter parameters folded in")


USAGE = ("usage: python -m tinypalm.lora merge --ckpt BASE --adapter ADAPTER --out MERGED.npz (folds LoRA adapters "
         "into their base; merge --help says more)")


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not argv or argv[0] != "merge":
        raise TinyPalmError(USAGE)
    merge_main(argv[1:])


if __name__ == "__main__":
    from .cli import run_cli
    run_cli(main)
