"""train.py and sample.py as a user runs them: end to end, exact resume, fine-tuning, Ctrl-C, NaN, bad input."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinypalm import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "16", "--eval-every", "5", "--eval-steps", "2",
        "--log-every", "5", "--sample-tokens", "0"]


def run(script, *args, cwd, check=True, **kwargs):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_user_error(result, *words):
    """Exit status 2, one line on stderr starting with 'error:' that contains the words, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house", "你好"]
    text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(800))
    (d / "text.txt").write_text(text, encoding="utf-8")
    return d / "text.txt"


def load_params(path):
    return checkpoint.load(str(path)).params


def test_train_then_sample(corpus, tmp_path):
    r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "20", "--sample-tokens", "30", cwd=tmp_path)
    for name in ("last.npz", "best.npz", "metrics.jsonl", "loss.svg"):
        assert (tmp_path / "out" / name).exists(), name
    assert "val loss" in r.stdout and "--- sample ---" in r.stdout
    log = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert any('"split": "val"' in line for line in log) and any('"split": "train"' in line for line in log)
    assert "<polyline" in (tmp_path / "out" / "loss.svg").read_text()
    s = run("sample.py", "--ckpt", "out", "--prompt", "the cat", "--max-new-tokens", "25", "--seed", "1", cwd=tmp_path)
    assert s.stdout.startswith("the cat") and len(s.stdout) > len("the cat")
    assert "tokens/s" in s.stderr
    greedy = [run("sample.py", "--ckpt", "out/last.npz", "--temperature", "0", "--max-new-tokens", "20",
                  cwd=tmp_path).stdout for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_resume_is_exact(corpus, tmp_path):
    common = ["--data", str(corpus), *TINY, "--dtype", "float64", "--decay-steps", "20", "--dropout", "0.1"]
    run("train.py", *common, "--max-steps", "10", "--out", "a", cwd=tmp_path)
    run("train.py", "--resume", "--out", "a", "--max-steps", "20", cwd=tmp_path)
    run("train.py", *common, "--max-steps", "20", "--out", "b", cwd=tmp_path)
    resumed, straight = checkpoint.load(str(tmp_path / "a" / "last.npz")), checkpoint.load(str(tmp_path / "b" / "last.npz"))
    assert resumed.step == straight.step == 20
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])
    for key in straight.opt_state:
        np.testing.assert_array_equal(resumed.opt_state[key], straight.opt_state[key])


def test_bpe_tokenizer_is_trained_and_saved(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", "--tokenizer", "bpe", "--vocab-size", "300",
        cwd=tmp_path)
    ck = checkpoint.load(str(tmp_path / "out" / "last.npz"))
    # the model's vocabulary is the tokenizer's: at most the 300 asked for (fewer if the corpus runs out of pairs)
    assert ck.tokenizer_dict["kind"] == "bpe"
    assert 256 < ck.config.vocab_size == 256 + len(ck.tokenizer_dict["merges"]) + 1 <= 300   # + end-of-text
    s = run("sample.py", "--ckpt", "out", "--prompt", "the dog 你好", "--max-new-tokens", "5", cwd=tmp_path)
    assert s.stdout.startswith("the dog 你好")


def test_prepared_token_file_trains(corpus, tmp_path):
    r = run("train.py", "--data", str(corpus), "--prepare", "corpus.tok", cwd=tmp_path)
    assert "wrote" in r.stdout and (tmp_path / "corpus.tok").exists()
    run("train.py", "--data", "corpus.tok", *TINY, "--max-steps", "5", cwd=tmp_path)
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 5


def test_fine_tune_with_frozen_layers(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "10", "--out", "base", cwd=tmp_path)
    base = load_params(tmp_path / "base" / "last.npz")
    other = tmp_path / "other.txt"
    other.write_text("completely different text about numbers 123 456 789. " * 300)
    run("train.py", "--init-from", "base/last.npz", "--data", str(other), *TINY, "--max-steps", "5",
        "--freeze-layers", "1", "--out", "ft", cwd=tmp_path)
    tuned = checkpoint.load(str(tmp_path / "ft" / "last.npz"))
    assert tuned.step == 5 and int(tuned.opt_state["step"]) == 5           # a fresh optimizer
    for name in ("embed", "layers.0.wq", "layers.0.norm", "layers.0.w_down"):
        np.testing.assert_array_equal(tuned.params[name], base[name])
    for name in ("layers.1.wq", "layers.1.w_down", "norm"):
        assert not np.array_equal(tuned.params[name], base[name]), name
    r = run("train.py", "--init-from", "base/last.npz", "--d-model", "32", *TINY, cwd=tmp_path, check=False)
    assert_user_error(r, "--init-from", "--d-model")
    r = run("train.py", "--resume", "--out", "base", "--n-layers", "3", cwd=tmp_path, check=False)
    assert_user_error(r, "--resume", "--n-layers")


