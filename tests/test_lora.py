"""LoRA: the op pair and the whole model's adapter gradients against finite differences, step 0 equals the base,
merging gives the same logits, and train.py / sample.py / merge end to end with their bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinypalm import Config, PaLM, checkpoint
from tinypalm.lora import LoRA, TARGETS, lora_forward, lora_backward, params_hash
from gradcheck import assert_grad_close, numerical_grad, rel_error
from test_cli import TINY, assert_user_error, corpus, run  # noqa: F401  (corpus is a fixture)


def run_module(module, *args, cwd, check=True):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_lora_op_gradients():
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((5, 6)), rng.standard_normal((6, 3)), rng.standard_normal((3, 4))
    d_delta, scale = rng.standard_normal((5, 4)), 0.7
    f = lambda: (lora_forward(x, A, B, scale)[0] * d_delta).sum()
    delta, cache = lora_forward(x, A, B, scale)
    np.testing.assert_allclose(delta, scale * x @ A @ B)
    dA, dB = np.zeros_like(A), np.zeros_like(B)
    dx = lora_backward(d_delta, A, B, dA, dB, scale, cache)
    assert_grad_close(dx, f, x)
    assert_grad_close(dA, f, A)
    assert_grad_close(dB, f, B)


def small_model():
    cfg = Config(vocab_size=13, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=8)
    return PaLM(cfg, dtype="float64", seed=3)


def batch(B=2, T=5):
    rng = np.random.default_rng(1)
    return rng.integers(0, 13, (B, T)), rng.integers(0, 13, (B, T))


def with_random_adapter(model, targets=TARGETS, rank=3):
    adapter = LoRA(model.config, rank, alpha=5.0, targets=targets, dtype="float64", seed=2)
    rng = np.random.default_rng(4)
    adapter.params.flat[...] = rng.standard_normal(adapter.params.flat.size) * 0.3     # B non-zero as well
    model.adapter = adapter
    return adapter


def test_model_adapter_gradients_all_seven_projections():
    model = small_model()
    adapter = with_random_adapter(model)
    tokens, targets = batch()
    loss, grads = model.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=5)
    f = lambda: model.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=5)[0]
    assert set(grads.adapter) == set(adapter.params) and len(adapter.params) == 2 * 2 * 7
    rng = np.random.default_rng(0)
    for name, p in adapter.params.items():          # a sample of every A and B, always more than a handful
        idx = rng.choice(p.size, min(p.size, 12), replace=False)
        numeric = numerical_grad(f, p, indices=idx).reshape(-1)[idx]
        assert np.linalg.norm(numeric) > 0, name
        analytic = grads.adapter[name].reshape(-1)[idx]
        assert rel_error(analytic, numeric) < 1e-6, (name, rel_error(analytic, numeric))
    # the base's gradients are still right with adapters in the path (a sample of each stored array)
    for name in ("layers.0.w_in", "layers.1.w_out", "layers.0.norm", "embed"):
        p = model.params.stored[name]
        idx = rng.choice(p.size, 12, replace=False)
        numeric = numerical_grad(f, p, indices=idx).reshape(-1)[idx]
        assert rel_error(grads.stored[name].reshape(-1)[idx], numeric) < 1e-6, name


def test_adapter_gradients_accumulate():
    model = small_model()
    with_random_adapter(model, targets=("wk", "w_down"))
    tokens, targets = batch()
    _, once = model.loss_and_grads(tokens, targets)
    once = once.adapter.flat.copy()
    _, grads = model.loss_and_grads(tokens, targets)
    model.loss_and_grads(tokens, targets, grads=grads)
    np.testing.assert_allclose(grads.adapter.flat, 2 * once, rtol=1e-12)


def test_a_frozen_base_leaves_the_adapter_gradients_as_they_were():
    # train.py freezes the whole base under LoRA: no base weight gradients, the adapters' exactly as before
    model = small_model()
    with_random_adapter(model)
    tokens, targets = batch()
    _, full = model.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=5)
    model.frozen = frozenset(model.params.stored)
    _, grads = model.loss_and_grads(tokens, targets, dropout=0.1, dropout_seed=5)
    np.testing.assert_allclose(grads.adapter.flat, full.adapter.flat, rtol=1e-12, atol=1e-15)
    assert grads.flat.size == 0 and not grads          # no base gradient buffer at all: nothing writes it


def test_step_zero_is_the_base_and_merge_matches():
    model = small_model()
    tokens, _ = batch()
    base_logits = model.forward(tokens)
    model.adapter = LoRA(model.config, 4, targets=TARGETS, dtype="float64", seed=0)
    assert np.all(model.adapter.params["layers.0.wq.B"] == 0) and np.any(model.adapter.params["layers.0.wq.A"] != 0)
    np.testing.assert_array_equal(model.forward(tokens), base_logits)       # B = 0: exactly the base model
    with_random_adapter(model)
    adapted = model.forward(tokens)
    assert np.abs(adapted - base_logits).max() > 1e-3
    model.adapter.merge_into(model)
    model.adapter = None
    np.testing.assert_allclose(model.forward(tokens), adapted, rtol=1e-10, atol=1e-12)


def test_hash_names_the_parameters():
    a, b = small_model(), small_model()
    assert params_hash(a.params) == params_hash(b.params) == params_hash(a.params_numpy())
    b.params["layers.1.wv"][0, 0] += 1e-3
    assert params_hash(a.params) != params_hash(b.params)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("lora")
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "10", "--out", "base", cwd=d)
    return d


def test_train_sample_merge_end_to_end(base, corpus):  # noqa: F811
    d = base
    r = run("train.py", "--init-from", "base/best.npz", "--data", str(corpus), *TINY, "--max-steps", "10",
            "--lora-rank", "4", "--lora-targets", "wq,wv,w_down", "--out", "ft", "--lr", "1e-2", "--seq-len", "8", cwd=d)
    ck = checkpoint.load(str(d / "base" / "best.npz"))
    cfg = ck.config
    D, q, kv, F, rank = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff, 4
    expected = cfg.n_layers * rank * ((D + q) + (D + kv) + (F + D))          # A (in, r) and B (r, out) per target
    assert f"{expected:,} trainable parameters" in r.stdout and "for full fine-tuning" in r.stdout
    assert not (d / "ft" / "last.npz").exists() and (d / "ft" / "adapter_last.npz").exists()
    assert os.path.getsize(d / "ft" / "adapter_best.npz") < os.path.getsize(d / "base" / "best.npz") / 4
    # the base is untouched; the adapter moved
    np.testing.assert_array_equal(checkpoint.load(str(d / "base" / "best.npz")).params["embed"], ck.params["embed"])
    with np.load(d / "ft" / "adapter_last.npz", allow_pickle=False) as npz:
        assert np.abs(npz["lora.layers.0.wq.B"]).max() > 0
    s = run("sample.py", "--ckpt", "base/best.npz", "--adapter", "ft", "--temperature", "0", "--max-new-tokens", "20",
            cwd=d)
    run_module("tinypalm.lora", "merge", "--ckpt", "base/best.npz", "--adapter", "ft/adapter_last.npz",
        "--out", "merged.npz", cwd=d)
    merged_args = checkpoint.load(str(d / "merged.npz")).train_args      # what evaluate reads: the adapter's run
    assert (merged_args["seq_len"], merged_args["data"]) == (8, str(corpus)) and ck.train_args["seq_len"] == 16
    assert_user_error(run_module("tinypalm.lora", "merge", "--ckpt", "base/best.npz", "--adapter", "ft",
                          "--out", "merged.npz", cwd=d, check=False), "merged.npz exists", "--force")
    assert_user_error(run_module("tinypalm.lora", "merge", "--ckpt", "base/best.npz", "--adapter", "ft",
                          "--out", "ft", "--force", cwd=d, check=False), "--out ft is a directory", "ft/merged.npz")
    assert "usage: python -m tinypalm.lora merge" in run_module("tinypalm.lora", "--help", cwd=d).stdout
    base_bytes = (d / "base" / "best.npz").read_bytes()
    assert_user_error(run_module("tinypalm.lora", "merge", "--ckpt", "base", "--adapter", "ft", "--out",
                                 "base/best.npz", "--force", cwd=d, check=False), "is the base checkpoint itself")
    assert (d / "base" / "best.npz").read_bytes() == base_bytes
    assert_user_error(run("sample.py", "--ckpt", "ft", cwd=d, check=False),
                      "ft: holds a LoRA run's adapters, not a model", "--adapter")
    assert_user_error(run("sample.py", "--ckpt", "ft/adapter_best.npz", cwd=d, check=False),
                      "ft/adapter_best.npz holds LoRA adapters, not a model", "trained on (base/best.npz)",
                      "ft/adapter_best.npz with --adapter")
    (d / "notes.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    assert_user_error(run("sample.py", "--ckpt", "base", "--adapter", "notes.jsonl", cwd=d, check=False),
                      "--adapter notes.jsonl: not a tinypalm adapter (not an .npz file)")
    # merged logits equal base + adapter
    from tinypalm.loading import load_model
    adapted, _, _ = load_model(str(d / "base" / "best.npz"), str(d / "ft" / "adapter_last.npz"), dtype="float64")
    merged, _, _ = load_model(str(d / "merged.npz"), dtype="float64")
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    np.testing.assert_allclose(merged.forward(tokens), adapted.forward(tokens), rtol=1e-5, atol=1e-5)
    greedy = run("sample.py", "--ckpt", "merged.npz", "--temperature", "0", "--max-new-tokens", "20", cwd=d)
    assert greedy.stdout == s.stdout
    # the evaluation program: base plus adapter scores as the merged checkpoint does, and not as the base
    scores = {}
    for name, flags in {"base": ["--ckpt", "base/best.npz"], "merged": ["--ckpt", "merged.npz"],
                        "adapted": ["--ckpt", "base/best.npz", "--adapter", "ft/adapter_last.npz"]}.items():
        result = json.loads(run_module("tinypalm.evaluate", *flags, "--data", str(corpus), "--split", "val", "--json",
                                       cwd=d).stdout)
        assert (result["adapter"] is not None) == (name == "adapted")
        scores[name] = result["loss"]
    assert scores["adapted"] == pytest.approx(scores["merged"], abs=1e-4) and abs(scores["adapted"] - scores["base"]) > 1e-3


def test_lora_bad_input(base, corpus):  # noqa: F811
    d = base
    common = ["--init-from", "base/best.npz", "--data", str(corpus), *TINY, "--max-steps", "2"]
    assert_user_error(run("train.py", *common, "--lora-rank", "0", cwd=d, check=False), "--lora-rank 0", "from 1 to")
    assert_user_error(run("train.py", *common, "--lora-rank", "17", cwd=d, check=False), "--lora-rank 17", "from 1 to 16")
    assert_user_error(run("train.py", *common, "--lora-rank", "2", "--lora-targets", "wq,w_foo", cwd=d, check=False),
                      "unknown projection w_foo", "wq,wk,wv")
    assert_user_error(run("train.py", "--data", str(corpus), *TINY, "--lora-rank", "2", cwd=d, check=False),
                      "--init-from")
    assert_user_error(run("train.py", *common, "--lora-alpha", "4", cwd=d, check=False),
                      "--lora-alpha without --lora-rank")
    # an adapter for another base: train a second base, then apply the first one's adapter to it
    assert_user_error(run("train.py", *common, "--lora-rank", "2", "--lora-alpha", "0", cwd=d, check=False),
                      "--lora-alpha 0.0", "must be positive")
    assert_user_error(run("train.py", *common, "--lora-rank", "2", "--freeze-layers", "1", cwd=d, check=False),
                      "drop --freeze-layers")                                  # refused before anything is printed
    run("train.py", *common, "--lora-rank", "2", "--out", "ad", cwd=d)
    adapter = (d / "ad" / "adapter_last.npz").read_bytes()
    for lora_flags in (["--lora-rank", "2"], []):     # neither a new LoRA run nor a full one replaces it unasked
        assert_user_error(run("train.py", *common, *lora_flags, "--out", "ad", cwd=d, check=False),
                          "--out ad already holds a LoRA run (ad/adapter_best.npz: step 2", "--overwrite")
    assert (d / "ad" / "adapter_last.npz").read_bytes() == adapter
    assert [r["step"] for r in map(json.loads, open(d / "ad" / "metrics.jsonl"))] == [2, 2]
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "3", "--seed", "7", "--out", "other", cwd=d)
    for cmd in (["sample.py", "--ckpt", "other", "--adapter", "ad"], ["-m", "tinypalm.evaluate", "--ckpt", "other", "--adapter", "ad"],
                ["-m", "tinypalm.lora", "merge", "--ckpt", "other", "--adapter", "ad", "--out", "m.npz"]):
        r = run_module(*cmd[1:], cwd=d, check=False) if cmd[0] == "-m" else run(*cmd, cwd=d, check=False)
        assert_user_error(r, "trained on another base model")
    assert not (d / "m.npz").exists()


def adapter_arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(str(npz["meta"])), {k: npz[k] for k in npz.files if k != "meta"}


def test_lora_resume_is_exact(base, corpus):  # noqa: F811
    d = base
    common = ["--init-from", "base/best.npz", "--lora-rank", "2", "--lora-targets", "wq,wv,w_down", "--data",
              str(corpus), *TINY, "--dtype", "float64", "--decay-steps", "10", "--dropout", "0.1", "--lr", "1e-2"]
    run("train.py", *common, "--max-steps", "5", "--out", "ra", cwd=d)
    r = run("train.py", "--resume", "--out", "ra", "--max-steps", "10", cwd=d)
    assert "resuming at step 5" in r.stdout and "--ckpt base/best.npz --adapter ra" in r.stdout
    run("train.py", *common, "--max-steps", "10", "--out", "rb", cwd=d)
    (resumed_meta, resumed), (straight_meta, straight) = adapter_arrays(d / "ra" / "adapter_last.npz"), \
        adapter_arrays(d / "rb" / "adapter_last.npz")
    assert resumed_meta["step"] == straight_meta["step"] == 10
    assert resumed_meta["best_val_loss"] == straight_meta["best_val_loss"] is not None
    assert sorted(resumed) == sorted(straight) and any(k.startswith("opt.m.") for k in straight)
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    # adapter_best.npz is for sharing: the matrices alone
    assert not any(k.startswith("opt.") for k in adapter_arrays(d / "rb" / "adapter_best.npz")[1])


def test_lora_resume_bad_input(base, corpus):  # noqa: F811
    d = base
    (d / "moved.npz").write_bytes((d / "base" / "best.npz").read_bytes())
    run("train.py", "--init-from", "moved.npz", "--lora-rank", "2", "--data", str(corpus), *TINY, "--max-steps", "2",
        "--out", "rc", cwd=d)
    for flags, words in ((["--lora-rank", "4"], ["drop --lora-rank", "a new run: --init-from CKPT --lora-rank R"]),
                         (["--init-from", "moved.npz"], ["exclude each other"]),
                         (["--lora-alpha", "3"], ["drop --lora-alpha"])):
        assert_user_error(run("train.py", "--resume", "--out", "rc", "--max-steps", "4", *flags, cwd=d, check=False),
                          *words)
    # the base changed since the run started: refused, naming it
    with np.load(d / "moved.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["param.embed"] = arrays["param.embed"] + 1e-3
    with open(d / "moved.npz", "wb") as f:
        np.savez(f, **arrays)
    assert_user_error(run("train.py", "--resume", "--out", "rc", "--max-steps", "4", cwd=d, check=False),
                      "moved.npz is no longer the base", "put that checkpoint back")
    os.remove(d / "moved.npz")
    assert_user_error(run("train.py", "--resume", "--out", "rc", "--max-steps", "4", cwd=d, check=False),
                      "moved.npz, the base checkpoint this LoRA run adapts, is not there")
    # an adapter written without the optimizer's state cannot continue
    meta, entries = adapter_arrays(d / "rc" / "adapter_last.npz")
    with open(d / "rc" / "adapter_last.npz", "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **{k: v for k, v in entries.items() if not k.startswith("opt.")})
    assert_user_error(run("train.py", "--resume", "--out", "rc", "--max-steps", "4", cwd=d, check=False),
                      "no optimizer state", "--init-from and --lora-rank")


def test_adapter_files_of_earlier_bf16_runs_load(tmp_path):
    # earlier versions saved a bfloat16 run's adapters as raw 2-byte values (numpy writes ml_dtypes' type as void)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from tinypalm.lora import load_adapter, save_adapter
    model = small_model()
    adapter = LoRA(model.config, rank=2, targets=("wq", "w_down"), xp=np, dtype="float32", seed=1)
    for p in adapter.params.values():
        p[...] = np.random.default_rng(2).standard_normal(p.shape).astype(np.float32)
    save_adapter(str(tmp_path / "a.npz"), adapter, params_hash(model.params))
    with np.load(tmp_path / "a.npz") as npz:
        arrays = {k: (npz[k].astype(ml_dtypes.bfloat16) if k.startswith("lora.") else npz[k]) for k in npz.files}
    np.savez(tmp_path / "old.npz", **arrays)
    with np.load(tmp_path / "old.npz") as npz:
        assert npz["lora.layers.0.wq.A"].dtype.kind == "V"              # as those files hold them
    loaded = load_adapter(str(tmp_path / "old.npz"), model.params, model.config)
    for name, p in adapter.params.items():
        np.testing.assert_array_equal(loaded.params[name], p.astype(ml_dtypes.bfloat16).astype(np.float32))
