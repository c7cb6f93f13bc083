"""Instruction tuning: the masked cross-entropy and its gradient, JSONL examples and their batches, train.py on
pairs end to end, sample.py stopping at end-of-text and at --stop strings, and bad JSONL input."""

import importlib.util
import io
import json
import math
import os
import re

import numpy as np
import pytest

from tinypalm import Config, PaLM, checkpoint, ops
from tinypalm.errors import TinyPalmError
from tinypalm.instruct import PairsData, is_pairs_file, read_pairs
from tinypalm.tokenizer import ByteTokenizer, tokenizer_from_dict
from gradcheck import assert_grad_close, numerical_grad, rel_error
from test_cli import ROOT, TINY, assert_user_error, run
from test_evaluate import run_module

rng = np.random.default_rng(7)


# ---- the masked cross-entropy op ----

@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_masked_cross_entropy_gradient(z_loss):
    logits, targets = rng.standard_normal((9, 7)) * 2 + 3, rng.integers(0, 7, 9)
    mask = np.array([1, 0, 0, 1, 1, 0, 1, 1, 0])
    loss = lambda: ops.masked_cross_entropy_forward(np, logits, targets, mask, z_loss)[0]
    value, cache = ops.masked_cross_entropy_forward(np, logits, targets, mask, z_loss)
    dlogits = ops.masked_cross_entropy_backward(np, cache, z_loss)
    assert_grad_close(dlogits, loss, logits)
    assert np.all(dlogits[mask == 0] == 0)                         # uncounted rows get no gradient
    # the mean over the counted positions only, z-loss over the same positions
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - logits[np.arange(9), targets]
    on = mask == 1
    np.testing.assert_allclose(value, nll[on].mean() + z_loss * (log_z[on] ** 2).mean(), rtol=1e-12)



def test_masked_cross_entropy_with_weights_below_one_is_the_weighted_mean():
    # weights other than 0 and 1 (all below 1 here, summing to less than 1): the weighted mean, and its gradient
    logits, targets = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    weights = np.array([0.01, 0.0, 0.2, 0.05, 0.3])
    loss = lambda: ops.masked_cross_entropy_forward(np, logits, targets, weights, 1e-2)[0]
    value, cache = ops.masked_cross_entropy_forward(np, logits, targets, weights, 1e-2)
    assert_grad_close(ops.masked_cross_entropy_backward(np, cache, 1e-2), loss, logits)
    log_z = np.log(np.exp(logits).sum(-1))
    row = log_z - logits[np.arange(5), targets] + 1e-2 * log_z ** 2
    np.testing.assert_allclose(value, (weights * row).sum() / weights.sum(), rtol=1e-12)

def test_masked_cross_entropy_with_every_position_is_the_plain_one():
    logits, targets = rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    plain, plain_cache = ops.cross_entropy_forward(np, logits, targets, 1e-3)
    masked, masked_cache = ops.masked_cross_entropy_forward(np, logits, targets, np.ones(6, dtype=np.int32), 1e-3)
    np.testing.assert_allclose(masked, plain, rtol=1e-13)
    np.testing.assert_allclose(ops.masked_cross_entropy_backward(np, masked_cache, 1e-3),
                               ops.cross_entropy_backward(np, plain_cache, 1e-3), rtol=1e-12, atol=1e-15)


def test_masked_cross_entropy_ignores_uncounted_positions_and_counts_none_as_zero():
    logits, targets = rng.standard_normal((4, 5)), rng.integers(0, 5, 4)
    mask = np.array([1, 0, 1, 0])
    before, _ = ops.masked_cross_entropy_forward(np, logits, targets, mask, 1e-4)
    logits[1] += 100.0 * rng.standard_normal(5)                     # change what the mask hides
    targets[3] = (targets[3] + 1) % 5
    assert ops.masked_cross_entropy_forward(np, logits, targets, mask, 1e-4)[0] == before
    none, cache = ops.masked_cross_entropy_forward(np, logits, targets, np.zeros(4, dtype=np.int32), 1e-4)
    assert none == 0 and not ops.masked_cross_entropy_backward(np, cache, 1e-4).any()


