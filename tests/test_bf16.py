"""bfloat16 mixed precision on numpy (ml_dtypes' bfloat16, an exact emulation of the arithmetic a GPU does).

Each op and the whole model in bf16 against float64; the dtype of every stored activation and weight copy; a short
bf16 training run against the float32 one; train.py and sample.py with --dtype bfloat16.

Tolerances. bf16 keeps 8 significant bits, so rounding to it (to nearest) has unit roundoff u = 2^-9 = 1.95e-3,
and one rounding of every element of a tensor gives a relative L2 error of about 0.85u (measured). The float64
references run on the same bf16-rounded inputs and weights, so only the arithmetic is compared, not the rounding
of the inputs. An op's bf16 output is rounded once after float32 arithmetic, plus once more for what its cache
keeps in bf16 (xhat, probabilities, sigmoid): measured 0.85u-1.2u, bound 2u (3u for attention's backward,
measured 1.8u, whose scores are large enough here to show a rounding before the softmax). Weight gradients and
the loss are accumulated in float32 from bf16 operands: measured 1e-7 and below, bound 1e-5; a bf16 rounding on
their way (an accumulation in bf16, a bf16 matmul result) would be ~1e-3. Through the whole model a gradient
passes through tens of roundings: measured 0.9%-1.1% per tensor, bound 2e-2 (the bar a GPU run is held to);
the loss measured < 6e-5 relative, bound 5e-4. The reductions are long (rows of 1024 to 8192, columns of 256
and more), so that a sum accumulated in bf16, numpy's default for bf16 arrays, lands far outside these bounds.
"""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from tinypalm import Config, PaLM, checkpoint, ops
from tinypalm.backend import read_scalars
from tinypalm.data import get_batch
from tinypalm.errors import TinyPalmError
from tinypalm.optim import AdamW, clip_grad_norm, lr_at
from gradcheck import rel_error

BF16 = np.dtype(ml_dtypes.bfloat16)
U = 2.0 ** -9
OUT_TOL, ACC_TOL = 2 * U, 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(autouse=True)
def fresh_rng():
    global rng
    rng = np.random.default_rng(7)          # the same draws whichever tests run


def pair(*shape, scale=1.0, shift=0.0):
    """The same random values as a bf16 array and (exactly) as float64."""
    x16 = (rng.standard_normal(shape) * scale + shift).astype(BF16)
    return x16, x16.astype(np.float64)


def close(got, want, dtype, tol=OUT_TOL):
    assert got.dtype == dtype, (got.dtype, dtype)
    err = rel_error(got, want)
    assert err < tol, f"relative error {err:.2e} >= {tol:.1e}"


# --- each op ---------------------------------------------------------------------------------------------------

def test_layernorm_bf16():
    (x16, x), (g16, g), (dy16, dy) = pair(256, 1024, scale=3, shift=1), pair(1024), pair(256, 1024)
    y16, cache16 = ops.layernorm_forward(x16, g16, 1e-5)
    y, cache = ops.layernorm_forward(x, g, 1e-5)
    close(y16, y, BF16)
    d_gain16, d_gain = np.zeros(1024, np.float32), np.zeros(1024)
    close(ops.layernorm_backward(dy16, g16, d_gain16, cache16), ops.layernorm_backward(dy, g, d_gain, cache), BF16)
    close(d_gain16, d_gain, np.float32)          # xhat is cached in bf16: one rounding, as for an output


def test_linear_bf16():
    (x16, x), (w16, w), (dy16, dy) = pair(256, 512), pair(512, 384, scale=0.05), pair(256, 384)
    close(ops.linear_forward(x16, w16), ops.linear_forward(x, w), BF16)
    dw16, dw = np.zeros((512, 384), np.float32), np.zeros((512, 384))
    close(ops.linear_backward(dy16, x16, w16, dw16), ops.linear_backward(dy, x, w, dw), BF16)
    close(dw16, dw, np.float32, ACC_TOL)


