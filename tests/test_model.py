"""The whole model: every parameter's gradient against finite differences, causality, init, KV cache."""

import re

import numpy as np
import pytest

from tinypalm import Config, PaLM
from tinypalm.model import param_shapes
from gradcheck import numerical_grad, rel_error

SHAPES = {
    "multi-query": dict(n_heads=4, n_kv_heads=1),
    "grouped-query": dict(n_heads=4, n_kv_heads=2),
    "multi-head": dict(n_heads=4, n_kv_heads=4),
    "odd head_dim and d_ff": dict(n_heads=2, n_kv_heads=1, head_dim=6, d_ff=37),
}


def small_model(z_loss=1e-4, **shape):
    shape = {**SHAPES["multi-query"], **shape}
    cfg = Config(vocab_size=13, d_model=16, n_layers=2, max_seq_len=8, z_loss=z_loss, **shape)
    return PaLM(cfg, dtype="float64", seed=3)


def batch(model, B=2, T=5, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.config.vocab_size, (B, T))
    tokens[0, :3] = 4                                   # repeated tokens exercise the embedding's add.at
    return tokens, rng.integers(0, model.config.vocab_size, (B, T))


def check_all_grads(model, tokens, targets, **loss_kwargs):
    loss, grads = model.loss_and_grads(tokens, targets, **loss_kwargs)
    assert set(grads) == set(model.params)
    f = lambda: model.loss_and_grads(tokens, targets, **loss_kwargs)[0]
    rng = np.random.default_rng(0)
    for name, p in model.params.items():
        assert grads[name].shape == p.shape
        # every element of small tensors; a random sample of larger ones (but always more than a handful)
        idx = None if p.size <= 64 else rng.choice(p.size, 48, replace=False)
        numeric = numerical_grad(f, p, indices=idx)
        analytic = grads[name].reshape(-1) if idx is None else grads[name].reshape(-1)[idx]
        numeric = numeric.reshape(-1) if idx is None else numeric.reshape(-1)[idx]
        assert np.linalg.norm(numeric) > 0, name
        assert rel_error(analytic, numeric) < 1e-6, (name, rel_error(analytic, numeric))
        # and the whole tensor at once along a random direction
        u = rng.standard_normal(p.shape)
        eps, saved = 1e-5, p.copy()
        p += eps * u
        plus = f()
        p[...] = saved - eps * u
        minus = f()
        p[...] = saved
        directional = (plus - minus) / (2 * eps)
        assert abs(directional - (grads[name] * u).sum()) < 1e-6 * max(1.0, abs(directional)), name


@pytest.mark.parametrize("shape", SHAPES)
def test_every_gradient(shape):
    model = small_model(**SHAPES[shape])
    check_all_grads(model, *batch(model))


def test_every_gradient_without_z_loss():
    model = small_model(z_loss=0.0, **SHAPES["multi-query"])
    check_all_grads(model, *batch(model))


def test_every_gradient_with_dropout():
    model = small_model(**SHAPES["grouped-query"])
    check_all_grads(model, *batch(model), dropout=0.3, dropout_seed=5)


def test_z_loss_changes_the_loss():
    model = small_model()
    tokens, targets = batch(model)
    with_z, _ = model.loss_and_grads(tokens, targets)
    model.config.z_loss = 0.0
    without_z, _ = model.loss_and_grads(tokens, targets)
    log_z = np.log(np.exp(model.forward(tokens)).sum(-1))
    np.testing.assert_allclose(with_z - without_z, 1e-4 * np.mean(log_z ** 2), rtol=1e-9)


def test_dropout_is_deterministic_per_seed_and_off_by_default():
    model = small_model()
    tokens, targets = batch(model)
    plain, _ = model.loss_and_grads(tokens, targets)
    a, _ = model.loss_and_grads(tokens, targets, dropout=0.5, dropout_seed=1)
    b, _ = model.loss_and_grads(tokens, targets, dropout=0.5, dropout_seed=1)
    c, _ = model.loss_and_grads(tokens, targets, dropout=0.5, dropout_seed=2)
    assert a == b and a != c and a != plain


def test_causality():
    model = small_model()
    tokens, _ = batch(model, T=7)
    logits = model.forward(tokens)
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1) % model.config.vocab_size
    new_logits = model.forward(changed)
    np.testing.assert_array_equal(new_logits[:, :4], logits[:, :4])
    assert np.abs(new_logits[:, 4:] - logits[:, 4:]).max() > 1e-6