def test_model_gradient_with_a_loss_mask():
    cfg = Config(vocab_size=11, d_model=16, n_layers=2, n_heads=4, max_seq_len=8, z_loss=1e-2)
    model = PaLM(cfg, dtype="float64", seed=5)
    tokens, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    loss, grads = model.loss_and_grads(tokens, targets, loss_mask=mask)
    assert loss == pytest.approx(model.loss(tokens, targets, loss_mask=mask), rel=1e-12)
    f = lambda: model.loss_and_grads(tokens, targets, loss_mask=mask)[0]
    pick = np.random.default_rng(0)
    for name in ("embed", "layers.0.wq", "layers.1.w_down", "layers.0.norm", "norm"):
        p = model.params[name]
        idx = None if p.size <= 64 else pick.choice(p.size, 40, replace=False)
        numeric = numerical_grad(f, p, indices=idx)
        analytic = grads[name].reshape(-1)[idx] if idx is not None else grads[name]
        numeric = numeric.reshape(-1)[idx] if idx is not None else numeric
        assert rel_error(analytic, numeric) < 1e-6, name
        assert np.linalg.norm(numeric) > 0, name
    # the masked loss is the plain loss over just the counted positions (a target the mask hides changes nothing)
    changed = targets.copy()
    changed[0, 0] = (changed[0, 0] + 1) % 11
    assert model.loss(tokens, changed, loss_mask=mask) == pytest.approx(loss, rel=1e-13)
    full = model.loss(tokens, targets)
    assert model.loss(tokens, targets, loss_mask=np.ones((2, 6))) == pytest.approx(full, rel=1e-12)


# ---- JSONL examples and batches ----

def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs), encoding="utf-8")
    return path


