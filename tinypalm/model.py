"""The PaLM model: parameters, forward pass, and the backward pass written out by the chain rule.

Storage. Each layer keeps two fused matrices, so its five input projections run as one GEMM and its two output
projections as another (the paper fuses the inputs of the parallel block; fusing the outputs is tinypalm's):
    w_in  (D, H*Dh + 2*Hkv*Dh + 2*F) = [wq | wk | wv | w_gate | w_up]    applied to the shared LayerNorm output
    w_out (H*Dh + F, D)              = [wo ; w_down]                      applied to [attention out | SwiGLU out]
`model.params` maps the canonical names (`layers.0.wq`, ...) to views into those matrices, so optimizers,
checkpoints and tests see the canonical names and shapes; `model.grads_like()` gives gradients in the same form.
Update parameters in place (`p -= ...`, `p[...] = ...`) so the views stay tied to the storage.

All stored arrays lie back to back in one flat vector, `model.params.flat` (see flat.py), in the order
embed, then each layer's norm, w_in, w_out, then the final norm; gradients (`grads.flat`) are laid out the same
way, so the optimizer and gradient clipping each make one pass over one vector.

The op functions come from `model.ops` (backend.get_ops): the plain functions of ops.py, or on a backend that
has them, faster twins with the same signatures.

Precision. `dtype` is what the model stores and passes between its ops: its activations, KV cache and the
weights the ops read.
For float64 and float32 that is all there is. bfloat16 is mixed precision: `model.params` (the master weights),
the gradients and the optimizer's moments stay float32, and the ops read `model.weights`, a bf16 copy of the
whole flat vector. After changing `model.params` in place (an optimizer step) call `model.params_updated()`,
which refreshes that copy with one cast; `load_params` does it itself. A model whose weights will not change
(`trains=False`: sampling, evaluating, LoRA's frozen base) keeps the bf16 copy alone: `model.params` is it.
Inside the ops every bf16 input is read into float32 (see ops.py), so the rotary tables and the attention mask
are float32.
"""

import math

import numpy

from .backend import get_xp, get_ops, batch_splitter, check_dtype, compute_dtype, to_numpy
from .config import Config
from .errors import TinyPalmError
from .flat import Layout

LAYER_PARAMS = ("norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def param_shapes(cfg):
    """Canonical parameter names and shapes, in the order they are initialised and saved."""
    D, F, q_dim, kv_dim = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, D)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.norm": (D,), f"layers.{i}.wq": (D, q_dim), f"layers.{i}.wk": (D, kv_dim),
                       f"layers.{i}.wv": (D, kv_dim), f"layers.{i}.wo": (q_dim, D), f"layers.{i}.w_gate": (D, F),
                       f"layers.{i}.w_up": (D, F), f"layers.{i}.w_down": (F, D)})
    shapes["norm"] = (D,)
    return shapes


def init_params(cfg, seed):
    """Host float64 initial weights: embed ~ N(0, 1), matrices ~ N(0, 1/fan_in), norm gains 1.

    Drawn with numpy's generator in canonical order, so both backends start from the same weights."""
    rng = numpy.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:
            params[name] = numpy.ones(shape)
        elif name == "embed":
            params[name] = rng.standard_normal(shape)
        else:
            params[name] = rng.standard_normal(shape) / math.sqrt(shape[0])
    return params


def storage_shapes(cfg):
    """The arrays actually stored, in flat-vector order: embed, each layer's norm, w_in and w_out, the final norm."""
    D, F, q_dim, kv_dim = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, D)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.norm": (D,), f"layers.{i}.w_in": (D, q_dim + 2 * kv_dim + 2 * F),
                       f"layers.{i}.w_out": (q_dim + F, D)})
    shapes["norm"] = (D,)
    return shapes


def layer_storage_names(i):
    return [f"layers.{i}.norm", f"layers.{i}.w_in", f"layers.{i}.w_out"]


class Layer:
    """One block's stored arrays, norm (D,), w_in (D, Q + 2K + 2F), w_out (Q + F, D), and the canonical views."""

    def __init__(self, cfg, stored, i):
        F = cfg.d_ff
        self.q_dim, self.kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.norm, self.w_in, self.w_out = (stored[name] for name in layer_storage_names(i))
        q, k, v = self.q_dim, self.kv_dim, self.kv_dim
        self.views = {"norm": self.norm,
                      "wq": self.w_in[:, :q], "wk": self.w_in[:, q:q + k], "wv": self.w_in[:, q + k:q + k + v],
                      "w_gate": self.w_in[:, q + k + v:q + k + v + F], "w_up": self.w_in[:, q + k + v + F:],
                      "wo": self.w_out[:q], "w_down": self.w_out[q:]}