def test_forward_matches_the_paper_formula_by_hand():
    # one layer written out with numpy alone from the canonical weights
    model = small_model(n_heads=2, n_kv_heads=1)
    cfg, P = model.config, model.params
    tokens, _ = batch(model, B=1, T=4)

    def ln(x, g):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.norm_eps) * g

    def rope(x, pos):     # x (Dh,)
        h = x.size // 2
        ang = pos * cfg.rope_base ** (-2 * np.arange(h) / x.size)
        c, s = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
        return x * c + np.concatenate([-x[h:], x[:h]]) * s

    x = P["embed"][tokens[0]]
    T, Dh = x.shape[0], cfg.head_dim
    for i in range(cfg.n_layers):
        L = {k: P[f"layers.{i}.{k}"] for k in ("norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
        h = ln(x, L["norm"])
        q, k, v = h @ L["wq"], h @ L["wk"], h @ L["wv"]
        heads = []
        for hd in range(cfg.n_heads):
            qh = np.stack([rope(q[t, hd * Dh:(hd + 1) * Dh], t) for t in range(T)])
            kh = np.stack([rope(k[t], t) for t in range(T)])
            s = qh @ kh.T / np.sqrt(Dh) + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v)
        gate = h @ L["w_gate"]
        x = x + np.concatenate(heads, -1) @ L["wo"] + (gate / (1 + np.exp(-gate)) * (h @ L["w_up"])) @ L["w_down"]
    logits = ln(x, P["norm"]) @ P["embed"].T / np.sqrt(cfg.d_model)
    np.testing.assert_allclose(model.forward(tokens)[0], logits, rtol=1e-10, atol=1e-12)


def test_init_distribution_and_seed():
    cfg = Config(vocab_size=300, d_model=64, n_layers=2, n_heads=4, max_seq_len=16)
    a, b = PaLM(cfg, seed=1), PaLM(cfg, seed=1)
    c = PaLM(cfg, seed=2)
    assert list(a.params) == list(param_shapes(cfg))
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["layers.0.wq"], c.params["layers.0.wq"])
    assert abs(a.params["embed"].std() - 1.0) < 0.02
    assert abs(a.params["layers.0.w_down"].std() - 1 / np.sqrt(cfg.d_ff)) < 0.1 / np.sqrt(cfg.d_ff)
    assert abs(a.params["layers.1.wo"].std() - 1 / np.sqrt(64)) < 0.1 / 8
    np.testing.assert_array_equal(a.params["layers.0.norm"], 1.0)
    assert a.params["embed"].dtype == np.float32


def test_params_are_views_of_the_storage():
    model = small_model()
    model.params["layers.1.wk"][0, 0] = 42.0
    q_dim = model.config.n_heads * model.config.head_dim
    assert model.layers[1].w_in[0, q_dim] == 42.0


def test_kv_cache_gives_the_same_logits_as_the_full_forward():
    model = small_model(**SHAPES["grouped-query"])
    tokens, _ = batch(model, T=8)
    full = model.forward(tokens)
    cache = model.new_kv_cache(batch_size=2)
    chunks = [model.forward(tokens[:, :3], cache)]                    # a prompt, then one token at a time
    chunks += [model.forward(tokens[:, t:t + 1], cache) for t in range(3, 8)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-10, atol=1e-12)


def test_overfits_one_batch():
    from tinypalm.optim import AdamW
    model = PaLM(Config.preset("tiny"), dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 33))
    tokens, targets = data[:, :-1], data[:, 1:]
    opt = AdamW(model.params, weight_decay=0.0)
    first, _ = model.loss_and_grads(tokens, targets)
    for _ in range(150):
        loss, grads = model.loss_and_grads(tokens, targets)
        opt.step(model.params, grads, lr=3e-3)
    assert first > 4.0 and loss < 0.1 * first, (first, loss)


def test_all_parameters_live_in_one_flat_vector():
    model = small_model()
    flat = model.params.flat
    assert flat.ndim == 1 and flat.size == model.config.n_params()
    for name, p in model.params.items():
        assert np.shares_memory(p, flat), name
    flat[:] = 0.5
    assert (model.params["layers.1.w_up"] == 0.5).all() and (model.layers[0].w_out == 0.5).all()


