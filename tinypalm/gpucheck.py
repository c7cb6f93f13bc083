"""Everything about the GPU path that needs a GPU, in one command and one report.

    python -m tinypalm.gpucheck                       # all of it: about three minutes on an H200
    python -m tinypalm.gpucheck --train-seconds 30 --no-bench

1. kernels: each CUDA kernel (tinypalm/cuda) against its ops.py twin, on random inputs of several shapes, in
   float32 and bfloat16. The twin runs on numpy in float64 from the very same (rounded) inputs, so the error is the
   kernel's own. Relative error (L2 norms) below 1e-4 in float32 and 2e-2 in bfloat16; the dropout mask and the
   causal mask must be identical.
2. model: the loss and every gradient on cupy (float32, bfloat16) against numpy float64, same weights, same
   dropout masks: float32 below 1e-4, bfloat16 below 2e-2.
3. training: train.py --backend cupy --preset full --dtype bfloat16 for --train-seconds (default 120) on the
   bundled corpus, stopped with Ctrl-C as a user would; its logged training loss must fall.
4. bench: python -m tinypalm.bench --backend cupy --preset full --dtype bfloat16 --batch-size 16 --seq-len 1024.

Exit status 0 when everything passes, 1 when something fails, 2 (one line) without a usable GPU.
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy

from . import ops
from .backend import DTYPES, get_xp, to_numpy
from .cli import ArgumentParser, run_cli
from .errors import TinyPalmError

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Check(NamedTuple):
    section: str
    name: str
    detail: str
    error: float       # relative error, or the number of differing elements for exact checks
    tolerance: float
    ok: bool

    def __str__(self):
        mark = "ok  " if self.ok else "FAIL"
        if math.isnan(self.error):
            return f"  {mark} {self.name:34s} {self.detail}"
        return f"  {mark} {self.name:34s} {self.detail:44s} err {self.error:.2e} (< {self.tolerance:.0e})"


def rel_error(a, b):
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    scale = max(numpy.linalg.norm(a), numpy.linalg.norm(b))
    return float(numpy.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def require_gpu():
    try:
        return get_xp("cupy")
    except TinyPalmError as e:
        reason = str(e).split("; ")[0].removeprefix("--backend cupy: ")      # its advice is for the other programs
        raise TinyPalmError(f"gpucheck needs CuPy and an NVIDIA GPU ({reason}); run it on a machine with one, "
                            "after `pip install -e .[cuda12]` or `.[cuda13]`") from None


# --- 1. kernels against their twins ---------------------------------------------------------------------------

class KernelChecks:
    """Each kernel-backed function of tinypalm.cuda.ops against its ops.py twin. `cupy` is the array module to
    run them with; max_size leaves out the shapes whose product of dimensions exceeds it."""

    def __init__(self, cupy, seed=0, max_size=None):
        from .cuda import ops as cuda_ops
        self.cp, self.k, self.rng, self.max_size = cupy, cuda_ops, numpy.random.default_rng(seed), max_size
        self.results = []
        self.dtypes = [numpy.dtype(numpy.float32)]
        try:
            import ml_dtypes
            self.dtypes.append(numpy.dtype(ml_dtypes.bfloat16))
        except ImportError:
            self.results.append(Check("kernels", "bfloat16", "ml_dtypes is not installed: no bf16 checks",
                                      float("nan"), 0, False))

    def sizes(self, shapes):
        return [s for s in shapes if self.max_size is None or math.prod(s) <= self.max_size]

    def dev(self, x, dtype):
        """(device array of dtype, the same values as host float64): the twin sees exactly the kernel's inputs."""
        d = self.cp.asarray(numpy.asarray(x, dtype=numpy.float32)).astype(dtype)
        return d, to_numpy(d).astype(numpy.float64)

    def randn(self, *shape, scale=1.0):
        return self.rng.standard_normal(shape) * scale

    def compare(self, name, detail, got, expected, dtype):
        tol = TOLERANCE[numpy.dtype(dtype).name]
        err = rel_error(to_numpy(got).astype(numpy.float64), expected)
        self.results.append(Check("kernels", name, detail, err, tol, err < tol))

    def exact(self, name, detail, got, expected):
        diff = int(numpy.count_nonzero(to_numpy(got) != numpy.asarray(expected)))
        self.results.append(Check("kernels", name, detail + ", identical", diff, 1, diff == 0))

    def run(self):
        for dtype in self.dtypes:
            for check in (self.layernorm, self.linear, self.concat, self.rope, self.attention, self.swiglu,
                          self.dropout, self.tied_logits, self.cross_entropy, self.embedding):
                try:
                    check(dtype)
                except Exception as e:                  # a crash is a failed check, and the others still run
                    self.results.append(Check("kernels", check.__name__, f"{dtype.name}: {type(e).__name__}: {e}",
                                              float("nan"), 0, False))
        for check in (self.masks, self.optimizer):
            try:
                check()
            except Exception as e:
                self.results.append(Check("kernels", check.__name__, f"{type(e).__name__}: {e}", float("nan"), 0,
                                          False))
        return self.results

    def layernorm(self, dtype):
        for N, D in self.sizes([(7, 32), (64, 768), (300, 1000)]):
            gain_dtypes = [dtype] + ([numpy.dtype(numpy.float32)] if dtype.name == "bfloat16" else [])
            for gain_dtype in gain_dtypes:
                x, x64 = self.dev(self.randn(N, D, scale=3.0) + 1.0, dtype)
                gain, gain64 = self.dev(1.0 + 0.1 * self.randn(D), gain_dtype)
                dy, dy64 = self.dev(self.randn(N, D), dtype)
                y, cache = self.k.layernorm_forward(x, gain, 1e-5)
                y64, cache64 = ops.layernorm_forward(x64, gain64, 1e-5)
                d_gain, d_gain64 = self.cp.zeros(D, numpy.float32), numpy.zeros(D)
                dx = self.k.layernorm_backward(dy, gain, d_gain, cache)
                dx64 = ops.layernorm_backward(dy64, gain64, d_gain64, cache64)
                detail = f"{dtype.name} ({N}, {D}) gain {gain_dtype.name}"
                self.compare("layernorm_forward", detail, y, y64, dtype)
                self.compare("layernorm_backward dx", detail, dx, dx64, dtype)
                self.compare("layernorm_backward d_gain", detail, d_gain, d_gain64, dtype)
                self.compare("layernorm_backward dx, frozen gain", detail,
                             self.k.layernorm_backward(dy, gain, None, cache), dx64, dtype)

    def linear(self, dtype):
        for N, n_in, n_out, width in self.sizes([(5, 7, 3, 3), (64, 128, 96, 96), (256, 768, 512, 700)]):
            # dy a column slice (row stride > columns), dw accumulating onto what it held
            x, x64 = self.dev(self.randn(N, n_in), dtype)
            w, w64 = self.dev(self.randn(n_in, n_out), dtype)
            dy_full, dy_full64 = self.dev(self.randn(N, width + n_out), dtype)
            dy, dy64 = dy_full[:, width:], dy_full64[:, width:]
            dw, dw64 = self.dev(self.randn(n_in, n_out), numpy.float32)
            dx = self.k.linear_backward(dy, x, w, dw)
            dx64 = ops.linear_backward(dy64, x64, w64, dw64)
            detail = f"{dtype.name} ({N}, {n_in}) x ({n_in}, {n_out})"
            self.compare("linear_backward dx", detail, dx, dx64, dtype)
            self.compare("linear_backward dw (float32)", detail, dw, dw64, dtype)
            self.compare("linear_backward dx, frozen w", detail, self.k.linear_backward(dy, x, w, None), dx64, dtype)

    def concat(self, dtype):
        # the full preset's projection gradient (parts 16-byte multiples: one uint4 a thread) and odd widths (2- or
        # 4-byte units); the first part a column slice of a wider matrix, as the model's attention output may be
        for N, widths in [(7, (3, 5, 8)), (64, (64, 32, 32, 256, 256)), (2048, (768, 128, 128, 3072, 3072))]:
            if self.sizes([(N, sum(widths))]):
                wide, _ = self.dev(self.randn(N, widths[0] + 8), dtype)
                parts = [wide[:, 8:]] + [self.dev(self.randn(N, w), dtype)[0] for w in widths[1:]]
                self.exact("concat_columns", f"{dtype.name} ({N}, {' + '.join(map(str, widths))})",
                           self.k.concat_columns(self.cp, parts),
                           numpy.concatenate([to_numpy(p) for p in parts], axis=1))

    def rope(self, dtype):
        for B, T, nh, Dh, pos in self.sizes([(2, 5, 3, 8, 0), (4, 64, 12, 64, 0), (1, 3, 1, 16, 29)]):
            cos_all, sin_all = ops.rope_tables(numpy, pos + T, Dh, 10000.0, numpy.float64)
            for table_dtype in {dtype.name: dtype, "float32": numpy.dtype(numpy.float32)}.values():
                cos, cos64 = self.dev(cos_all[pos:pos + T, None, :], table_dtype)
                sin, sin64 = self.dev(sin_all[pos:pos + T, None, :], table_dtype)
                # x as the model makes it: a column slice of a wider projection, viewed (B, T, nh, Dh)
                proj, proj64 = self.dev(self.randn(B * T, nh * Dh + 24), dtype)
                x, x64 = (p[:, 8:8 + nh * Dh].reshape(B, T, nh, Dh) for p in (proj, proj64))
                d, d64 = self.dev(self.randn(B, T, nh, Dh), dtype)
                detail = f"{dtype.name} ({B}, {T}, {nh}, {Dh}) at {pos}, tables {table_dtype.name}"
                self.compare("rope_forward", detail, self.k.rope_forward(x, cos, sin),
                             ops.rope_forward(x64, cos64, sin64), dtype)
                self.compare("rope_backward", detail, self.k.rope_backward(d, cos, sin),
                             ops.rope_backward(d64, cos64, sin64), dtype)

    def attention(self, dtype):
        # in bf16, G*T >= 64 rows and Dh 16, 32 or 64 take flash.cu: partial tiles, S > T, two kv heads, the full
        # preset's shape
        for B, T, S, H, Hkv, Dh in self.sizes([(2, 5, 5, 4, 1, 8), (2, 16, 16, 4, 2, 16), (1, 3, 10, 4, 1, 8),
                                               (2, 128, 128, 12, 1, 64), (1, 1, 40, 4, 4, 32), (1, 20, 20, 4, 1, 16),
                                               (1, 33, 50, 2, 1, 32), (2, 40, 40, 4, 2, 64), (1, 300, 300, 8, 1, 64),
                                               (1, 1024, 1024, 12, 1, 64)]):
            G = H // Hkv
            q, q64 = self.dev(self.randn(B, T, H, Dh), dtype)
            # k contiguous, v a slice of a projection (how the model passes them during training)
            k, k64 = self.dev(self.randn(B, S, Hkv, Dh), dtype)
            vp, vp64 = self.dev(self.randn(B * S, Hkv * Dh + 16), dtype)
            v, v64 = (p[:, 16:].reshape(B, S, Hkv, Dh) for p in (vp, vp64))
            # dout a column slice too, as the model's branch gradient gives it
            dp, dp64 = self.dev(self.randn(B * T, H * Dh + 8), dtype)
            dout, dout64 = (p[:, 8:].reshape(B, T, H, Dh) for p in (dp, dp64))
            mask = self.k.causal_mask(self.cp, T, S, S - T, G, dtype)
            mask64 = ops.causal_mask(numpy, T, S, S - T, G, numpy.float64)
            out, cache = self.k.attention_forward(self.cp, q, k, v, mask)
            out64, cache64 = ops.attention_forward(numpy, q64, k64, v64, mask64)
            grads = self.k.attention_backward(dout, cache)
            grads64 = ops.attention_backward(dout64, cache64)
            detail = f"{dtype.name} B{B} T{T} S{S} H{H} Hkv{Hkv} Dh{Dh}"
            self.compare("attention_forward", detail, out, out64, dtype)
            for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
                self.compare(f"attention_backward {name}", detail, g, g64, dtype)

    def swiglu(self, dtype):
        for N, F in self.sizes([(7, 37), (256, 3072)]):
            proj, proj64 = self.dev(self.randn(N, 2 * F + 5, scale=2.0), dtype)
            gate, gate64 = proj[:, 5:5 + F], proj64[:, 5:5 + F]
            up, up64 = proj[:, 5 + F:], proj64[:, 5 + F:]
            dh, dh64 = self.dev(self.randn(N, F), dtype)
            hidden, cache = self.k.swiglu_forward(self.cp, gate, up)
            hidden64, cache64 = ops.swiglu_forward(numpy, gate64, up64)
            d_gate, d_up = self.k.swiglu_backward(dh, cache)
            d_gate64, d_up64 = ops.swiglu_backward(dh64, cache64)
            detail = f"{dtype.name} ({N}, {F})"
            self.compare("swiglu_forward", detail, hidden, hidden64, dtype)
            self.compare("swiglu_backward d_gate", detail, d_gate, d_gate64, dtype)
            self.compare("swiglu_backward d_up", detail, d_up, d_up64, dtype)

    def dropout(self, dtype):
        for shape, rate in [((7, 13), 0.1), ((512, 768), 0.5)]:
            keep = self.k.dropout_mask(self.cp, shape, rate, 77)
            x, x64 = self.dev(self.randn(*shape), dtype)
            keep64 = ops.dropout_mask(numpy, shape, rate, 77)
            detail = f"{dtype.name} {shape} rate {rate}"
            self.compare("dropout_forward", detail, self.k.dropout_forward(x, rate, keep),
                         ops.dropout_forward(x64, rate, keep64), dtype)
            self.compare("dropout_backward", detail, self.k.dropout_backward(x, rate, keep),
                         ops.dropout_backward(x64, rate, keep64), dtype)

    def tied_logits(self, dtype):
        for N, D, V in self.sizes([(6, 16, 50), (256, 768, 32768)]):
            h, h64 = self.dev(self.randn(N, D), dtype)
            embed, embed64 = self.dev(self.randn(V, D), dtype)
            dlogits, dlogits64 = self.dev(self.randn(N, V), dtype)
            d_embed, d_embed64 = self.dev(self.randn(V, D), numpy.float32)
            detail = f"{dtype.name} N{N} D{D} V{V}"
            self.compare("tied_logits_forward", detail, self.k.tied_logits_forward(h, embed),
                         ops.tied_logits_forward(h64, embed64), dtype)
            dh = self.k.tied_logits_backward(dlogits, h, embed, d_embed)
            dh64 = ops.tied_logits_backward(dlogits64, h64, embed64, d_embed64)
            self.compare("tied_logits_backward dh", detail, dh, dh64, dtype)
            self.compare("tied_logits_backward d_embed", detail, d_embed, d_embed64, dtype)
            self.compare("tied_logits_backward dh, frozen embed", detail,
                         self.k.tied_logits_backward(dlogits, h, embed, None), dh64, dtype)

    def cross_entropy(self, dtype):
        for N, V in self.sizes([(5, 11), (64, 1000), (512, 32768)]):
            logits, logits64 = self.dev(self.randn(N, V, scale=3.0), dtype)
            targets = self.rng.integers(0, V, N)
            loss, cache = self.k.cross_entropy_forward(self.cp, logits, self.cp.asarray(targets), 1e-4)
            loss64, cache64 = ops.cross_entropy_forward(numpy, logits64, targets, 1e-4)
            detail = f"{dtype.name} ({N}, {V})"
            self.compare("cross_entropy_forward loss", detail, loss, loss64, numpy.float32)   # float32 statistics
            self.compare("cross_entropy_backward", detail, self.k.cross_entropy_backward(self.cp, cache, 1e-4),
                         ops.cross_entropy_backward(numpy, cache64, 1e-4), dtype)
            mask = self.rng.random(N) < 0.5                           # instruction tuning: the responses count
            for name, m in (("masked", mask), ("masked, no row counted", numpy.zeros(N, bool))):
                loss, cache = self.k.masked_cross_entropy_forward(self.cp, logits, self.cp.asarray(targets),
                                                                  self.cp.asarray(m), 1e-4)
                loss64, cache64 = ops.masked_cross_entropy_forward(numpy, logits64, targets, m, 1e-4)
                self.compare(f"masked_cross_entropy_forward loss, {name}", detail, loss, loss64, numpy.float32)
                self.compare(f"masked_cross_entropy_backward, {name}", detail,
                             self.k.masked_cross_entropy_backward(self.cp, cache, 1e-4),
                             ops.masked_cross_entropy_backward(numpy, cache64, 1e-4), dtype)

    def embedding(self, dtype):
        for B, T, V, D in self.sizes([(2, 7, 5, 16), (8, 256, 300, 768)]):
            tokens = self.rng.integers(0, V, (B, T))                 # few distinct tokens: many repeats
            dx, dx64 = self.dev(self.randn(B, T, D), dtype)
            d_embed, d_embed64 = self.dev(self.randn(V, D), numpy.float32)
            self.k.embedding_backward(self.cp, d_embed, dx, self.cp.asarray(tokens))
            ops.embedding_backward(numpy, d_embed64, dx64, tokens)
            self.compare("embedding_backward", f"{dtype.name} ({B}, {T}) V{V} D{D}", d_embed, d_embed64, dtype)

    def masks(self):
        for shape, rate, seed, first in [((7, 13), 0.1, 0, 0), ((1000, 768), 0.5, 123456789, 0),
                                         ((3, 4, 5), 0.9, 2**40 + 3, 2**32 - 7)]:
            self.exact("dropout_mask", f"{shape} rate {rate} seed {seed} first {first}",
                       self.k.dropout_mask(self.cp, shape, rate, seed, first),
                       ops.dropout_mask(numpy, shape, rate, seed, first))
        for Tq, S, first, G in [(5, 5, 0, 1), (3, 10, 7, 4)]:
            self.exact("causal_mask", f"Tq {Tq} S {S} first {first} G {G}",
                       self.k.causal_mask(self.cp, Tq, S, first, G, numpy.float32),
                       ops.causal_mask(numpy, Tq, S, first, G, numpy.float32))

    def optimizer(self):
        n = 100_003
        p, p64 = self.dev(self.randn(n), numpy.float32)
        g, g64 = self.dev(self.randn(n, scale=0.3), numpy.float32)
        m, m64 = self.dev(self.randn(n, scale=0.1), numpy.float32)
        v, v64 = self.dev(self.rng.random(n) * 0.01, numpy.float32)
        norm = self.k.global_grad_norm(g)
        self.compare("global_grad_norm", f"float32 ({n},)", norm, numpy.linalg.norm(g64), numpy.float32)
        decay = [(0, 30_000), (50_000, n)]
        frozen_host = numpy.zeros(n, bool)
        frozen_host[10_000:20_000] = True
        p_compute = p.astype(self.dtypes[-1]) if len(self.dtypes) > 1 else None   # as the model keeps it
        lr, b1, b2, eps, wd, max_norm = 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.5 * float(numpy.linalg.norm(g64))
        p_start = p64.copy()
        for t in (1, 2):
            self.k.adamw_flat(p, g, m, v, decay, lr, b1, b2, eps, wd, t, frozen=self.cp.asarray(frozen_host),
                              p_compute=p_compute, grad_norm=norm, max_norm=max_norm)
            # the reference: optim.AdamW's formulas in float64, clipping as clip_grad_norm does
            norm64 = numpy.linalg.norm(g64)
            g_used = g64 * (max_norm / (norm64 + 1e-6) if norm64 > max_norm else 1.0)
            live = ~frozen_host
            m64[live] = b1 * m64[live] + (1 - b1) * g_used[live]
            v64[live] = b2 * v64[live] + (1 - b2) * g_used[live] ** 2
            decays = numpy.zeros(n, bool)
            for a, b in decay:
                decays[a:b] = True
            p64[live & decays] *= 1 - lr * wd
            p64[live] -= (lr / (1 - b1 ** t)) * m64[live] / (numpy.sqrt(v64[live] / (1 - b2 ** t)) + eps)
        detail = "float32 flat, 2 steps, decay ranges, frozen, clipping"
        self.compare("adamw_flat m", detail, m, m64, numpy.float32)
        self.compare("adamw_flat v", detail, v, v64, numpy.float32)
        # the change of p, not p itself (which two small updates barely move)
        self.compare("adamw_flat p update", detail, to_numpy(p).astype(numpy.float64) - p_start, p64 - p_start,
                     numpy.float32)
        if p_compute is not None:
            self.compare("adamw_flat bf16 compute copy", detail, p_compute, to_numpy(p).astype(numpy.float64),
                         p_compute.dtype)


