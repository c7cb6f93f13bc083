"""Checkpoint files: round trip, plain numpy loading, atomic writes, and every kind of bad file."""

import errno
import json
import os
import re

import numpy as np
import pytest

from tinypalm import Config, PaLM, TinyPalmError, checkpoint
from tinypalm.optim import AdamW
from tinypalm.tokenizer import BPETokenizer


@pytest.fixture
def trained(tmp_path):
    model = PaLM(Config.preset("tiny", vocab_size=300), dtype="float64", seed=1)
    tokenizer = BPETokenizer.train("hello hello world, hello there " * 50, 300)
    opt = AdamW(model.params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, (2, 8))
    _, grads = model.loss_and_grads(x, x)
    opt.step(model.params, grads, 1e-3)
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, model, tokenizer, step=7, optimizer=opt, train_args={"lr": 1e-3}, best_val_loss=2.5)
    return model, tokenizer, opt, path


def test_round_trip(trained):
    model, tokenizer, opt, path = trained
    ck = checkpoint.load(path, optimizer=True)
    assert ck.step == 7 and ck.best_val_loss == 2.5 and ck.train_args == {"lr": 1e-3}
    assert ck.config == model.config and ck.tokenizer_dict == tokenizer.to_dict()
    for name, p in model.params.items():
        np.testing.assert_array_equal(ck.params[name], p)
    assert int(ck.opt_state["step"]) == 1
    np.testing.assert_array_equal(ck.opt_state["m.layers.1.wv"], opt.m["layers.1.wv"])
    assert checkpoint.load(path).opt_state is None                 # read only when asked for (--resume)
    other = PaLM(ck.config, dtype="float64", seed=99)
    other.load_params(ck.params)
    x = np.arange(10)[None] % 300
    np.testing.assert_array_equal(other.forward(x), model.forward(x))


def test_loads_with_plain_numpy_without_pickle(trained):
    _, _, _, path = trained
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        assert meta["format"] == "tinypalm-checkpoint"
        assert npz["param.layers.0.wq"].shape == (64, 64)


def test_a_failed_save_keeps_the_previous_file(trained, monkeypatch):
    model, tokenizer, opt, path = trained
    before = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, model, tokenizer, step=8, optimizer=opt)
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == ["ckpt.npz"]           # no temporary file left behind


def test_directory_resolves_to_best_then_last(trained, tmp_path):
    _, _, _, path = trained
    os.rename(path, tmp_path / "last.npz")
    assert checkpoint.resolve(str(tmp_path)) == str(tmp_path / "last.npz")
    open(tmp_path / "best.npz", "wb").write(open(tmp_path / "last.npz", "rb").read())
    assert checkpoint.resolve(str(tmp_path)) == str(tmp_path / "best.npz")
    os.makedirs(tmp_path / "empty_dir")
    with pytest.raises(TinyPalmError, match="no best.npz or last.npz"):
        checkpoint.resolve(str(tmp_path / "empty_dir"))


def test_truncated(trained):
    _, _, _, path = trained
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(TinyPalmError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_missing(tmp_path):
    with pytest.raises(TinyPalmError, match="no such checkpoint"):
        checkpoint.load(str(tmp_path / "nope.npz"))


def test_not_a_tinypalm_checkpoint(tmp_path):
    path = str(tmp_path / "other.npz")
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(TinyPalmError, match="not a tinypalm checkpoint"):
        checkpoint.load(path)
    open(path, "w").write("plain text")
    with pytest.raises(TinyPalmError, match="not a tinypalm checkpoint .not an .npz file"):
        checkpoint.load(path)


def rewrite(path, **entries):
    """Rewrite a checkpoint file with some of its entries replaced."""
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{**arrays, **entries})


def test_incompatible_version(trained):
    _, _, _, path = trained
    with np.load(path) as npz:
        meta = json.loads(str(npz["meta"]))
    meta["version"] = 99
    rewrite(path, meta=np.array(json.dumps(meta)))
    with pytest.raises(TinyPalmError, match="version 99 is not supported"):
        checkpoint.load(path)


def test_parameters_that_do_not_match_the_config(trained):
    _, _, _, path = trained
    rewrite(path, **{"param.layers.0.wq": np.zeros((3, 3))})
    with pytest.raises(TinyPalmError, match="layers.0.wq is missing or does not match"):
        checkpoint.load(path)


def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_file(trained, monkeypatch):
    model, tokenizer, opt, path = trained
    before = open(path, "rb").read()

    def full_disk(file, **arrays):
        file.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(TinyPalmError, match=f"cannot write checkpoint {re.escape(path)}: No space left on device; "
                                            "the previous .* is intact"):
        checkpoint.save(path, model, tokenizer, step=8, optimizer=opt)
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == ["ckpt.npz"]
    with pytest.raises(TinyPalmError, match="new.npz was not written"):
        checkpoint.save(os.path.join(os.path.dirname(path), "new.npz"), model, tokenizer, step=8)


def test_weights_holding_nan_are_refused_at_load(trained):
    _, _, _, path = trained
    with np.load(path) as npz:
        w = npz["param.layers.1.w_gate"].copy()
    w[3, 5] = np.nan
    rewrite(path, **{"param.layers.1.w_gate": w})
    with pytest.raises(TinyPalmError, match="layers.1.w_gate holds NaN or infinite values"):
        checkpoint.load(path)


def test_describe_names_the_run_from_its_meta(trained, tmp_path):
    _, _, _, path = trained
    assert checkpoint.describe(path) == "step 7, best val loss 2.5000"
    (tmp_path / "junk.npz").write_text("junk")
    assert checkpoint.describe(str(tmp_path / "junk.npz")) == "unreadable"


def test_save_refuses_a_tokenizer_the_model_has_no_embedding_for(tmp_path):
    from tinypalm.tokenizer import ByteTokenizer
    model = PaLM(Config.preset("tiny"))                     # vocab 256; the byte tokenizer has 257 ids
    with pytest.raises(TinyPalmError, match=re.escape("the tokenizer has 257 tokens and the model's vocabulary only "
                                                      "256; build the model with vocab_size=257")):
        checkpoint.save(str(tmp_path / "t.npz"), model, ByteTokenizer(), 0)
    assert not os.listdir(tmp_path)