class LayerGrads:
    """One block's gradients as _block_backward accumulates them: norm (D,), w_in, w_out, each None if frozen."""

    def __init__(self, norm, w_in, w_out):
        self.norm, self.w_in, self.w_out = norm, w_in, w_out


class KVCache:
    """Keys and values of the positions seen so far, per layer: (B, max_seq_len, Hkv, Dh) each; the keys already
    rotated (RoPE), so a cached key is never rotated again."""

    def __init__(self, xp, cfg, batch_size, dtype):
        shape = (batch_size, cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0


def canonical_views(cfg):
    """stored arrays (by storage name) -> dict of canonical views, in param_shapes order."""
    def named(stored):
        views = {"embed": stored["embed"]}
        for i in range(cfg.n_layers):
            layer = Layer(cfg, stored, i)
            views.update({f"layers.{i}.{k}": layer.views[k] for k in LAYER_PARAMS})
        views["norm"] = stored["norm"]
        return views
    return named


class PaLM:
    def __init__(self, config, backend="numpy", dtype="float32", seed=0, params=None, trains=True):
        """params: host arrays by canonical name to start from (a checkpoint's), instead of weights drawn from seed.
        trains=False: the weights will not change (sampling, evaluating, the frozen base under LoRA), so a
        bfloat16 model keeps no float32 master: model.params is its bf16 copy, 2 bytes a parameter instead of 6."""
        assert isinstance(config, Config)
        self.config = cfg = config
        self.xp = xp = get_xp(backend)
        self.ops = ops = get_ops(backend)
        self.split_batch = batch_splitter(backend)     # numpy: a batch's rows cut over the threads (batch_threads.py)
        self.backend, self.dtype = backend, check_dtype(dtype)
        self.master_dtype = compute_dtype(self.dtype)            # float32 for bfloat16, else dtype itself
        self.layout = Layout(storage_shapes(cfg), named=canonical_views(cfg))
        # a Flat (canonical views, .flat): the master weights, or the bf16 weights alone when they never change
        self.params = self.layout.zeros(xp, self.master_dtype if trains else self.dtype)
        # the weights the ops read: the master itself, or (bf16) a copy in the model's dtype, refreshed by
        # params_updated(); embed, norm and layers[i] are its stored arrays
        self.weights = self.params if self.params.flat.dtype == self.dtype else self.layout.zeros(xp, self.dtype)
        self.embed, self.norm = self.weights.stored["embed"], self.weights.stored["norm"]
        self.layers = [Layer(cfg, self.weights.stored, i) for i in range(cfg.n_layers)]
        self.rope_cos, self.rope_sin = ops.rope_tables(xp, cfg.max_seq_len, cfg.head_dim, cfg.rope_base,
                                                       self.master_dtype)
        self._masks = {}
        self.adapter = None                  # LoRA adapters (lora.py), run beside the fused projections when set
        self.frozen = frozenset()
        self.load_params(init_params(cfg, seed) if params is None else params)

    def load_params(self, arrays):
        """Copy host or device arrays, by canonical name, into the model's storage: one for every parameter, of
        its shape (model.params[name].shape), and no others."""
        missing, unknown = [n for n in self.params if n not in arrays], [n for n in arrays if n not in self.params]
        if missing or unknown:
            what = f"no array for {missing[0]}" if missing else f"{unknown[0]} is not a parameter of this model"
            raise TinyPalmError(f"load_params: {what} ({len(missing)} missing, {len(unknown)} unknown); pass one array "
                                "per name of model.params")
        for name, p in self.params.items():
            if tuple(numpy.shape(arrays[name])) != p.shape:
                raise TinyPalmError(f"load_params: {name} has shape {tuple(numpy.shape(arrays[name]))}, and the "
                                    f"model's {name} is {p.shape}")
            p[...] = self.xp.asarray(arrays[name], dtype=self.master_dtype)
        self.params_updated()

    def params_updated(self):
        """Call after changing model.params (or the adapters' params) in place (an optimizer step): refreshes the
        bf16 compute copy of the weights, one cast of the flat vector. Nothing to do for float32 and float64,
        which compute with model.params itself."""
        if self.weights is not self.params:
            self.weights.flat[...] = self.params.flat
        if self.adapter is not None:
            self.adapter.params_updated()

    @property
    def frozen(self):
        """Storage names (embed, layers.i.norm, layers.i.w_in, layers.i.w_out, norm) whose gradients the backward
        skips, their entries in grads left as they are: a frozen base (LoRA, --freeze-layers) costs no
        weight-gradient products. Set it to any collection of those names; AdamW(..., frozen=model.frozen) then
        leaves them untouched too (weight decay included)."""
        return self._frozen

    @frozen.setter
    def frozen(self, names):
        if isinstance(names, str):
            names = [names]
        try:
            names = frozenset(names)
        except TypeError:
            raise TinyPalmError(f"model.frozen: give a collection of stored arrays' names, not {names!r}") from None
        if not all(isinstance(n, str) for n in names):
            raise TinyPalmError(f"model.frozen: {sorted(repr(n) for n in names if not isinstance(n, str))} are not "
                                "names; give stored arrays' names, strings")
        unknown = sorted(names - set(self.layout.spans))
        if unknown:
            raise TinyPalmError(f"model.frozen: {', '.join(unknown)}: not stored arrays of this model; name embed, norm, "
                                f"layers.i.norm, layers.i.w_in or layers.i.w_out (i < {self.config.n_layers}): wq, wk, "
                                "wv, w_gate and w_up live in w_in, wo and w_down in w_out")
        self._frozen = names

    def params_numpy(self):
        """Host copies of the master weights by canonical name (in the master dtype, also for a model that keeps
        no master), from one copy of the flat vector: they stay as they are when the model trains on."""
        host = to_numpy(self.params.flat)             # on numpy: the flat vector itself
        return dict(self.layout.wrap(host.astype(self.master_dtype, copy=host is self.params.flat)))

    def grads_like(self):
        """Zeroed gradients laid out like the parameters (in the master dtype): a Flat with the canonical names
        and `.flat`. With every parameter frozen (LoRA trains adapters beside them) an empty one: the backward
        writes none of it, and a full-size buffer would take as much memory as the weights."""
        if self.frozen.issuperset(self.layout.shapes):
            return Layout({}).zeros(self.xp, self.master_dtype)
        return self.layout.zeros(self.xp, self.master_dtype)

    # --- forward ----------------------------------------------------------------------------------------------

    def _mask(self, n_queries, n_keys, first_pos):
        key = (n_queries, n_keys, first_pos)
        if key not in self._masks:
            if len(self._masks) > 64:
                self._masks.clear()
            groups = self.config.n_heads // self.config.n_kv_heads
            self._masks[key] = self.ops.causal_mask(self.xp, n_queries, n_keys, first_pos, groups, self.master_dtype)
        return self._masks[key]

    def _block_forward(self, x, layer, pos, kv_cache=None, i=0, dropout=0.0, dropout_seed=0, first_row=0):
        # x (B, T, D) -> x + Attn(LN(x)) + MLP(LN(x)), one parallel block. first_row: these rows' place in the
        # batch, when they are a piece of it (batch_threads.py), so dropout draws exactly their rows of its mask
        cfg, xp, ops = self.config, self.xp, self.ops
        B, T, D = x.shape
        H, Hkv, Dh, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        q_dim, kv_dim = layer.q_dim, layer.kv_dim

        h, ln_cache = ops.layernorm_forward(x.reshape(B * T, D), layer.norm, cfg.norm_eps)   # (N, D)
        proj = ops.linear_forward(h, layer.w_in)                                             # (N, Q+2K+2F)
        # with LoRA adapters (lora.py): proj += (a/r) h A B in each adapted projection's columns
        lora_in = self.adapter.in_forward(i, h, proj) if self.adapter is not None else None
        q = proj[:, :q_dim].reshape(B, T, H, Dh)
        k = proj[:, q_dim:q_dim + kv_dim].reshape(B, T, Hkv, Dh)
        v = proj[:, q_dim + kv_dim:q_dim + 2 * kv_dim].reshape(B, T, Hkv, Dh)
        gate, up = proj[:, q_dim + 2 * kv_dim:q_dim + 2 * kv_dim + F], proj[:, q_dim + 2 * kv_dim + F:]

        cos, sin = self.rope_cos[pos:pos + T, None, :], self.rope_sin[pos:pos + T, None, :]   # (T, 1, Dh)
        q, k = ops.rope_forward(q, cos, sin), ops.rope_forward(k, cos, sin)
        if kv_cache is not None:            # generation: append this chunk, attend over everything so far
            kv_cache.k[i][:, pos:pos + T], kv_cache.v[i][:, pos:pos + T] = k, v
            k, v = kv_cache.k[i][:, :pos + T], kv_cache.v[i][:, :pos + T]
        attn, attn_cache = ops.attention_forward(xp, q, k, v, self._mask(T, pos + T, pos))    # (B, T, H, Dh)
        hidden, swiglu_cache = ops.swiglu_forward(xp, gate, up)                             # (N, F)

        branches = ops.concat_columns(xp, [attn.reshape(B * T, q_dim), hidden])             # (N, Q+F)
        y = ops.linear_forward(branches, layer.w_out)                                       # (N, D)
        lora_out = self.adapter.out_forward(i, branches, y) if self.adapter is not None else None
        keep = None
        if dropout > 0.0:
            keep = ops.dropout_mask(xp, y.shape, dropout, dropout_seed, first_row * T * D)
            y = ops.dropout_forward(y, dropout, keep)
        cache = (ln_cache, h, cos, sin, attn_cache, swiglu_cache, branches, keep, dropout, lora_in, lora_out)
        return x + y.reshape(B, T, D), cache

    def _forward(self, tokens, kv_cache=None, dropout=0.0, dropout_seed=0, first_row=0):
        # tokens (B, T) int -> logits (N, V) and everything the backward needs
        cfg, ops = self.config, self.ops
        B, T = tokens.shape
        pos = kv_cache.length if kv_cache is not None else 0
        if pos + T > cfg.max_seq_len:
            raise TinyPalmError(f"{pos} cached positions and {T} more exceed the model's max_seq_len {cfg.max_seq_len}; "
                                "start again with fewer (a new model.new_kv_cache) or keep the latest positions")
        if kv_cache is not None and kv_cache.k[0].shape[0] != B:
            raise TinyPalmError(f"a batch of {B} rows for a KV cache made for {kv_cache.k[0].shape[0]}; "
                                f"make one with model.new_kv_cache(batch_size={B})")
        x = ops.embedding_forward(self.embed, tokens)                                       # (B, T, D)
        block_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = self._block_forward(x, layer, pos, kv_cache, i, dropout, dropout_seed * 1000003 + i,
                                           first_row)
            block_caches.append(cache)
        h, ln_cache = ops.layernorm_forward(x.reshape(B * T, cfg.d_model), self.norm, cfg.norm_eps)
        logits = ops.tied_logits_forward(h, self.embed)                                     # (N, V)
        if kv_cache is not None:
            kv_cache.length = pos + T
        return logits, (block_caches, ln_cache, h)

    def _tokens(self, tokens, what="tokens", shape=None):
        """tokens (or targets, of the tokens' shape) as a device array, refused with a TinyPalmError naming what
        is wrong: (B, T) integer ids in [0, vocab_size), 1 <= T <= max_seq_len. The ids' range is checked on host
        arrays only (a device array's would cost a synchronisation)."""
        if isinstance(tokens, (list, tuple)):
            try:
                tokens = numpy.asarray(tokens)
            except ValueError:
                raise TinyPalmError(f"{what}: rows of different lengths; give (batch, time) ids, every row as long") from None
            if tokens.size == 0:
                raise TinyPalmError(f"{what} must be (batch, time) with both at least 1, got an empty list")
        dtype, got_shape = getattr(tokens, "dtype", None), getattr(tokens, "shape", None)
        if dtype is None or numpy.dtype(dtype).kind not in "iu":
            raise TinyPalmError(f"{what} must be integer token ids, got {dtype if dtype is not None else type(tokens).__name__}")
        if len(got_shape) != 2 or 0 in got_shape:
            raise TinyPalmError(f"{what} must be (batch, time) with both at least 1, got shape {tuple(got_shape)}")
        if shape is not None and tuple(got_shape) != tuple(shape):
            raise TinyPalmError(f"{what} must have the tokens' shape {tuple(shape)}, got {tuple(got_shape)}")
        if got_shape[1] > self.config.max_seq_len:
            raise TinyPalmError(f"{what}: {got_shape[1]} positions, and the model sees at most max_seq_len "
                                f"{self.config.max_seq_len}; cut the sequences")
        if isinstance(tokens, numpy.ndarray) and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise TinyPalmError(f"{what}: ids from {tokens.min()} to {tokens.max()}, outside [0, "
                                f"{self.config.vocab_size}) of this model's vocabulary")
        return self.xp.asarray(tokens)

    def forward(self, tokens, kv_cache=None):
        """tokens (B, T) -> logits (B, T, V). With a KVCache, tokens continue the cached positions. On numpy,
        without a cache, the batch's rows are cut into one piece per thread (batch_threads.py)."""
        tokens = self._tokens(tokens)
        if kv_cache is None and self.split_batch is not None:
            return self.split_batch.forward(self, tokens)
        logits, _ = self._forward(tokens, kv_cache)
        return logits.reshape(*tokens.shape, -1)

    def loss(self, tokens, targets, loss_mask=None):
        """The training loss without the backward pass (for evaluation), as a Python float (read from the device);
        loss_mask as in loss_and_grads."""
        logits, targets = self.forward(tokens), self._tokens(targets, "targets", numpy.shape(tokens))
        loss_mask = self._loss_mask(loss_mask, targets)
        loss, _, _ = self._loss_forward(logits.reshape(-1, logits.shape[-1]), targets, loss_mask)
        return float(to_numpy(loss))

    def _loss_mask(self, loss_mask, targets):
        # None, or loss_mask as a device array of the targets' shape (B, T)
        if loss_mask is None:
            return None
        loss_mask = self.xp.asarray(loss_mask)
        if loss_mask.shape != targets.shape:
            raise TinyPalmError(f"loss_mask must have the targets' shape {targets.shape}, got {loss_mask.shape}")
        return loss_mask

    def _loss_forward(self, logits, targets, loss_mask):
        # (loss, cache, its backward): over every position, or the mean over those loss_mask (B, T) counts
        xp, ops, z_loss = self.xp, self.ops, self.config.z_loss
        if loss_mask is None:
            loss, cache = ops.cross_entropy_forward(xp, logits, targets.reshape(-1), z_loss)
            return loss, cache, ops.cross_entropy_backward
        loss, cache = ops.masked_cross_entropy_forward(xp, logits, targets.reshape(-1), loss_mask.reshape(-1), z_loss)
        return loss, cache, ops.masked_cross_entropy_backward

    def new_kv_cache(self, batch_size):
        return KVCache(self.xp, self.config, batch_size, self.dtype)

    # --- backward ---------------------------------------------------------------------------------------------

    def _block_backward(self, dx, layer, d_layer, cache, d_adapter=None):
        # dx (B, T, D): gradient at the block's output; accumulates into d_layer (a None member is frozen: no
        # gradient) and d_adapter (the adapters' gradients, when the model has adapters); returns the gradient
        # at its input
        cfg, ops = self.config, self.ops
        B, T, D = dx.shape
        q_dim, kv_dim = layer.q_dim, layer.kv_dim
        ln_cache, h, cos, sin, attn_cache, swiglu_cache, branches, keep, dropout, lora_in, lora_out = cache

        dy = dx.reshape(B * T, D)                                       # residual: x_out = x + y
        if keep is not None:
            dy = ops.dropout_backward(dy, dropout, keep)
        d_branches = ops.linear_backward(dy, branches, layer.w_out, d_layer.w_out)          # (N, Q+F)
        if lora_out is not None:
            self.adapter.out_backward(dy, d_branches, lora_out, d_adapter)
        d_attn, d_hidden = d_branches[:, :q_dim], d_branches[:, q_dim:]
        d_gate, d_up = ops.swiglu_backward(d_hidden, swiglu_cache)
        dq, dk, dv = ops.attention_backward(d_attn.reshape(B, T, cfg.n_heads, cfg.head_dim), attn_cache)
        dq, dk = ops.rope_backward(dq, cos, sin), ops.rope_backward(dk, cos, sin)

        d_proj = ops.concat_columns(self.xp, [dq.reshape(B * T, q_dim), dk.reshape(B * T, kv_dim),
                                              dv.reshape(B * T, kv_dim), d_gate, d_up])    # (N, Q+2K+2F)
        # h fed every projection through the fused w_in, so one matmul by w_in^T sums all their gradients at h
        dh = ops.linear_backward(d_proj, h, layer.w_in, d_layer.w_in)                       # (N, D)
        if lora_in is not None:
            self.adapter.in_backward(d_proj, dh, lora_in, d_adapter)
        dx_ln = ops.layernorm_backward(dh, layer.norm, d_layer.norm, ln_cache)
        return dx + dx_ln.reshape(B, T, D)

    def loss_and_grads(self, tokens, targets, dropout=0.0, dropout_seed=0, grads=None, loss_mask=None):
        """Mean cross-entropy plus z-loss over all positions, and its gradient for every parameter.

        tokens, targets (B, T) int. Returns (loss, grads). The loss stays on the device: a 0-d array (on numpy a
        numpy scalar, which works as a float); read it with float(), or with the gradient norm through
        backend.read_scalars, so that a training step synchronises once. grads is a Flat in the master dtype,
        canonical name -> gradient, with `.flat`. Given `grads` (from an earlier call), the gradients are added
        to it: gradient accumulation. Given loss_mask (B, T), 1 where a target counts and 0 where not, the mean
        is over the counted positions only (instruction tuning counts the responses; other non-negative values
        weigh the positions: the weighted mean). dropout: the rate, 0 <= dropout < 1. With adapters (model.adapter),
        their gradients are `grads.adapter`, a Flat like adapter.params.

        On numpy the batch's rows are cut into one piece per thread, run side by side (batch_threads.py): the
        same result up to rounding, dropout included."""
        tokens, targets = self._tokens(tokens), self._tokens(targets, "targets", numpy.shape(tokens))
        loss_mask = self._loss_mask(loss_mask, targets)
        if not 0.0 <= dropout < 1.0:                       # NaN fails too
            raise TinyPalmError(f"dropout {dropout}: give a rate from 0 up to (not including) 1")
        grads = self.grads_like() if grads is None else grads
        if self.split_batch is not None:
            return self.split_batch.loss_and_grads(self, tokens, targets, dropout, dropout_seed, grads, loss_mask)
        return self.batch_loss_and_grads(tokens, targets, dropout, dropout_seed, grads, loss_mask)

    def batch_loss_and_grads(self, tokens, targets, dropout, dropout_seed, grads, loss_mask, scale=1.0, first_row=0):
        """loss_and_grads for these rows in one pass through the model, the gradients of scale * loss added to
        grads. A piece of a batch (batch_threads.py) weighs its loss by its share of the batch, and first_row is
        its place in the batch."""
        xp, cfg, ops = self.xp, self.config, self.ops
        B, T = tokens.shape
        logits, (block_caches, ln_cache, h) = self._forward(tokens, None, dropout, dropout_seed, first_row)
        loss, ce_cache, ce_backward = self._loss_forward(logits, targets, loss_mask)

        if self.adapter is not None and getattr(grads, "adapter", None) is None:
            grads.adapter = self.adapter.grads_like()
        d_embed, d_norm = self._trained_grad(grads, "embed"), self._trained_grad(grads, "norm")
        d_layers = [LayerGrads(*(self._trained_grad(grads, name) for name in layer_storage_names(i)))
                    for i in range(cfg.n_layers)]
        dlogits = ce_backward(xp, ce_cache, cfg.z_loss)                                     # (N, V)
        if scale != 1.0:
            dlogits *= scale
        dh = ops.tied_logits_backward(dlogits, h, self.embed, d_embed)                      # (N, D)
        dx = ops.layernorm_backward(dh, self.norm, d_norm, ln_cache).reshape(B, T, cfg.d_model)
        for i in reversed(range(self._lowest_trained_layer(), cfg.n_layers)):
            extra = () if self.adapter is None else (grads.adapter,)     # the adapters' gradients, with LoRA
            dx = self._block_backward(dx, self.layers[i], d_layers[i], block_caches[i], *extra)
        if d_embed is not None:
            ops.embedding_backward(xp, d_embed, dx, tokens)
        return loss, grads

    def _lowest_trained_layer(self):
        # the backward stops below this layer: beneath it only frozen layers and a frozen embedding
        if self.adapter is not None or "embed" not in self.frozen:
            return 0
        for i in range(self.config.n_layers):
            if not self.frozen.issuperset(layer_storage_names(i)):
                return i
        return self.config.n_layers

    def _trained_grad(self, grads, name):
        # the gradient the backward accumulates into for stored array `name`, or None where it is frozen
        return None if name in self.frozen else grads.stored[name]