def test_gradients_accumulate_into_a_given_buffer():
    model = small_model()
    (t1, y1), (t2, y2) = batch(model, T=6, seed=1), batch(model, T=6, seed=2)
    _, g1 = model.loss_and_grads(t1, y1)
    _, g2 = model.loss_and_grads(t2, y2)
    _, both = model.loss_and_grads(t1, y1)
    _, both = model.loss_and_grads(t2, y2, grads=both)
    np.testing.assert_allclose(both.flat, g1.flat + g2.flat, rtol=1e-12, atol=1e-14)
    assert np.shares_memory(both["layers.0.wq"], both.flat)


FROZEN = frozenset({"embed", "layers.0.w_in", "layers.1.norm", "layers.1.w_out", "norm"})


@pytest.mark.parametrize("ops_kind", ["cpu twins, batch in pieces", "cpu twins, one piece", "ops.py"])
def test_frozen_arrays_get_no_gradient_and_the_others_the_same(ops_kind, monkeypatch):
    # model.frozen: the backward skips those arrays' gradients (their entries are left as they are) and makes
    # every other one exactly as without it
    from tinypalm import batch_threads, cpu_ops, ops
    model = small_model()
    if ops_kind != "cpu twins, batch in pieces":
        model.split_batch = None
    if ops_kind == "ops.py":
        model.ops = ops
    products = []                                     # the twins' weight-gradient products
    weight_grad_tasks = cpu_ops._weight_grad_tasks
    monkeypatch.setattr(cpu_ops, "_weight_grad_tasks", lambda *a, **k: products.append(1) or weight_grad_tasks(*a, **k))
    tokens, targets = batch(model, B=3, T=6)
    _, full = model.loss_and_grads(tokens, targets)
    unfrozen_products, products[:] = len(products), []
    model.frozen = FROZEN
    grads = model.grads_like()
    for name in FROZEN:
        grads.stored[name][...] = 7.0
    _, grads = model.loss_and_grads(tokens, targets, grads=grads)
    if ops_kind != "ops.py":                          # embed (tied logits), layers.0.w_in, layers.1.w_out: 3 a piece
        pieces = len(batch_threads.pieces(len(tokens))) if model.split_batch is not None else 1
        assert len(products) == unfrozen_products - 3 * pieces
    for name, g in grads.stored.items():
        if name in FROZEN:
            assert (g == 7.0).all(), name
        else:
            np.testing.assert_allclose(g, full.stored[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_the_backward_stops_above_frozen_bottom_layers(monkeypatch):
    # --freeze-layers 1: the embedding and layer 0 frozen, so nothing below layer 1 needs a gradient
    from tinypalm.model import layer_storage_names
    model = PaLM(Config(vocab_size=13, d_model=16, n_layers=3, max_seq_len=8, n_heads=4, n_kv_heads=1), dtype="float64",
                 seed=3)
    tokens, targets = batch(model, B=3, T=6)
    _, full = model.loss_and_grads(tokens, targets)
    ran = []
    block_backward = model._block_backward
    monkeypatch.setattr(model, "_block_backward", lambda dx, layer, *a: ran.append(model.layers.index(layer))
                        or block_backward(dx, layer, *a))
    model.frozen = frozenset(["embed", *layer_storage_names(0)])
    _, grads = model.loss_and_grads(tokens, targets)
    assert sorted(set(ran)) == [1, 2]
    for name, g in grads.stored.items():
        if name in model.frozen:
            assert not g.any(), name
        else:
            np.testing.assert_allclose(g, full.stored[name], rtol=1e-12, atol=1e-15, err_msg=name)
    ran.clear()
    model.frozen = frozenset(["layers.0.norm", *layer_storage_names(1)])     # the embedding trains: all the way down
    model.loss_and_grads(tokens, targets)
    assert sorted(set(ran)) == [0, 1, 2]


@pytest.mark.parametrize("tokens,targets,words", [
    ([[1, -1]], None, "tokens: ids from -1 to 1, outside [0, 256)"),
    ([[1, 256]], None, "tokens: ids from 1 to 256, outside [0, 256)"),
    (np.zeros((1, 4), np.float32), None, "tokens must be integer token ids, got float32"),
    (np.zeros((0, 4), int), None, "tokens must be (batch, time) with both at least 1, got shape (0, 4)"),
    (np.zeros(4, int), None, "got shape (4,)"),
    (np.zeros((1, 65), int), None, "65 positions, and the model sees at most max_seq_len 64"),
    (np.zeros((2, 4), int), np.zeros((1, 4), int), "targets must have the tokens' shape (2, 4), got (1, 4)"),
    (np.zeros((1, 4), int), np.full((1, 4), -1), "targets: ids from -1 to -1"),
    (np.zeros((1, 4), int), np.zeros((1, 4)), "targets must be integer token ids, got float64"),
    ([[1, 2, 3], [1, 2]], None, "tokens: rows of different lengths"),
    ([], None, "tokens must be (batch, time) with both at least 1, got an empty list"),
])
def test_bad_tokens_and_targets_are_named(tokens, targets, words):
    from tinypalm import TinyPalmError
    model = PaLM(Config.preset("tiny"), dtype="float64")
    with pytest.raises(TinyPalmError, match=re.escape(words)):
        if targets is None:
            model.forward(tokens)
        else:
            model.loss_and_grads(tokens, targets)


def test_assigning_a_parameter_copies_it_into_the_model():
    from tinypalm import TinyPalmError
    model = PaLM(Config.preset("tiny"), dtype="float64")
    tokens = np.random.default_rng(0).integers(0, 256, (1, 8))
    new = np.random.default_rng(1).standard_normal(model.params["layers.0.wq"].shape)
    model.params["layers.0.wq"] = new
    twin = PaLM(Config.preset("tiny"), dtype="float64", params={**model.params, "layers.0.wq": new})
    np.testing.assert_array_equal(model.params["layers.0.wq"], new)
    np.testing.assert_array_equal(model.forward(tokens), twin.forward(tokens))   # the model reads the new values
    with pytest.raises(TinyPalmError, match="not one of these arrays"):
        model.params["layers.9.wq"] = new
    with pytest.raises(TinyPalmError, match=r"the value given is \(3,\)"):
        model.params["embed"] = np.zeros(3)


def test_load_params_and_the_kv_cache_refuse_what_does_not_fit():
    from tinypalm import TinyPalmError
    model = PaLM(Config.preset("tiny", max_seq_len=16), dtype="float64")
    arrays = dict(model.params_numpy())
    with pytest.raises(TinyPalmError, match="load_params: no array for embed"):
        model.load_params({k: v for k, v in arrays.items() if k != "embed"})
    with pytest.raises(TinyPalmError, match="load_params: layers.9.wq is not a parameter of this model"):
        model.load_params({**arrays, "layers.9.wq": arrays["layers.0.wq"]})
    with pytest.raises(TinyPalmError, match=r"load_params: embed has shape \(1, 64\)"):
        model.load_params({**arrays, "embed": arrays["embed"][:1]})      # would broadcast silently
    cache = model.new_kv_cache(batch_size=1)
    model.forward(np.zeros((1, 10), dtype=np.int64), cache)
    with pytest.raises(TinyPalmError, match="10 cached positions and 7 more exceed the model's max_seq_len 16"):
        model.forward(np.zeros((1, 7), dtype=np.int64), cache)
    with pytest.raises(TinyPalmError, match="a batch of 2 rows for a KV cache made for 1"):
        model.forward(np.zeros((2, 1), dtype=np.int64), model.new_kv_cache(batch_size=1))


def test_misuse_of_the_python_api_is_named():
    from tinypalm import TinyPalmError
    model = PaLM(Config.preset("tiny"), dtype="float64")
    x = np.zeros((2, 4), int)
    for rate in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(TinyPalmError, match=re.escape(f"dropout {rate}: give a rate from 0 up to")):
            model.loss_and_grads(x, x, dropout=rate)
    with pytest.raises(TinyPalmError, match="layers.0.wq: not stored arrays of this model.*wq, wk, wv, w_gate and w_up "
                                            "live in w_in"):
        model.frozen = {"layers.0.wq"}
    for bad, words in (({0}, "['0'] are not names"), (None, "not None")):
        with pytest.raises(TinyPalmError, match=re.escape(words)):
            model.frozen = bad
    model.frozen = ["embed", "layers.1.w_out"]                      # any collection of storage names
    assert model.frozen == frozenset({"embed", "layers.1.w_out"})


def test_params_numpy_is_a_snapshot():
    for dtype in ("float32", "float64"):
        model = PaLM(Config.preset("tiny"), dtype=dtype)
        snap = model.params_numpy()
        before = snap["embed"].copy()
        model.params["embed"] *= 0
        np.testing.assert_array_equal(snap["embed"], before)
