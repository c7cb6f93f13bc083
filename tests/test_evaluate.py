"""The evaluation program: every target scored once, numbers against independent computations, bits per byte,
JSON output, token files and splits, train.py's bits per byte, old checkpoints, and bad input."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from tinypalm import Config, PaLM, checkpoint
from tinypalm.evaluate import evaluate_tokens, token_byte_lengths, windows
from tinypalm.loading import load_model
from tinypalm.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_dict
from test_cli import TINY, assert_user_error, run


def run_module(module, *args, cwd, check=True):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def float64_model(vocab_size=257, z_loss=0.0, seed=0):
    cfg = Config(vocab_size=vocab_size, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, z_loss=z_loss)
    return PaLM(cfg, dtype="float64", seed=seed)


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max()
    return logits - m - np.log(np.exp(logits - m).sum())


@pytest.mark.parametrize("n,seq_len,stride", [(2, 4, 4), (9, 4, 4), (10, 4, 4), (23, 8, 3), (30, 8, 1), (5, 8, 8)])
def test_windows_score_every_target_once(n, seq_len, stride):
    spans = windows(n, seq_len, stride)
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(n - 1))                        # targets 0..n-2 (token 0 is only context)
    for k, (start, first, end) in enumerate(spans):
        assert end - start == min(seq_len, n - 1)              # every window is full
        assert start <= first < end
        if k:                                                  # after the first window: the promised context
            assert first - start >= seq_len - stride or start == 0


def test_loss_is_the_mean_of_model_loss_over_non_overlapping_windows():
    model = float64_model()                                    # z_loss 0: model.loss is then the cross-entropy
    tokens = np.random.default_rng(1).integers(0, 256, 4 * 8 + 1)
    result = evaluate_tokens(model, tokens, seq_len=8, batch_size=3, byte_lengths=token_byte_lengths(ByteTokenizer()))
    expected = np.mean([model.loss(tokens[None, s:s + 8], tokens[None, s + 1:s + 9]) for s in range(0, 32, 8)])
    assert result["tokens"] == result["bytes"] == 32 and result["windows"] == 4
    assert result["loss"] == pytest.approx(expected, rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)
    # a byte tokenizer: one byte per token, so bits per byte is the loss in bits
    assert result["bits_per_byte"] == pytest.approx(expected / math.log(2), rel=1e-12)


@pytest.mark.parametrize("n,stride", [(30, 3), (21, 8), (6, 8)])
def test_each_target_is_predicted_from_the_context_its_window_gives(n, stride):
    model, seq_len = float64_model(seed=2), 8
    tokens = np.random.default_rng(n).integers(0, 256, n)
    result = evaluate_tokens(model, tokens, seq_len, batch_size=2, stride=stride)
    # one forward pass per target, over exactly its window's tokens up to it
    nats = 0.0
    for start, first, end in windows(n, seq_len, stride):
        for t in range(first, end):
            logits = model.forward(tokens[None, start:t + 1])[0, -1]
            nats -= log_softmax(logits)[tokens[t + 1]]
    assert result["tokens"] == n - 1
    assert result["loss"] == pytest.approx(nats / (n - 1), rel=1e-12)
    if stride < seq_len and n > seq_len:                       # more context changes the numbers
        assert result["loss"] != pytest.approx(evaluate_tokens(model, tokens, seq_len)["loss"], rel=1e-9)


def test_bits_per_byte_counts_the_bytes_of_the_predicted_tokens():
    text = "the cat sat on the mat, the dog sat on the log. " * 20
    tok = BPETokenizer.train(text, 300)
    tokens = tok.encode(text)
    model = float64_model(vocab_size=tok.vocab_size)
    result = evaluate_tokens(model, tokens, seq_len=16, batch_size=4, byte_lengths=token_byte_lengths(tok))
    assert result["bytes"] == len(tok.decode_bytes(tokens[1:])) < len(text)
    assert result["tokens"] == len(tokens) - 1 < result["bytes"]                # several bytes per BPE token
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])


# ---- the program ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house", "你好"]
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) + "." for _ in range(100)), encoding="utf-8")
    (d / "dir").mkdir()
    (d / "dir" / "a.txt").write_text("a first file.\n" * 20)
    (d / "dir" / "b.txt").write_text("and a second one.\n" * 20)
    r = run("train.py", "--data", "text.txt", *TINY, "--max-steps", "10", cwd=d)
    run("train.py", "--data", "text.txt", "--prepare", "text.tok", cwd=d)
    return d, r


def test_train_validation_line_shows_bits_per_byte(trained):
    d, r = trained
    assert "bits/byte" in r.stdout
    vals = [json.loads(line) for line in (d / "out" / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v["split"] == "val"]
    assert vals and all(v["bits_per_byte"] == pytest.approx(v["loss"] / math.log(2)) for v in vals)  # byte tokens


def test_program_json_matches_an_in_process_evaluation(trained):
    d, _ = trained
    fast = ["--batch-size", "64"]
    r = run_module("tinypalm.evaluate", "--ckpt", "out", "--data", "text.txt", "--seq-len", "16", "--json", *fast, cwd=d)
    res = json.loads(r.stdout)                                 # one JSON object on stdout, nothing else
    assert "eval:" in r.stderr                                 # the progress line
    model, tok, _ = load_model(str(d / "out"))
    text = (d / "text.txt").read_bytes()
    expected = evaluate_tokens(model, tok.encode(text), 16, 64, byte_lengths=token_byte_lengths(tok))
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "windows"):
        assert res[key] == pytest.approx(expected[key], rel=1e-6), key
    assert res["tokens"] == len(text) - 1 and res["seq_len"] == res["stride"] == 16 and res["step"] == 10
    # the token file made from the same text gives the same numbers
    tok_res = json.loads(run_module("tinypalm.evaluate", "--ckpt", "out", "--data", "text.tok", "--seq-len", "16",
                                    "--json", *fast, cwd=d).stdout)
    assert tok_res["loss"] == pytest.approx(res["loss"], rel=1e-6) and tok_res["bytes"] == res["bytes"]
    # the validation split is the last 10%, as train.py holds it out
    val = json.loads(run_module("tinypalm.evaluate", "--ckpt", "out", "--data", "text.txt", "--split", "val",
                                "--json", *fast, cwd=d).stdout)
    assert val["tokens"] == int(len(text) * 0.1) - 1 and val["seq_len"] == 16        # train.py's --seq-len
    # without --data: what the checkpoint trained on, so --split val is what train.py held out
    own = run_module("tinypalm.evaluate", "--ckpt", "out", "--split", "val", "--json", *fast, cwd=d)
    assert json.loads(own.stdout) | {"seconds": 0} == val | {"seconds": 0}
    assert "data: text.txt, what the checkpoint trained on (--data evaluates another)" in own.stderr
    moved = d / "elsewhere"
    moved.mkdir(exist_ok=True)
    r = run_module("tinypalm.evaluate", "--ckpt", str(d / "out"), "--split", "val", cwd=moved, check=False)
    assert_user_error(r, "text.txt, the data", "trained on, is not there", "pass it with --data")


def test_program_prints_a_summary(trained):
    d, _ = trained
    r = run_module("tinypalm.evaluate", "--ckpt", "out/last.npz", "--data", "dir", "--stride", "8", cwd=d)
    assert "bits per byte" in r.stdout and "perplexity" in r.stdout and "stride 8" in r.stdout
    n_bytes = len("a first file.\n" * 20) + 1 + len("and a second one.\n" * 20)    # the files joined by a newline
    assert f"{n_bytes - 1:,} tokens scored, {n_bytes - 1:,} bytes" in r.stdout
    assert "note: --seq-len" not in r.stderr                   # train.py's --seq-len 16, the default here
    r = run_module("tinypalm.evaluate", "--ckpt", "out", "--data", "dir", "--seq-len", "32", cwd=d)
    assert "note: --seq-len 32 is longer than the 16 positions the model trained on" in r.stderr
    assert "bits per byte" in r.stdout


def test_checkpoint_saved_before_end_of_text_still_evaluates_and_samples(tmp_path):
    old_tok = tokenizer_from_dict({"kind": "byte"})                # what tinypalm wrote before end-of-text
    model = PaLM(Config.preset("tiny"), dtype="float32", seed=0)
    assert model.config.vocab_size == 256
    checkpoint.save(str(tmp_path / "old.npz"), model, old_tok, step=0)
    assert checkpoint.load(str(tmp_path / "old.npz")).tokenizer_dict == {"kind": "byte"}
    (tmp_path / "t.txt").write_text("hello world, hello tinypalm. " * 10)
    res = json.loads(run_module("tinypalm.evaluate", "--ckpt", "old.npz", "--data", "t.txt", "--json",
                                cwd=tmp_path).stdout)
    assert res["tokens"] == res["bytes"] == 289
    s = run("sample.py", "--ckpt", "old.npz", "--prompt", "hi", "--max-new-tokens", "5", cwd=tmp_path)
    assert s.stdout.startswith("hi") and "[5 tokens" in s.stderr


@pytest.mark.parametrize("args,words", [
    (["--data", "nope.txt"], ["nope.txt", "no such file"]),
    (["--data", "empty.txt"], ["empty"]),
    (["--data", "one.txt"], ["at least 2"]),
    (["--data", "text.txt", "--seq-len", "100"], ["--seq-len 100", "max_seq_len 64"]),
    (["--data", "text.txt", "--stride", "99"], ["--stride 99"]),
    (["--data", "text.txt", "--seq-len", "0"], ["--seq-len 0", "between 1"]),
    (["--data", "text.txt", "--stride", "0"], ["--stride 0", "between 1"]),
    (["--data", "bpe.tok"], ["bpe.tok", "another tokenizer"]),
    (["--ckpt", "missing.npz"], ["missing.npz", "no such checkpoint"]),
])
def test_bad_input(trained, args, words):
    d, _ = trained
    (d / "empty.txt").write_text(" \n")
    (d / "one.txt").write_text("x")
    if not (d / "bpe.tok").exists():
        run("train.py", "--data", "text.txt", "--tokenizer", "bpe", "--vocab-size", "300", "--prepare", "bpe.tok", cwd=d)
    r = run_module("tinypalm.evaluate", *(["--ckpt", "out"] if "--ckpt" not in args else []), *args, cwd=d, check=False)
    assert_user_error(r, *words)


def test_evaluate_tokens_refuses_windows_that_would_skip_or_never_end():
    from tinypalm import TinyPalmError
    model = PaLM(Config(vocab_size=256, d_model=16, n_layers=1, n_heads=2, max_seq_len=16), dtype="float64")
    tokens = np.arange(100) % 256
    for kwargs, words in ((dict(seq_len=16, stride=40), "stride 40: must be between 1 and seq_len 16"),
                          (dict(seq_len=16, stride=-1), "stride -1"), (dict(seq_len=16, stride=0), "stride 0"),
                          (dict(seq_len=0), "seq_len 0: must be between 1 and the model's max_seq_len 16"),
                          (dict(seq_len=17), "seq_len 17"), (dict(seq_len=8, batch_size=0), "batch_size 0")):
        with pytest.raises(TinyPalmError, match=re.escape(words)):
            evaluate_tokens(model, tokens, **kwargs)
    with pytest.raises(TinyPalmError, match="its val split is 1 token long"):
        evaluate_tokens(model, tokens[:1], 8, what="its val split")
    assert evaluate_tokens(model, tokens, 16, stride=16)["tokens"] == 99     # every target, once