def check_kernels(seed=0):
    """Every kernel against its twin; a list of Check."""
    return KernelChecks(require_gpu(), seed).run()


# --- 2. the model on cupy against numpy float64 ----------------------------------------------------------------

def check_model():
    from .config import Config
    from .model import PaLM
    from .cuda.ops import OVERRIDES
    results = []
    cfg = Config(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=32)
    rng = numpy.random.default_rng(0)
    tokens, targets = rng.integers(0, cfg.vocab_size, (3, 24)), rng.integers(0, cfg.vocab_size, (3, 24))
    ref = PaLM(cfg, "numpy", "float64", seed=3)
    loss64, grads64 = ref.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=5)
    grads64 = {name: to_numpy(g) for name, g in grads64.items()}
    for dtype in ("float32", "bfloat16"):
        tol = TOLERANCE[dtype]
        if dtype not in DTYPES:
            results.append(Check("model", f"model {dtype}", "this tinypalm has no such dtype: not checked",
                                 float("nan"), tol, False))
            continue
        try:
            gpu = PaLM(cfg, "cupy", dtype, seed=3)
            model_ops = getattr(gpu, "ops", None)
            wired = model_ops is not None and all(getattr(model_ops, name, None) is fn
                                                  for name, fn in OVERRIDES.items())
            loss, grads = gpu.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=5)
        except Exception as e:                          # report it, and still check the other dtype
            results.append(Check("model", f"model {dtype}", f"crashed: {type(e).__name__}: {e}", float("nan"),
                                 tol, False))
            continue
        err = abs(float(loss) - loss64) / abs(loss64)
        results.append(Check("model", f"model {dtype} loss", "CUDA kernels " + ("in use" if wired else
                             "NOT in use (model.ops is not the cupy overrides)"), err, tol, err < tol and wired))
        worst_name, worst = None, 0.0
        for name, g64 in grads64.items():
            e = rel_error(to_numpy(grads[name]).astype(numpy.float64), g64)
            if e >= worst:
                worst_name, worst = name, e
            if e >= tol:
                results.append(Check("model", f"model {dtype} grad {name}", "", e, tol, False))
        results.append(Check("model", f"model {dtype} every gradient", f"{len(grads64)} tensors, worst {worst_name}",
                             worst, tol, worst < tol))
        if dtype == "bfloat16":
            results.append(check_without_master(cfg, gpu, tokens))
    return results