def test_examples_batches_and_mask(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [("ab", "xyz"), ("", "q"), ("hello", "w")] + [("p", "r")] * 7)
    pairs = read_pairs(path)
    assert pairs[:3] == [("ab", "xyz"), ("", "q"), ("hello", "w")] and len(pairs) == 10
    tok = ByteTokenizer()
    d = PairsData(pairs, tok)
    assert (d.n_train, d.n_val) == (9, 1)                            # the last 10% of the examples, by example
    x, y, mask = d.batch([0, 1, 2], seq_len=16)
    eot = tok.eot_id
    # row 0: "ab" + "xyz" + EOT; the targets x, y, z, EOT count, the prompt's "b" does not
    assert x[0].tolist() == [97, 98, 120, 121, 122, eot] and y[0].tolist() == [98, 120, 121, 122, eot, eot]
    assert mask[0].tolist() == [0, 1, 1, 1, 1, 0]
    # no prompt: end-of-text stands in for it, so "q" is predicted, then EOT
    assert x[1].tolist()[:2] == [eot, ord("q")] and y[1].tolist()[:2] == [ord("q"), eot]
    assert mask[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert mask[2].tolist() == [0, 0, 0, 0, 1, 1]                    # "hello" predicts "w", then "w" predicts EOT
    # too long for seq_len: the prompt is cut from the left, the response and its end-of-text stay
    x, y, mask = d.batch([2], seq_len=3)
    assert x[0].tolist() == [ord("l"), ord("o"), ord("w")] and y[0].tolist() == [ord("o"), ord("w"), eot]
    assert mask[0].tolist() == [0, 1, 1]
    # "ab" + "xyz" is cut too, into its response: of x, y, z and EOT, x is never predicted
    x, y, mask = d.batch([0], seq_len=3)
    assert y[0].tolist() == [ord("y"), ord("z"), eot] and mask[0].tolist() == [1, 1, 1]
    assert d.n_cut(3) == (2, 1, 1) and d.n_cut(3, [2]) == (1, 0, 0) and d.n_cut(16) == (0, 0, 0)
    assert d.describe_cut(3, "--seq-len") == ("note: 2 examples hold more than --seq-len + 1 = 4 tokens: their prompts lose their "
                                              "start, and 1 of them the start of their response too (1 response "
                                              "tokens never predicted); raise --seq-len to keep them whole")
    assert d.describe_cut(16, "--seq-len") is None
    # batches are functions of (seed, step) alone, drawn from the training examples only
    a, b = d.train_batch(4, 16, seed=3, step=11), d.train_batch(4, 16, seed=3, step=11)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(d.train_batch(64, 16, 3, 12)[0], d.train_batch(64, 16, 3, 13)[0])
    assert list(d.val_indices()) == [9]


def test_pairs_file_detection(tmp_path):
    assert is_pairs_file(write_pairs(tmp_path / "a.jsonl", [("a", "b")]))
    assert is_pairs_file(write_pairs(tmp_path / "a.txt", [("a", "b")]))     # by content
    (tmp_path / "t.txt").write_text('{"text": "a JSON line, but not a pair"}\nplain text\n')
    (tmp_path / "u.txt").write_text("just text\n")
    assert not is_pairs_file(tmp_path / "t.txt") and not is_pairs_file(tmp_path / "u.txt")
    assert not is_pairs_file(tmp_path)


def test_old_tokenizer_without_end_of_text_is_refused():
    with pytest.raises(TinyPalmError, match="end-of-text"):
        PairsData([("a", "b"), ("c", "d")], tokenizer_from_dict({"kind": "byte"}))


# ---- train.py on pairs, then sample.py ----

QA = [(f"Q: {a}+{b}=?\nA:", f" {a + b}") for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny model instruction-tuned on a JSONL of additions: it learns to answer with one digit and stop."""
    d = tmp_path_factory.mktemp("sft")
    write_pairs(d / "qa.jsonl", QA * 4)
    r = run("train.py", "--data", "qa.jsonl", *TINY, "--batch-size", "16", "--max-steps", "80", "--lr", "1e-2",
            "--warmup-steps", "5", "--eval-every", "40", "--out", "sft", cwd=d)
    return d, r


def test_instruction_tuning_end_to_end(tuned):
    d, r = tuned
    assert "64 prompt/response examples (58 train, 6 val)" in r.stdout and "bits/byte" in r.stdout
    ck = checkpoint.load(str(d / "sft" / "last.npz"))
    assert ck.step == 80 and ck.tokenizer_dict["eot"] == 256 and ck.config.vocab_size == 257
    vals = [json.loads(line) for line in (d / "sft" / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v["split"] == "val"]
    assert vals[-1]["loss"] < 0.6 * vals[0]["loss"] and vals[-1]["bits_per_byte"] > 0
    # greedy sampling answers and stops at end-of-text, long before --max-new-tokens
    for prompt, _ in QA[::5]:
        s = run("sample.py", "--ckpt", "sft", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "50",
                cwd=d)
        assert re.fullmatch(re.escape(prompt) + r" \d\n", s.stdout), s.stdout
        assert "[3 tokens" in s.stderr and "stopped at end-of-text" in s.stderr


def test_tokens_per_second_counts_the_batches_as_they_ran(tuned):
    # a batch of pairs is as long as its longest example, not --seq-len: the log counts what the model ran
    d, r = tuned
    assert "up to 256 tokens per step (a batch is as long as its longest example)" in r.stdout
    pairs = PairsData.load(str(d / "qa.jsonl"), ByteTokenizer())
    ran = sum(pairs.train_batch(16, 16, 0, step)[0].size for step in range(80))
    records = [json.loads(line) for line in (d / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sum(rec["tokens"] for rec in records if rec["split"] == "train") == ran < 80 * 16 * 16


def test_evaluate_on_pairs(tuned):
    d, _ = tuned
    res = json.loads(run_module("tinypalm.evaluate", "--ckpt", "sft", "--data", "qa.jsonl", "--split", "val",
                                "--json", cwd=d).stdout)
    assert res["examples"] == 6 and res["tokens"] == 6 * 3        # " 5": two bytes, then end-of-text
    assert res["bytes"] == 6 * 2
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / math.log(2) / res["bytes"])


def test_evaluate_says_what_a_long_example_loses_and_writes_strict_json(tuned):
    d, _ = tuned
    (d / "long.jsonl").write_text(json.dumps({"prompt": "Q: 1+1=", "response": "2" * 100}) + "\n"
                                  + json.dumps({"prompt": "Q: 2+2=", "response": ""}) + "\n")
    r = run_module("tinypalm.evaluate", "--ckpt", "sft", "--data", "long.jsonl", "--seq-len", "32", "--json", cwd=d)
    # the first example's 100 response tokens and end-of-text: the 32 positions predict its last 32
    assert ("note: 1 examples hold more than --seq-len + 1 = 33 tokens: their prompts lose their start, and 1 of them the start "
            "of their response too (69 response tokens never predicted)") in r.stderr
    assert json.loads(r.stdout)["tokens"] == 32 + 1
    assert_user_error(run_module("tinypalm.evaluate", "--ckpt", "sft", "--data", "long.jsonl", "--stride", "8",
                                 cwd=d, check=False), "--stride", "drop --stride")
    (d / "empty.jsonl").write_text(json.dumps({"prompt": "Q: 1+1=", "response": ""}) + "\n")
    r = run_module("tinypalm.evaluate", "--ckpt", "sft", "--data", "empty.jsonl", "--json", cwd=d)
    assert '"bits_per_byte": null' in r.stdout and "NaN" not in r.stdout     # no bytes: strict JSON's null
    r = run_module("tinypalm.evaluate", "--ckpt", "sft", "--data", "empty.jsonl", cwd=d)
    assert "bits per byte n/a (no bytes)" in r.stdout


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "t.txt").write_text("the cat sat on the mat.\nthe dog ran to the red house.\n" * 80)
    run("train.py", "--data", "t.txt", *TINY, "--max-steps", "30", "--lr", "1e-2", cwd=d)
    return d


def test_sample_stops_at_stop_strings(text_model):
    d, prompt = text_model, "the "
    greedy = ["sample.py", "--ckpt", "out", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "40"]
    free = run(*greedy, cwd=d)
    new = free.stdout[len(prompt):-1]
    assert len(new) == 40 and "stopped" not in free.stderr
    k = new.index(" ", 8)
    stop = new[k - 1:k + 2]                       # three characters around a space: they span tokens
    cut = new.index(stop)
    for stops in ([stop], ["zzz", stop], [stop.replace(" ", "\\x20"), "qqq"]):
        s = run(*greedy, "--stop", *stops, cwd=d)
        assert s.stdout == prompt + new[:cut] + "\n", stops    # the text before the stop string; it is not shown
        assert f"stopped at stop string {stop!r}" in s.stderr
    s = run(*greedy, "--stop", "zzz", "--stop", "\\x20", cwd=d)       # --stop given twice adds up
    assert s.stdout == prompt + new[:new.index(" ")] + "\n"
    r = run(*greedy, "--stop", "bad \\x4", cwd=d, check=False)
    assert_user_error(r, "--stop", "escape")
    # the prompt reads the same escapes: "the\x20" is "the " (and "Q: cat\n" from a shell ends in a newline)
    escaped = run("sample.py", "--ckpt", "out", "--prompt", "the\\x20", "--temperature", "0", "--max-new-tokens", "40",
                  cwd=d)
    assert escaped.stdout == free.stdout
    r = run(*greedy[:3], "--prompt", "bad \\x4", cwd=d, check=False)
    assert_user_error(r, "--prompt", "escape")


# ---- bad JSONL ----

@pytest.mark.parametrize("content,words", [
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n', ["line 3", 'no "response" field']),
    ('{"prompt": "a", "response": "b"}\nthis is not json\n', ["line 2", "not JSON"]),
    ("", ["no examples", "empty"]),
])
def test_bad_jsonl_is_one_error_line(tmp_path, content, words):
    (tmp_path / "bad.jsonl").write_text(content)
    r = run("train.py", "--data", "bad.jsonl", *TINY, "--max-steps", "1", cwd=tmp_path, check=False)
    assert_user_error(r, "bad.jsonl", *words)


@pytest.mark.parametrize("content,words", [
    ('{"prompt": "a", "response": "b"}\n{"response": "b"}\n', ["line 2", 'no "prompt" field']),
    ('{"prompt": "a", "response": "b"}\n{prompt: "c", "response": "d"}\n', ["line 2", "not JSON"]),
    ('["a", "b"]\n', ["line 1", "a JSON list, not an object"]),
    ('{"prompt": "a", "response": 3}\n', ["line 1", '"response" is not a string']),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "x\\ud800", "response": "y"}\n',
     ["line 2", '"prompt" holds an unpaired surrogate escape']),
    ("\n  \n", ["no examples"]),
    ('{"prompt": "a", "response": "b"}\n', ["1 example", "at least 2"]),
])
def test_bad_jsonl_messages(tmp_path, content, words):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(TinyPalmError) as e:
        PairsData.load(str(tmp_path / "bad.jsonl"), ByteTokenizer())
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_jsonl_not_utf8(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    r = run("train.py", "--data", "bad.jsonl", *TINY, "--max-steps", "1", cwd=tmp_path, check=False)
    assert_user_error(r, "line 2", "UTF-8")


def load_sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", os.path.join(ROOT, "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stop_streamer_holds_back_only_what_could_start_a_stop_string():
    from tinypalm.generate import StopGenerating, StopStreamer
    sample = load_sample_script()
    tok, out = ByteTokenizer(), io.StringIO()
    stream = StopStreamer(out, tok, ["abc", "éé"])
    shown = []
    for ch in "xxaby":
        stream(ord(ch))
        shown.append(out.getvalue())
    assert shown == ["x", "xx", "xx", "xx", "xxaby"]        # "a" and "ab" are held: they could begin "abc"
    for b in "é".encode():                                   # a character split over two tokens
        stream(b)
    assert out.getvalue() == "xxaby"                         # "é" is held: it could begin "éé"
    stream(ord("a"))
    stream(ord("b"))
    assert out.getvalue() == "xxabyé"                        # "ab" is held
    with pytest.raises(StopGenerating, match="'abc'"):
        stream(ord("c"))
    assert out.getvalue() == "xxabyé"                        # everything before the stop string, nothing of it
    out, stream = io.StringIO(), StopStreamer(io.StringIO(), tok, [])
    with pytest.raises(StopGenerating, match="end-of-text"):
        stream(tok.eot_id)
    stream = StopStreamer(out, tok, ["abc"])
    for ch in "zab":
        stream(ord(ch))
    stream.finish()                                          # generation ended: the held-back text is shown
    assert out.getvalue() == "zab"
    out = io.StringIO()
    stream = StopStreamer(out, tok, ["#X"])
    for b in "ab#".encode() + "é".encode()[:1]:
        stream(b)
    assert out.getvalue() == "ab"                            # "#" held back, half a character pending
    with pytest.raises(StopGenerating, match="end-of-text"):
        stream(tok.eot_id)
    assert out.getvalue() == "ab#\ufffd"                     # the model's answer ended there: all of it is shown
    assert sample.parse_escapes("\\n\\n###\\x41é", "--stop") == "\n\n###Aé"
    # a backslash before anything that is not an escape stays, whatever the character after it
    assert sample.parse_escapes("\\日x \\q \\\\n \\N{BULLET}", "--stop") == "\\日x \\q \\n \u2022"
