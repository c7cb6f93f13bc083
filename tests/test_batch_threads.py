"""A batch cut into one piece per thread (batch_threads.py) gives the loss and gradients of the whole batch."""

import threading
import warnings

import numpy as np
import pytest

from tinypalm import Config, PaLM, batch_threads, cpu_ops
from tinypalm.lora import LoRA

CFG = Config(vocab_size=29, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def model_and_batch(B=7, T=9, dtype="float64"):
    model = PaLM(CFG, dtype=dtype, seed=3)
    rng = np.random.default_rng(B * 100 + T)
    return model, rng.integers(0, 29, (B, T)), rng.integers(0, 29, (B, T))


def with_threads(monkeypatch, n):
    monkeypatch.setattr(cpu_ops, "pool", cpu_ops.ChunkPool(n))


def whole_batch(model, *args, **kwargs):
    # the same call with the batch in one piece
    split, model.split_batch = model.split_batch, None
    try:
        return model.loss_and_grads(*args, **kwargs)
    finally:
        model.split_batch = split


@pytest.mark.parametrize("threads", [2, 3, 7, 16])             # 7 rows: uneven pieces; 16: one row per piece
def test_pieces_give_the_whole_batch(monkeypatch, threads):
    with_threads(monkeypatch, threads)
    model, tokens, targets = model_and_batch()
    assert len(batch_threads.pieces(len(tokens))) == min(threads, 7)
    loss, grads = model.loss_and_grads(tokens, targets)
    loss_ref, grads_ref = whole_batch(model, tokens, targets)
    assert loss == pytest.approx(float(loss_ref), rel=1e-13)
    np.testing.assert_allclose(grads.flat, grads_ref.flat, rtol=1e-11, atol=1e-13)


def test_loss_mask_weighs_pieces_by_their_counted_positions(monkeypatch):
    # piece 0 counts one position, piece 1 none at all, piece 2 many: the mean is over all counted positions
    with_threads(monkeypatch, 3)
    model, tokens, targets = model_and_batch(B=6)
    mask = np.zeros(tokens.shape)
    mask[0, 3] = 1
    mask[4:, 2:] = 1
    loss, grads = model.loss_and_grads(tokens, targets, loss_mask=mask)
    loss_ref, grads_ref = whole_batch(model, tokens, targets, loss_mask=mask)
    assert loss == pytest.approx(float(loss_ref), rel=1e-13)
    np.testing.assert_allclose(grads.flat, grads_ref.flat, rtol=1e-11, atol=1e-13)


def test_gradients_accumulate_into_the_callers_buffer(monkeypatch):
    with_threads(monkeypatch, 2)
    model, tokens, targets = model_and_batch()
    _, once = whole_batch(model, tokens, targets)
    _, grads = model.loss_and_grads(tokens, targets)
    model.loss_and_grads(tokens[::-1], targets[::-1], grads=grads)       # other pieces, the same batch
    np.testing.assert_allclose(grads.flat, 2 * once.flat, rtol=1e-11, atol=1e-13)


def test_lora_adapter_gradients(monkeypatch):
    with_threads(monkeypatch, 2)
    model, tokens, targets = model_and_batch()
    model.adapter = LoRA(model.config, 2, targets="wq,wv,w_down", dtype="float64", seed=0)
    model.adapter.params.flat[...] = np.random.default_rng(0).standard_normal(model.adapter.params.flat.size) * 0.1
    _, grads = model.loss_and_grads(tokens, targets)
    _, grads_ref = whole_batch(model, tokens, targets)
    np.testing.assert_allclose(grads.adapter.flat, grads_ref.adapter.flat, rtol=1e-11, atol=1e-13)
    _, again = model.loss_and_grads(tokens, targets)                      # the pieces' buffers are reused
    np.testing.assert_array_equal(again.adapter.flat, grads.adapter.flat)


@pytest.mark.parametrize("threads", [2, 3])
def test_dropout_pieces_draw_their_rows_of_the_batchs_mask(monkeypatch, threads):
    with_threads(monkeypatch, threads)
    model, tokens, targets = model_and_batch()
    loss, grads = model.loss_and_grads(tokens, targets, dropout=0.3, dropout_seed=5)
    loss_ref, grads_ref = whole_batch(model, tokens, targets, dropout=0.3, dropout_seed=5)
    assert loss == pytest.approx(float(loss_ref), rel=1e-13)
    np.testing.assert_allclose(grads.flat, grads_ref.flat, rtol=1e-11, atol=1e-13)


def test_same_threads_same_bits(monkeypatch):
    # the pieces' gradients are added in piece order, whichever thread finished first
    with_threads(monkeypatch, 3)
    model, tokens, targets = model_and_batch(dtype="float32")
    runs = [model.loss_and_grads(tokens, targets, dropout=0.2, dropout_seed=5) for _ in range(5)]
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        np.testing.assert_array_equal(grads.flat, runs[0][1].flat)


def test_work_inside_a_pool_task_runs_inline_with_the_callers_numpy_settings():
    pool = cpu_ops.ChunkPool(3)
    seen = {}

    def inner(task):
        seen.setdefault(task[0], set()).add(threading.get_ident())
        np.float32(1e30) * np.float32(1e30)                  # overflows: a warning unless errstate says ignore

    def outer(i):
        pool.run(inner, [(i, j) for j in range(8)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="ignore"):
            pool.run(outer, range(6))
    assert sorted(seen) == list(range(6))
    assert all(len(threads) == 1 for threads in seen.values())     # each outer task's inner tasks: one thread


@pytest.mark.parametrize("threads", [2, 3])
def test_forward_in_pieces(monkeypatch, threads):
    with_threads(monkeypatch, threads)
    model, tokens, _ = model_and_batch()
    logits = model.forward(tokens)
    split, model.split_batch = model.split_batch, None
    np.testing.assert_allclose(logits, model.forward(tokens), rtol=1e-12, atol=1e-12)
    model.split_batch = split
    cache = model.new_kv_cache(len(tokens))                  # with a cache: the batch in one piece, as always
    np.testing.assert_allclose(model.forward(tokens[:, :4], cache), logits[:, :4], rtol=1e-12, atol=1e-12)


def test_weighted_loss_mask_is_the_same_in_pieces_and_in_model_loss(monkeypatch):
    # weights that sum to less than 1 per piece: the pieces' shares, the whole batch and model.loss agree
    with_threads(monkeypatch, 3)
    model, tokens, targets = model_and_batch(B=6)
    mask = np.random.default_rng(1).uniform(0, 0.05, tokens.shape)
    loss, grads = model.loss_and_grads(tokens, targets, loss_mask=mask)
    loss_ref, grads_ref = whole_batch(model, tokens, targets, loss_mask=mask)
    assert loss == pytest.approx(float(loss_ref), rel=1e-13) == pytest.approx(float(model.loss(tokens, targets, mask)))
    np.testing.assert_allclose(grads.flat, grads_ref.flat, rtol=1e-11, atol=1e-13)


def test_threads_sharing_a_model_get_their_own_gradients(monkeypatch):
    # two threads calling loss_and_grads on one model at once: each gets its batch's gradients, as alone
    with_threads(monkeypatch, 2)
    model, tokens, targets = model_and_batch(B=6)
    batches = [(tokens, targets), (targets, tokens)]
    alone = [whole_batch(model, *b)[1].flat.copy() for b in batches]
    errors = []

    def call(i):
        for _ in range(5):
            got = model.loss_and_grads(*batches[i])[1].flat
            errors.append(float(np.abs(got - alone[i]).max()))
    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 10 and max(errors) < 1e-12


def test_piece_buffers_follow_what_is_frozen(monkeypatch):
    # wholly frozen (LoRA), then nothing frozen: the kept piece buffers are made again for the new layout
    with_threads(monkeypatch, 2)
    model, tokens, targets = model_and_batch(B=4)
    model.adapter = LoRA(CFG, rank=2, xp=np, dtype="float64")
    model.frozen = frozenset(model.params.stored)
    model.loss_and_grads(tokens, targets)
    model.adapter, model.frozen = None, frozenset()
    loss, grads = model.loss_and_grads(tokens, targets)
    loss_ref, grads_ref = whole_batch(model, tokens, targets)
    np.testing.assert_allclose(grads.flat, grads_ref.flat, rtol=1e-11, atol=1e-13)