def test_ctrl_c_saves_and_exits_cleanly(corpus, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus), *TINY,
                             "--max-steps", "100000", "--eval-every", "100000", "--log-every", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while not line.startswith("step 3/"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "continue with --resume" in out
    ck = checkpoint.load(str(tmp_path / "out" / "last.npz"))
    assert 3 <= ck.step < 100000


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", cwd=tmp_path)
    before = open(tmp_path / "out" / "last.npz", "rb").read()
    r = run("train.py", "--resume", "--max-steps", "200", "--lr", "1e30", "--min-lr", "1e30", "--grad-clip", "0",
            cwd=tmp_path, check=False)
    assert_user_error(r, "training diverged", "last good checkpoint", "lower --lr")
    assert open(tmp_path / "out" / "last.npz", "rb").read() == before


def test_non_utf8_corpus_is_accepted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café olé naïve ".encode("latin-1") * 200 + b"\xff\xfe\x80")
    run("train.py", "--data", str(path), *TINY, "--max-steps", "2", cwd=tmp_path)
    run("train.py", "--data", str(path), *TINY, "--max-steps", "2", "--tokenizer", "bpe", "--vocab-size", "280",
        "--out", "bpe", cwd=tmp_path)


def test_long_prompt_is_cut_from_the_left_with_a_notice(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", "--max-seq-len", "32", cwd=tmp_path)
    r = run("sample.py", "--ckpt", "out", "--prompt", "x" * 100, "--max-new-tokens", "3", cwd=tmp_path)
    assert "keeping its last 31" in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--data", "does/not/exist.txt"], ["does/not/exist.txt", "no such file"]),
    (["--data", "EMPTY"], ["empty"]),
    (["--data", "SHORT"], ["too short", "--seq-len"]),
    (["--preset", "huge"], ["unknown preset 'huge'"]),
    (["--d-model", "30", "--n-heads", "4"], ["not divisible by n_heads"]),
    (["--n-heads", "4", "--n-kv-heads", "3"], ["not divisible by n_kv_heads"]),
    (["--d-model", "20", "--n-heads", "4"], ["head_dim 5 must be even"]),
    (["--head-dim", "7"], ["head_dim 7 must be even"]),
    (["--resume"], ["--resume", "does not exist"]),
])
def test_train_bad_input(args, words, tmp_path):
    (tmp_path / "EMPTY").write_text("  \n")
    (tmp_path / "SHORT").write_text("just a few words, far fewer than needed")
    r = run("train.py", *TINY[:6], "--max-steps", "1", *args, cwd=tmp_path, check=False)
    assert_user_error(r, *words)


def test_cupy_backend_without_a_gpu(tmp_path):
    try:
        import cupy
        if cupy.is_available():
            pytest.skip("a GPU is present; the error path cannot be reached")
    except Exception:
        pass
    r = run("train.py", *TINY, "--max-steps", "1", "--backend", "cupy", cwd=tmp_path, check=False)
    assert_user_error(r, "--backend cupy", "--backend numpy")


def test_sample_bad_checkpoints(corpus, tmp_path):
    assert_user_error(run("sample.py", "--ckpt", "missing.npz", cwd=tmp_path, check=False), "no such checkpoint")
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "1", cwd=tmp_path)
    data = (tmp_path / "out" / "last.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    assert_user_error(run("sample.py", "--ckpt", "cut.npz", cwd=tmp_path, check=False), "truncated or corrupt")
    np.savez(tmp_path / "foreign.npz", w=np.zeros(2))
    assert_user_error(run("sample.py", "--ckpt", "foreign.npz", cwd=tmp_path, check=False), "not a tinypalm checkpoint")
    with np.load(tmp_path / "out" / "last.npz") as npz:
        arrays = dict(npz)
    arrays["meta"] = np.array(str(arrays["meta"]).replace('"version": 1', '"version": 7'))
    np.savez(tmp_path / "future.npz", **arrays)
    assert_user_error(run("sample.py", "--ckpt", "future.npz", cwd=tmp_path, check=False), "version 7")
    assert_user_error(run("sample.py", "--ckpt", "out", "--prompt-file", "nope.txt", cwd=tmp_path, check=False),
                      "nope.txt")
