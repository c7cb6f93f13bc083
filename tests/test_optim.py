"""AdamW against a step-by-step hand computation, decay and freezing, clipping, and the schedule."""

import math

import numpy as np
import pytest

from tinypalm.flat import flatten
from tinypalm.optim import AdamW, clip_grad_norm, decays, lr_at, update_runs


def make_params(rng):
    return flatten(np, {"embed": rng.standard_normal((3, 2)), "layers.0.norm": rng.standard_normal(2),
                        "layers.0.wq": rng.standard_normal((2, 2)), "layers.0.w_down": rng.standard_normal((4, 2)),
                        "norm": rng.standard_normal(2)})


def grads_for(params, make):
    grads = params.zeros_like()
    for name, g in grads.items():
        g[...] = make(g.shape)
    return grads


def test_which_parameters_decay():
    assert decays("layers.3.wq") and decays("layers.0.w_down")
    assert not decays("layers.3.norm") and not decays("norm") and not decays("embed")


def test_adamw_matches_hand_computation():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    ref = {k: [float(x) for x in v.reshape(-1)] for k, v in params.items()}
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    opt = AdamW(params, betas=(b1, b2), eps=eps, weight_decay=wd, frozen=["layers.0.wq"])
    m = {k: [0.0] * len(v) for k, v in ref.items()}
    v = {k: [0.0] * len(v) for k, v in ref.items()}
    for t, lr in enumerate([1e-2, 3e-2, 2e-2], start=1):
        grads = grads_for(params, rng.standard_normal)
        opt.step(params, grads, lr)
        for name in ref:
            if name == "layers.0.wq":
                continue                                      # frozen: never changes
            for i, g in enumerate(grads[name].reshape(-1)):
                m[name][i] = b1 * m[name][i] + (1 - b1) * g
                v[name][i] = b2 * v[name][i] + (1 - b2) * g * g
                m_hat, v_hat = m[name][i] / (1 - b1 ** t), v[name][i] / (1 - b2 ** t)
                p = ref[name][i]
                if name in ("layers.0.w_down",):              # the only decayed matrix here
                    p -= lr * wd * p
                ref[name][i] = p - lr * m_hat / (math.sqrt(v_hat) + eps)
        for name in ref:
            np.testing.assert_allclose(params[name].reshape(-1), ref[name], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(params["layers.0.wq"], make_params(np.random.default_rng(0))["layers.0.wq"])


def test_weight_decay_alone_shrinks_matrices_only():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    before = {k: p.copy() for k, p in params.items()}
    opt = AdamW(params, weight_decay=0.5)
    opt.step(params, params.zeros_like(), lr=0.1)
    np.testing.assert_allclose(params["layers.0.wq"], before["layers.0.wq"] * (1 - 0.05))
    for name in ("embed", "layers.0.norm", "norm"):
        np.testing.assert_array_equal(params[name], before[name])


def test_state_dict_round_trip():
    rng = np.random.default_rng(2)
    params = make_params(rng)
    opt = AdamW(params)
    opt.step(params, grads_for(params, rng.standard_normal), 1e-3)
    other = AdamW(make_params(rng))
    other.load_state_dict(opt.state_dict(), np)
    assert other.t == 1
    for name in params:
        np.testing.assert_array_equal(other.m[name], opt.m[name])
        np.testing.assert_array_equal(other.v[name], opt.v[name])


def test_update_runs_merge_neighbours_and_skip_frozen():
    params = make_params(np.random.default_rng(0))      # embed 6, layers.0.norm 2, wq 4, w_down 8, norm 2
    assert update_runs(params.layout) == [(0, 8, False), (8, 20, True), (20, 22, False)]
    assert update_runs(params.layout, frozen=["layers.0.wq"]) == [(0, 8, False), (12, 20, True), (20, 22, False)]
    with pytest.raises(ValueError):
        update_runs(params.layout, frozen=["layers.9.wq"])


def test_adamw_on_the_model_touches_only_the_unfrozen_layers():
    from tinypalm import Config, PaLM
    from tinypalm.model import layer_storage_names
    model = PaLM(Config.preset("tiny"), dtype="float64", seed=0)
    before = {k: p.copy() for k, p in model.params.items()}
    opt = AdamW(model.params, frozen=["embed"] + layer_storage_names(0))
    x = np.random.default_rng(0).integers(0, 256, (2, 8))
    _, grads = model.loss_and_grads(x, x)
    opt.step(model.params, grads, 1e-2)
    for name, p in model.params.items():
        frozen = name == "embed" or name.startswith("layers.0.")
        assert np.array_equal(p, before[name]) == frozen, name


def test_clip_grad_norm():
    rng = np.random.default_rng(3)
    grads = flatten(np, {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)})
    total = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    before = {k: g.copy() for k, g in grads.items()}
    assert clip_grad_norm(grads, 1e6) == pytest.approx(total)
    np.testing.assert_array_equal(grads["a"], before["a"])
    assert clip_grad_norm(grads, 0.5) == pytest.approx(total)
    clipped = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    assert clipped == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(grads["b"] / before["b"], clipped / total)     # direction kept


def test_schedule():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)                            # cosine midpoint
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