def test_rope_bf16():
    cos32, sin32 = (t[:, None] for t in ops.rope_tables(np, 64, 16, 10000.0, np.float32))
    cos, sin = (t[:, None] for t in ops.rope_tables(np, 64, 16, 10000.0, np.float64))
    (x16, x), (dy16, dy) = pair(2, 64, 4, 16), pair(2, 64, 4, 16)
    close(ops.rope_forward(x16, cos32, sin32), ops.rope_forward(x, cos, sin), BF16)
    close(ops.rope_backward(dy16, cos32, sin32), ops.rope_backward(dy, cos, sin), BF16)


@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2)])
def test_attention_bf16(H, Hkv):
    B, T, Dh = 2, 128, 16
    # scores of standard deviation ~4, so that rounding them to bf16 before the softmax (the wrong design) shows:
    # it measured 3.4u forward and 4.6u backward, against 1.1u and 1.8u for float32 scores
    (q16, q), (k16, k), (v16, v) = pair(B, T, H, Dh, scale=2), pair(B, T, Hkv, Dh, scale=2), pair(B, T, Hkv, Dh)
    dout16, dout = pair(B, T, H, Dh)
    out16, cache16 = ops.attention_forward(np, q16, k16, v16, ops.causal_mask(np, T, T, 0, H // Hkv, np.float32))
    out, cache = ops.attention_forward(np, q, k, v, ops.causal_mask(np, T, T, 0, H // Hkv, np.float64))
    close(out16, out, BF16)
    for got, want in zip(ops.attention_backward(dout16, cache16), ops.attention_backward(dout, cache)):
        close(got, want, BF16, 3 * U)            # dscores and probs are both rounded: two roundings, one product


def test_swiglu_and_dropout_bf16():
    (g16, g), (u16, u), (dh16, dh) = pair(256, 512, scale=2), pair(256, 512), pair(256, 512)
    hidden16, cache16 = ops.swiglu_forward(np, g16, u16)
    hidden, cache = ops.swiglu_forward(np, g, u)
    close(hidden16, hidden, BF16)
    for got, want in zip(ops.swiglu_backward(dh16, cache16), ops.swiglu_backward(dh, cache)):
        close(got, want, BF16)
    keep = ops.dropout_mask(np, (256, 512), 0.1, seed=3)
    close(ops.dropout_forward(u16, 0.1, keep), ops.dropout_forward(u, 0.1, keep), BF16)
    close(ops.dropout_backward(dh16, 0.1, keep), ops.dropout_backward(dh, 0.1, keep), BF16)


def test_tied_logits_and_cross_entropy_bf16():
    (h16, h), (e16, e), (dl16, dl) = pair(256, 128), pair(4096, 128), pair(256, 4096, scale=1e-3)
    close(ops.tied_logits_forward(h16, e16), ops.tied_logits_forward(h, e), BF16)
    d_embed16, d_embed = np.zeros((4096, 128), np.float32), np.zeros((4096, 128))
    close(ops.tied_logits_backward(dl16, h16, e16, d_embed16), ops.tied_logits_backward(dl, h, e, d_embed), BF16)
    close(d_embed16, d_embed, np.float32, ACC_TOL)

    (logits16, logits), targets = pair(256, 8192, scale=2), rng.integers(0, 8192, 256)
    loss16, cache16 = ops.cross_entropy_forward(np, logits16, targets, 1e-4)
    loss, cache = ops.cross_entropy_forward(np, logits, targets, 1e-4)
    assert loss16.dtype == np.float32 and abs(loss16 - loss) < ACC_TOL * loss
    close(ops.cross_entropy_backward(np, cache16, 1e-4), ops.cross_entropy_backward(np, cache, 1e-4), BF16)


def test_embedding_backward_bf16_accumulates_in_float32():
    tokens, (dx16, dx) = rng.integers(0, 50, (8, 64)), pair(8, 64, 128)
    d16, d = np.zeros((50, 128), np.float32), np.zeros((50, 128))
    ops.embedding_backward(np, d16, dx16, tokens)
    ops.embedding_backward(np, d, dx, tokens)
    close(d16, d, np.float32, ACC_TOL)


# --- the whole model -------------------------------------------------------------------------------------------

def bf16_and_float64(seed, **shape):
    """A bf16 model and a float64 one holding exactly its bf16 weights."""
    cfg = Config(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **shape)
    m16 = PaLM(cfg, dtype="bfloat16", seed=seed)
    m64 = PaLM(cfg, dtype="float64", seed=seed)
    m64.load_params({name: w.astype(np.float64) for name, w in m16.layout.wrap(m16.weights.flat).items()})
    return m16, m64


@pytest.mark.parametrize("n_kv_heads,dropout,masked", [(1, 0.0, False), (2, 0.2, False), (1, 0.0, True)])
def test_loss_and_every_gradient_against_float64(n_kv_heads, dropout, masked):
    m16, m64 = bf16_and_float64(seed=n_kv_heads, n_kv_heads=n_kv_heads)
    data = np.random.default_rng(n_kv_heads).integers(0, 512, (4, 65))
    x, y = data[:, :-1], data[:, 1:]
    mask = (np.random.default_rng(5).random((4, 64)) < 0.5).astype(np.int32) if masked else None
    loss16, grads16 = m16.loss_and_grads(x, y, dropout=dropout, dropout_seed=3, loss_mask=mask)
    loss64, grads64 = m64.loss_and_grads(x, y, dropout=dropout, dropout_seed=3, loss_mask=mask)
    assert loss16.dtype == np.float32 and abs(loss16 - loss64) < 5e-4 * loss64, (loss16, loss64)
    assert grads16.flat.dtype == np.float32 and set(grads16) == set(grads64)
    for name in grads64:
        err = rel_error(grads16[name], grads64[name])
        assert err < 2e-2, (name, err)


def test_lora_bf16_keeps_float32_matrices_and_gradients():
    # the adapters as the model's weights: float32 matrices (AdamW's), a bf16 copy for the products, refreshed
    # by model.params_updated(); loss and adapter gradients against float64 on the same bf16-rounded values
    from tinypalm.lora import LoRA
    m16, m64 = bf16_and_float64(seed=3)
    m16.adapter = LoRA(m16.config, 4, targets=("wq", "wv", "w_down"), dtype="bfloat16", seed=1)
    assert m16.adapter.params.flat.dtype == np.float32 and m16.adapter.weights.flat.dtype == BF16
    for name, p in m16.adapter.params.items():
        if name.endswith(".B"):
            p[...] = rng.standard_normal(p.shape) * 0.1
    m16.params_updated()
    np.testing.assert_array_equal(m16.adapter.weights.flat, m16.adapter.params.flat.astype(BF16))
    m64.adapter = LoRA(m64.config, 4, targets=("wq", "wv", "w_down"), dtype="float64")
    m64.adapter.params.flat[...] = m16.adapter.weights.flat.astype(np.float64)
    data = np.random.default_rng(4).integers(0, 512, (4, 33))
    loss16, grads16 = m16.loss_and_grads(data[:, :-1], data[:, 1:])
    loss64, grads64 = m64.loss_and_grads(data[:, :-1], data[:, 1:])
    assert abs(loss16 - loss64) < 5e-4 * loss64, (loss16, loss64)
    assert grads16.adapter.flat.dtype == np.float32
    for name in grads64.adapter:
        err = rel_error(grads16.adapter[name], grads64.adapter[name])
        assert err < 2e-2, (name, err)
    # a step moves the float32 matrices by less than bf16 can hold; the copy follows them after params_updated
    before = m16.adapter.params.flat.copy()
    AdamW(m16.adapter.params).step(m16.adapter.params, grads16.adapter, lr=1e-5)
    assert np.any(m16.adapter.params.flat != before)
    m16.params_updated()
    np.testing.assert_array_equal(m16.adapter.weights.flat, m16.adapter.params.flat.astype(BF16))


def test_bf16_model_that_does_not_train_keeps_no_master(tmp_path):
    # trains=False (sampling, evaluating, LoRA's base): the bf16 copy alone, 2 bytes a parameter, computing exactly
    # what the model with a float32 master computes; its host arrays still come out float32
    cfg = Config.preset("tiny", max_seq_len=16, vocab_size=257)                 # the byte tokenizer's vocabulary
    trained = PaLM(cfg, dtype="bfloat16", seed=5)
    frozen = PaLM(cfg, dtype="bfloat16", params=trained.params_numpy(), trains=False)
    assert frozen.params is frozen.weights and frozen.params.flat.dtype == BF16
    assert frozen.params.flat.nbytes == 2 * cfg.n_params()
    with pytest.raises(TinyPalmError, match="trains=True"):           # nothing to update in float32
        AdamW(frozen.params)
    np.testing.assert_array_equal(frozen.weights.flat, trained.weights.flat)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    np.testing.assert_array_equal(frozen.forward(tokens), trained.forward(tokens))
    host = frozen.params_numpy()
    assert all(a.dtype == np.float32 for a in host.values())
    for name, a in trained.params_numpy().items():
        np.testing.assert_array_equal(host[name], a.astype(BF16).astype(np.float32), err_msg=name)
    # the loaders used for inference build it so
    from tinypalm.loading import load_model
    from tinypalm.tokenizer import ByteTokenizer
    checkpoint.save(str(tmp_path / "m.npz"), trained, ByteTokenizer(), 0)
    model, _, _ = load_model(str(tmp_path / "m.npz"), dtype="bfloat16", trains=False)
    assert model.params is model.weights
    np.testing.assert_array_equal(model.forward(tokens), trained.forward(tokens))


def test_dtype_audit():
    # master weights, gradients and optimizer moments float32; the weights the ops read, every activation the
    # backward keeps and the KV cache bf16; LayerNorm's rstd, the loss's probabilities, the rotary tables and the
    # attention mask float32 (the compute dtype); the loss's log_z in the logits' dtype (it only scales z-loss)
    model = PaLM(Config.preset("tiny", max_seq_len=16), dtype="bfloat16", seed=0)
    assert model.dtype == BF16 and model.master_dtype == np.float32
    assert model.params.flat.dtype == np.float32 and model.weights.flat.dtype == BF16
    assert all(p.dtype == np.float32 for p in model.params.values())
    assert model.embed.dtype == model.norm.dtype == BF16
    assert all(a.dtype == BF16 for layer in model.layers for a in (layer.norm, layer.w_in, layer.w_out))
    assert model.rope_cos.dtype == model.rope_sin.dtype == np.float32
    np.testing.assert_array_equal(model.weights.flat, model.params.flat.astype(BF16))

    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    logits, (block_caches, (final_xhat, final_rstd), h) = model._forward(model.xp.asarray(tokens), None, 0.1, 1)
    assert logits.dtype == final_xhat.dtype == h.dtype == BF16 and final_rstd.dtype == np.float32
    for (xhat, rstd), h, cos, sin, attn, swiglu, branches, keep, rate, *adapter_caches in block_caches:
        qg, kt, vt, probs, _ = attn
        assert all(a.dtype == BF16 for a in (xhat, h, qg, kt, vt, probs, *swiglu, branches))
        assert rstd.dtype == cos.dtype == sin.dtype == np.float32 and keep.dtype == np.bool_
    assert model._mask(12, 12, 0).dtype == np.float32
    _, (ce_probs, log_z, _) = model.ops.cross_entropy_forward(np, logits.reshape(-1, 256), tokens.reshape(-1), 1e-4)
    assert ce_probs.dtype == np.float32 and log_z.dtype == BF16
    cache = model.new_kv_cache(1)
    model.forward(tokens[:1, :3], cache)
    assert all(a.dtype == BF16 for a in cache.k + cache.v)

    loss, grads = model.loss_and_grads(tokens, tokens)
    assert loss.dtype == np.float32 and grads.flat.dtype == np.float32
    opt = AdamW(model.params)
    assert opt.m.flat.dtype == opt.v.flat.dtype == np.float32
    opt.step(model.params, grads, 1e-2)
    assert not np.array_equal(model.weights.flat, model.params.flat.astype(BF16))    # stale until told
    model.params_updated()
    np.testing.assert_array_equal(model.weights.flat, model.params.flat.astype(BF16))


def training_curve(dtype, tokens, steps):
    model = PaLM(Config.preset("tiny"), dtype=dtype, seed=0)
    opt = AdamW(model.params)
    losses = []
    for step in range(steps):
        x, y = get_batch(tokens, 8, 32, 0, step)
        loss, grads = model.loss_and_grads(x, y)
        loss, _ = read_scalars(model.xp, loss, clip_grad_norm(grads, 1.0))
        opt.step(model.params, grads, lr_at(step, 3e-3, 3e-4, 5, steps))
        model.params_updated()
        losses.append(loss)
    return np.array(losses)


def test_bf16_training_tracks_float32():
    # measured over 60 steps: the curves never differ by more than 0.0043 (loss ~3.1 to 6.0)
    from tinypalm.data import default_corpus
    corpus, _ = default_corpus()
    text = corpus.encode() if isinstance(corpus, str) else corpus
    tokens = np.frombuffer(text[:100_000], dtype=np.uint8).astype(np.int64)
    f32, bf16 = training_curve("float32", tokens, 20), training_curve("bfloat16", tokens, 20)
    assert f32[-5:].mean() < 0.7 * f32[0]                  # it learns
    assert np.abs(bf16 - f32).max() < 0.02, np.abs(bf16 - f32)


# --- the programs ----------------------------------------------------------------------------------------------

def run(script, *args, cwd):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result


def train_losses(out):
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["split"] == "train"]


def test_train_bf16_tracks_float32_then_samples_in_any_dtype(tmp_path):
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400)
    for dtype in ("float32", "bfloat16"):
        run("train.py", "--data", "text.txt", "--preset", "tiny", "--batch-size", "4", "--seq-len", "16",
            "--max-steps", "10", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "10", "--eval-steps", "1",
            "--log-every", "1", "--sample-tokens", "0", "--dtype", dtype, "--out", dtype, cwd=tmp_path)
    f32, bf16 = train_losses(tmp_path / "float32"), train_losses(tmp_path / "bfloat16")
    assert len(f32) == len(bf16) == 10 and f32[-1] < 0.3 * f32[0]
    assert max(abs(a - b) for a, b in zip(f32, bf16)) < 0.05, (f32, bf16)       # measured: 0.007
    ck = checkpoint.load(str(tmp_path / "bfloat16" / "last.npz"), optimizer=True)
    assert ck.meta["dtype"] == "bfloat16" and ck.train_args["dtype"] == "bfloat16"
    assert all(p.dtype == np.float32 for p in ck.params.values())              # the master weights
    assert all(v.dtype == np.float32 for k, v in ck.opt_state.items() if k != "step")
    for ckpt, dtype in (("bfloat16", None), ("bfloat16", "float32"), ("float32", "bfloat16")):
        text = run("sample.py", "--ckpt", ckpt, "--temperature", "0", "--max-new-tokens", "12",
                   *(["--dtype", dtype] if dtype else []), cwd=tmp_path).stdout
        assert len(text) > 12


def test_lora_bf16_run_resumes_exactly_and_its_adapter_loads(tmp_path):
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400)
    common = ["--data", "text.txt", "--preset", "tiny", "--batch-size", "4", "--seq-len", "16", "--eval-every", "3",
              "--eval-steps", "1", "--log-every", "3", "--sample-tokens", "0", "--dtype", "bfloat16"]
    run("train.py", *common, "--max-steps", "3", "--out", "base", cwd=tmp_path)
    lora = [*common, "--init-from", "base/last.npz", "--lora-rank", "2", "--lr", "1e-2", "--decay-steps", "6"]
    run("train.py", *lora, "--max-steps", "3", "--out", "a", cwd=tmp_path)
    run("train.py", "--resume", "--out", "a", "--max-steps", "6", cwd=tmp_path)
    run("train.py", *lora, "--max-steps", "6", "--out", "b", cwd=tmp_path)
    with np.load(tmp_path / "a" / "adapter_last.npz") as a, np.load(tmp_path / "b" / "adapter_last.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            if key != "meta":
                assert a[key].dtype == np.float32 or key == "opt.step", key     # the file holds float32, not bf16
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for dtype in ("bfloat16", "float32"):
        text = run("sample.py", "--ckpt", "base/last.npz", "--adapter", "a", "--dtype", dtype, "--temperature", "0",
                   "--max-new-tokens", "8", cwd=tmp_path).stdout
        assert len(text) > 8


def test_bfloat16_without_ml_dtypes_is_a_one_line_error(tmp_path):
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "ml_dtypes.py").write_text("raise ImportError('ml_dtypes is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dtype", "bfloat16", "--preset", "tiny",
                             "--max-steps", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install ml_dtypes" in lines[0], result.stderr