def check_without_master(cfg, trained, tokens):
    """sample.py's bf16 model: the weights alone in bf16 (trains=False), built from the trained model's float32
    host arrays. Its logits must be those of the model with the float32 master, bit for bit."""
    from .model import PaLM
    name = "model bfloat16 without a master (sampling)"
    try:
        frozen = PaLM(cfg, "cupy", "bfloat16", params=trained.params_numpy(), trains=False)
        ours, theirs = (to_numpy(m.forward(tokens)).astype(numpy.float32) for m in (frozen, trained))
    except Exception as e:
        return Check("model", name, f"crashed: {type(e).__name__}: {e}", float("nan"), 0, False)
    differ = int((ours != theirs).sum())
    return Check("model", name, "logits as the model with a master's, identical", differ, 1, differ == 0)


# --- 3. a short bf16 run of the full preset, through train.py ----------------------------------------------------

def check_training(seconds):
    train_py = os.path.join(ROOT, "train.py")
    if not os.path.exists(train_py):
        return [Check("training", "train.py", f"not found at {train_py} (run from a source checkout)",
                      float("nan"), 0, False)]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, train_py, "--backend", "cupy", "--preset", "full", "--dtype", "bfloat16",
               "--batch-size", "16", "--seq-len", "1024", "--max-steps", "100000", "--warmup-steps", "20",
               "--lr", "6e-4", "--log-every", "5", "--eval-every", "100000", "--eval-steps", "2",
               "--sample-tokens", "0", "--out", out]
        log_path = os.path.join(out, "train.log")
        with open(log_path, "w") as log:              # a file, not a pipe: a full pipe would stall train.py
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            start = time.time()
            while proc.poll() is None and time.time() - start < seconds:
                time.sleep(1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)           # as a user's Ctrl-C: finish the step, save, stop
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with open(log_path) as f:
            output = f.read()
        metrics = os.path.join(out, "metrics.jsonl")
        records = []
        if os.path.exists(metrics):
            with open(metrics) as f:
                records = [json.loads(line) for line in f if line.strip()]
    return [training_verdict(records, seconds, output)]


def training_verdict(records, seconds, output):
    """The training check from train.py's metrics.jsonl records: the last logged training loss must be at least
    0.5 below the first, every loss finite."""
    train = [r for r in records if r.get("split") == "train"]
    if len(train) < 4:
        tail = " | ".join(output.strip().splitlines()[-2:])
        return Check("training", "full preset bf16", f"only {len(train)} log lines in {seconds} s: {tail}",
                     float("nan"), 0, False)
    first, last = train[0], train[-1]
    rate = numpy.median([r["tokens_per_s"] for r in train[1:]])
    detail = (f"{last['step']} steps in {seconds} s, loss {first['loss']:.3f} (step {first['step']}) -> "
              f"{last['loss']:.3f} (step {last['step']}), {rate:,.0f} tokens/s")
    falls = last["loss"] < first["loss"] - 0.5 and all(math.isfinite(r["loss"]) for r in train)
    return Check("training", "full preset bf16, loss falls", detail, float("nan"), 0, falls)


# --- 4. the benchmark -------------------------------------------------------------------------------------------

BENCH_ARGS = ["--backend", "cupy", "--preset", "full", "--dtype", "bfloat16", "--batch-size", "16", "--seq-len", "1024"]


def run_bench():
    cmd = [sys.executable, "-m", "tinypalm.bench", *BENCH_ARGS, "--steps", "10", "--warmup", "3"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        text = r.stdout + (r.stderr if r.returncode else "")
        ok = r.returncode == 0
    except subprocess.TimeoutExpired:
        text, ok = "timed out after 600 s", False
    return Check("bench", "bench full bf16 16x1024", "exit 0" if ok else "failed", float("nan"), 0, ok), text


# --- the report ---------------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(prog="python -m tinypalm.gpucheck", description=__doc__)
    p.add_argument("--train-seconds", type=int, default=120, help="length of the training run (0: skip it)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    args = p.parse_args(argv)
    if args.train_seconds < 0:
        raise TinyPalmError(f"--train-seconds must not be negative, got {args.train_seconds} (0 skips the training run)")
    cupy = require_gpu()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    started = time.time()
    print(f"tinypalm gpucheck on {name} (sm_{props['major']}{props['minor']}), CuPy {cupy.__version__}, "
          f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}", flush=True)

    results, bench_text = [], None
    sections = [("kernels against their ops.py twins", lambda: check_kernels()),
                ("the model: loss and every gradient against numpy float64", check_model)]
    if args.train_seconds > 0:
        sections.append((f"training: full preset, bfloat16, {args.train_seconds} s",
                         lambda: check_training(args.train_seconds)))
    for title, run in sections:
        cupy.get_default_memory_pool().free_all_blocks()     # leave the GPU's memory to train.py and the bench
        print(f"\n{title}", flush=True)
        try:
            found = run()
        except Exception as e:
            found = [Check(title, title, f"crashed: {type(e).__name__}: {e}", float("nan"), 0, False)]
        for r in found:
            print(r, flush=True)
        results += found
    if not args.no_bench:
        cupy.get_default_memory_pool().free_all_blocks()
        print("\nbench: python -m tinypalm.bench " + " ".join(BENCH_ARGS), flush=True)
        check, bench_text = run_bench()
        print("\n".join("  " + line for line in bench_text.strip().splitlines()), flush=True)
        results.append(check)

    failed = [r for r in results if not r.ok]
    print(f"\ngpucheck: {len(results) - len(failed)} passed, {len(failed)} failed "
          f"in {time.time() - started:.0f} s on {name}")
    for r in failed:
        print(r)
    return 1 if failed else 0


if __name__ == "__main__":
    status = [0]
    run_cli(lambda: status.__setitem__(0, main()))
    sys.exit(status[0])
