"""Classification: the head's backward and the whole path's gradients against finite differences, data reading and
its bad input, the split, the metrics, few-shot scoring, and the program end to end in every mode."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinypalm import Config, PaLM, checkpoint
from tinypalm.classify import (classifier_head_forward, classifier_head_backward, pooling_weights, hidden_forward,
                               hidden_backward, read_examples, split_examples, report, label_log_likelihoods,
                               fewshot_prompt, Classifier)
from tinypalm.errors import TinyPalmError
from tinypalm.lora import LoRA
from tinypalm.tokenizer import ByteTokenizer
from gradcheck import assert_grad_close, numerical_grad, rel_error
from test_cli import TINY, assert_user_error, corpus, run  # noqa: F401  (corpus is a fixture)


def classify(*args, cwd, check=True):
    result = subprocess.run([sys.executable, "-m", "tinypalm.classify", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_head_gradients(pool):
    rng = np.random.default_rng(0)
    h, w, b = rng.standard_normal((3, 5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    weights = pooling_weights(np, np.array([5, 2, 3]), 5, pool, np.float64)
    assert np.allclose(weights.sum(axis=1), 1) and np.all(weights[1, 2:] == 0)     # padding gets no weight
    dlogits = rng.standard_normal((3, 3))
    f = lambda: (classifier_head_forward(h, weights, w, b)[0] * dlogits).sum()
    logits, cache = classifier_head_forward(h, weights, w, b)
    if pool == "mean":
        np.testing.assert_allclose(logits[1], h[1, :2].mean(axis=0) @ w + b)
    else:
        np.testing.assert_allclose(logits[2], h[2, 2] @ w + b)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dh = classifier_head_backward(dlogits, w, dw, db, cache)
    assert_grad_close(dh, f, h)
    assert_grad_close(dw, f, w)
    assert_grad_close(db, f, b)


def small_classifier(adapter=False, pool="mean"):
    cfg = Config(vocab_size=256, d_model=16, n_layers=3, n_heads=4, n_kv_heads=1, d_ff=24, max_seq_len=12)
    model = PaLM(cfg, dtype="float64", seed=1)
    if adapter:
        model.adapter = LoRA(cfg, 2, targets=("wv", "w_up", "wo"), dtype="float64", seed=0)
        model.adapter.params.flat[...] = np.random.default_rng(2).standard_normal(model.adapter.n_params) * 0.2
    clf = Classifier(model, ByteTokenizer(), ["x", "y", "z"], pool=pool, max_tokens=12)
    clf.head.flat[...] = np.random.default_rng(3).standard_normal(clf.head.flat.size) * 0.3
    return clf


def classifier_loss_and_grads(clf, texts, y, lowest=0):
    model, xp = clf.model, clf.model.xp
    tokens, pool = clf.batch(clf.encode(texts))
    h, caches = hidden_forward(model, tokens)
    logits, head_cache = classifier_head_forward(h, pool, clf.head["w"], clf.head["b"])
    loss, ce_cache = model.ops.cross_entropy_forward(xp, logits, y, 0.0)
    grads, head_grads = model.grads_like(), clf.head.zeros_like()
    if model.adapter is not None:
        grads.adapter = model.adapter.grads_like()
    dh = classifier_head_backward(model.ops.cross_entropy_backward(xp, ce_cache, 0.0), clf.head["w"],
                                  head_grads["w"], head_grads["b"], head_cache)
    hidden_backward(model, dh, caches, tokens, grads, lowest)
    return float(loss), grads, head_grads


TEXTS, Y = ["ab ab", "hello there world", "x"], np.array([0, 2, 1])


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_whole_path_gradients(pool):
    """Head, every model array and LoRA adapters, through padded batches, against finite differences."""
    clf = small_classifier(adapter=True, pool=pool)
    loss, grads, head_grads = classifier_loss_and_grads(clf, TEXTS, Y)
    f = lambda: classifier_loss_and_grads(clf, TEXTS, Y)[0]
    rng = np.random.default_rng(0)
    checks = [(clf.head[k], head_grads[k]) for k in ("w", "b")]
    checks += [(clf.model.params.stored[n], grads.stored[n]) for n in ("embed", "layers.0.w_in", "layers.1.w_out",
                                                                       "layers.2.norm", "norm")]
    checks += [(clf.model.adapter.params[n], grads.adapter[n]) for n in ("layers.0.wv.A", "layers.2.wo.B", "layers.1.w_up.B")]
    for p, g in checks:
        idx = rng.choice(p.size, min(p.size, 10), replace=False)
        if p is clf.model.embed:                        # rows of bytes that occur in the texts
            idx = np.array([ord("a") * 16 + j for j in range(8)] + [ord("x") * 16 + 3])
        numeric = numerical_grad(f, p, indices=idx).reshape(-1)[idx]
        assert np.linalg.norm(numeric) > 0
        assert rel_error(g.reshape(-1)[idx], numeric) < 1e-6


def test_top_layers_backward_stops_early_and_padding_is_invisible():
    clf = small_classifier()
    _, grads, _ = classifier_loss_and_grads(clf, TEXTS, Y, lowest=2)
    assert np.all(grads.stored["layers.1.w_in"] == 0) and np.all(grads.stored["embed"] == 0)
    assert np.any(grads.stored["layers.2.w_in"] != 0)
    alone = clf.logits(clf.encode(["x"]))
    padded = clf.logits(clf.encode(["x", "a much longer text"]))[:1]
    np.testing.assert_allclose(alone, padded, rtol=1e-12)


def test_label_log_likelihoods_match_the_loss():
    cfg = Config(vocab_size=256, d_model=16, n_layers=2, n_heads=4, max_seq_len=16, z_loss=0.0)
    model = PaLM(cfg, dtype="float64", seed=0)
    prompt, cont = [5, 9, 40], [[7, 8, 200, 3], [1]]
    scores = label_log_likelihoods(model, prompt, cont, score="sum")
    tokens = np.array([prompt + cont[0]])
    # the loss over the positions that predict the continuation, as the model computes it
    full = model.forward(tokens[:, :-1])[0]
    log_probs = full - np.log(np.exp(full).sum(axis=-1, keepdims=True))
    assert scores[0] == pytest.approx(sum(log_probs[2 + j, cont[0][j]] for j in range(4)), rel=1e-10)
    assert scores[1] == pytest.approx(float(log_probs[2, 1]), rel=1e-10)
    assert label_log_likelihoods(model, prompt, cont, score="mean")[0] == pytest.approx(scores[0] / 4)
    for empty in (([], cont), (prompt, [[1], []])):                 # nothing to predict from, or nothing to score
        with pytest.raises(TinyPalmError, match="the prompt and every continuation need at least one token"):
            label_log_likelihoods(model, *empty)


def test_fewshot_prompt():
    t = ByteTokenizer()
    ids = fewshot_prompt(t, [("one  two\nthree", "num"), ("alpha", "greek")], "query text here", per_text=8)
    assert t.decode(ids) == "Text: one two \nLabel: num\n\nText: alpha\nLabel: greek\n\nText: query te\nLabel:"


def test_split_is_stratified_seeded_and_disjoint():
    examples = [(f"t{i}", "a") for i in range(10)] + [(f"u{i}", "b") for i in range(5)] + [("lonely", "c")]
    train, test = split_examples(examples, 0.2, seed=1)
    assert sorted(train + test) == sorted(examples) and not set(train) & set(test)
    assert sorted(label for _, label in test) == ["a", "a", "b"]          # 20% of each label; c stays in train
    assert split_examples(examples, 0.2, seed=1) == (train, test)
    assert split_examples(examples, 0.2, seed=2) != (train, test)


def test_report():
    r = report(["a", "b", "c"], ["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"])
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (b["precision"], b["recall"], b["f1"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)


def test_read_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text('body,cls\n"a, quoted\ntext",x\nplain,y\n', encoding="utf-8")
    assert read_examples(str(tmp_path / "d.csv"), "body", "cls") == [("a, quoted\ntext", "x"), ("plain", "y")]
    (tmp_path / "d.jsonl").write_text('{"text": "hi", "label": 3}\n\n{"text": "yo", "label": "b"}\n', encoding="utf-8")
    assert read_examples(str(tmp_path / "d.jsonl")) == [("hi", "3"), ("yo", "b")]
    # what spreadsheets and json.dumps(ensure_ascii=False) write: a BOM, CRLF, U+2028 inside a string
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\r\ncafé,x\r\n".encode("utf-8"))
    assert read_examples(str(tmp_path / "bom.csv")) == [("café", "x")]
    (tmp_path / "ls.jsonl").write_bytes('\ufeff{"text": "a\u2028b", "label": "y"}\r\n'.encode("utf-8"))
    assert read_examples(str(tmp_path / "ls.jsonl")) == [("a\u2028b", "y")]


@pytest.mark.parametrize("content,words", [
    ("text,label\nhello, world,pos\n", ["row 2: 3 fields under a header of 2", "double quotes"]),
    ("text,label\rb,neg\rc,pos\r", ["not valid CSV", "new-line character"]),
])
def test_read_csv_refuses_rows_it_would_misread(tmp_path, content, words):
    (tmp_path / "d.csv").write_bytes(content.encode())
    with pytest.raises(TinyPalmError) as e:
        read_examples(str(tmp_path / "d.csv"))
    assert all(w in str(e.value) for w in words), str(e.value)


# --- end to end -------------------------------------------------------------------------------------------------

def task_rows(n, seed):
    """An easy two-label task: texts of digits against texts of letters."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 2:
            rows.append((" ".join("".join(rng.choice(list("0123456789"), 4)) for _ in range(4)), "digits"))
        else:
            rows.append((" ".join("".join(rng.choice(list("abcdefghij"), 4)) for _ in range(4)), "letters"))
    return rows


def write_csv(path, rows, header="text,label"):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)


@pytest.fixture(scope="module")
def work(corpus, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("classify")
    run("train.py", "--data", str(corpus), *TINY, "--seq-len", "64", "--max-steps", "5", "--out", "base", cwd=d)
    write_csv(d / "task.csv", task_rows(60, 0))
    return d


@pytest.fixture(scope="module")
def head(work):
    r = classify("train", "--data", "task.csv", "--ckpt", "base", "--mode", "head", "--lr", "3e-2", "--epochs", "8",
                 "--out", "head.npz", "--json", cwd=work)
    assert "mode head: 130 trainable parameters" in r.stderr            # (64 + 1) x 2; stdout: the JSON alone
    assert "note: --max-tokens 128 is beyond the model's context: it reads each text's first 64 tokens" in r.stderr
    assert "never learned" not in r.stderr                               # base trained on all 64 positions
    return json.loads(r.stdout)


def test_train_eval_predict_fewshot(work, head):
    d, trained = work, head
    assert trained["n"] == 12 and trained["accuracy"] >= 0.9, trained
    assert sum(map(sum, trained["confusion"])) == 12
    again = json.loads(classify("eval", "--model", "head.npz", "--json", cwd=d).stdout)
    assert again["accuracy"] == trained["accuracy"] and again["confusion"] == trained["confusion"]
    text = classify("eval", "--model", "head.npz", cwd=d).stdout
    assert "accuracy" in text and "precision  recall" in text and "confusion matrix" in text
    (d / "inputs.txt").write_text("1234 5678 9012\nabcd efgh\n\n0000\n", encoding="utf-8")
    p = classify("predict", "--model", "head.npz", "--input", "inputs.txt", cwd=d)
    assert p.stdout.splitlines()[:2] == ["digits", "letters"] and len(p.stdout.splitlines()) == 4
    # one label per \n line: a form feed, U+2028 or a lone \r inside a line is text; \r\n ends a line
    (d / "odd.txt").write_bytes("12\x0c34\nab\u2028cd\r\n56\r78\nxy".encode("utf-8"))
    p = classify("predict", "--model", "head.npz", "--input", "odd.txt", cwd=d)
    assert p.stdout.split("\n") == ["digits", "letters", "digits", "letters", ""]
    f = json.loads(classify("fewshot", "--data", "task.csv", "--ckpt", "base", "--shots", "1", "--score", "pmi",
                            "--json", cwd=d).stdout)
    assert f["n"] == 12 and 0 <= f["accuracy"] <= 1 and f["trainable_params"] == 0
    assert sum(map(sum, f["confusion"])) == 12
    # the tiny model's 64 positions hold one demonstration and the query, not three
    assert_user_error(classify("fewshot", "--data", "task.csv", "--ckpt", "base", "--shots", "3", cwd=d, check=False),
                      "--shots 3", "use fewer shots")


@pytest.mark.parametrize("mode", ["top", "lora", "full"])
def test_modes_save_and_reload(work, mode):
    d = work
    r = classify("train", "--data", "task.csv", "--ckpt", "base", "--mode", mode, "--lr", "1e-3", "--epochs", "1",
                 "--out", f"{mode}.npz", "--json", *(["--lora-rank", "2"] if mode == "lora" else []),
                 "--max-tokens", "32", cwd=d)
    assert "note: --max-tokens" not in r.stderr                         # within the model's 64 positions
    trained = json.loads(r.stdout)
    again = json.loads(classify("eval", "--model", f"{mode}.npz", "--json", cwd=d).stdout)
    assert again["accuracy"] == trained["accuracy"] and again["confusion"] == trained["confusion"]
    size = os.path.getsize(d / f"{mode}.npz")
    param_bytes = sum(p.nbytes for p in checkpoint.load(str(d / "base")).params.values())
    # the file holds what training changed: the top layer of two, the adapters, or everything
    assert {"top": 0.3 < size / param_bytes < 0.6, "lora": size / param_bytes < 0.1, "full": size > param_bytes}[mode]


def test_bad_input(work, head, tmp_path):
    d = work
    common = ["--ckpt", str(d / "base"), "--out", "x.npz"]
    (tmp_path / "cols.csv").write_text("sentence,label\nhi,a\n", encoding="utf-8")
    assert_user_error(classify("train", "--data", "cols.csv", *common, cwd=tmp_path, check=False),
                      "no column 'text'", "--text-field")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    assert_user_error(classify("train", "--data", "empty.csv", *common, cwd=tmp_path, check=False), "empty")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"\n', encoding="utf-8")
    assert_user_error(classify("fewshot", "--data", "bad.jsonl", "--ckpt", str(d / "base"), cwd=tmp_path, check=False),
                      "line 2", "not JSON")
    (tmp_path / "missing.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n', encoding="utf-8")
    assert_user_error(classify("train", "--data", "missing.jsonl", *common, cwd=tmp_path, check=False),
                      "line 2", "no field 'label'")
    write_csv(tmp_path / "test.csv", [("1234", "digits"), ("zz", "emoji")])
    assert_user_error(classify("train", "--data", str(d / "task.csv"), "--test-data", "test.csv", *common,
                               cwd=tmp_path, check=False), "'emoji'", "only in the test split")
    assert_user_error(classify("eval", "--model", str(d / "head.npz"), "--data", "test.csv", cwd=tmp_path, check=False),
                      "'emoji'", "only in the evaluation data")
    run("train.py", "--data", str(d / "task.csv"), *TINY, "--max-steps", "2", "--seed", "5", "--out", "other", cwd=tmp_path)
    assert_user_error(classify("eval", "--model", str(d / "head.npz"), "--ckpt", "other", cwd=tmp_path, check=False),
                      "trained on another base model", "--ckpt")
    assert_user_error(classify("train", "--data", str(d / "task.csv"), *common, "--mode", "lora", "--lora-rank", "0",
                               cwd=tmp_path, check=False), "--lora-rank 0")
    assert_user_error(classify("train", "--data", str(d / "task.csv"), *common, "--mode", "lora", "--lora-targets",
                               "wq,wz", cwd=tmp_path, check=False), "unknown projection wz")
    for flags, words in ((["--lr", "nan"], ["argument --lr: expected a finite number, got 'nan'"]),
                         (["--beta2", "1"], ["--beta2 must be in [0, 1), got 1.0"]),
                         (["--grad-clip", "-1"], ["--grad-clip must not be negative"]),
                         (["--seed", "-1"], ["--seed must not be negative, got -1"]),
                         (["--mode", "lora", "--lora-alpha", "-2"], ["--lora-alpha -2.0", "must be positive"]),
                         (["--top-layers", "2"], ["--top-layers applies to --mode top only", "mode is head"]),
                         (["--mode", "lora", "--lora-targets", ""], ["--lora-targets ''"]),
                         (["--mode", "full", "--lora-rank", "2"], ["--lora-rank applies to --mode lora only"]),
                         (["--mode", "top", "--lora-targets", "wq"], ["--lora-targets applies to --mode lora only"])):
        assert_user_error(classify("train", "--data", str(d / "task.csv"), *common, *flags, cwd=tmp_path, check=False),
                          *words)
    assert not (tmp_path / "x.npz").exists()
    r = classify("train", "--data", str(d / "task.csv"), "--ckpt", str(d / "base"), "--out", "cols.csv/c.npz",
                 cwd=tmp_path, check=False)                               # refused before it trains
    assert_user_error(r, "--out cols.csv/c.npz:", "cols.csv is a file, not a directory")
    assert "epoch" not in r.stdout
    (tmp_path / "inputs.txt").write_text("1234\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("the user's own file\n", encoding="utf-8")
    predict = ["predict", "--model", str(d / "head.npz"), "--input", "inputs.txt", "--output", "labels.txt"]
    assert_user_error(classify(*predict, cwd=tmp_path, check=False), "--output labels.txt exists", "--force")
    assert (tmp_path / "labels.txt").read_text(encoding="utf-8") == "the user's own file\n"
    classify(*predict, "--force", cwd=tmp_path)
    assert (tmp_path / "labels.txt").read_text(encoding="utf-8") == "digits\n"


def test_eval_refuses_a_split_whose_data_changed(work, tmp_path):
    # the held-out split is drawn again from the data file: changed, it could hold training examples
    d = work
    (tmp_path / "task.csv").write_bytes((d / "task.csv").read_bytes())
    classify("train", "--data", "task.csv", "--ckpt", str(d / "base"), "--epochs", "1", "--out", "c.npz", cwd=tmp_path)
    classify("eval", "--model", "c.npz", cwd=tmp_path)
    write_csv(tmp_path / "task.csv", task_rows(60, 1))
    assert_user_error(classify("eval", "--model", "c.npz", cwd=tmp_path, check=False),
                      "task.csv has changed since c.npz was trained on it", "--data FILE")
    assert json.loads(classify("eval", "--model", "c.npz", "--data", "task.csv", "--json", cwd=tmp_path).stdout)["n"] == 60
    os.remove(tmp_path / "task.csv")
    assert_user_error(classify("eval", "--model", "c.npz", cwd=tmp_path, check=False), "task.csv", "is gone", "--data FILE")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_on_the_cupy_standin_reads_the_host_once_per_epoch(work, mode, tmp_path):
    # the step (forward, backward, clipping, AdamW) never waits for the host; the epoch's losses come back at once
    from test_standin import run_on_standin
    epochs = 2
    out, reads = run_on_standin(["-m", "tinypalm.classify", "train", "--backend", "cupy", "--data", "task.csv",
                                 "--ckpt", "base", "--mode", mode, "--epochs", str(epochs),
                                 *(["--lora-rank", "2"] if mode == "lora" else []),
                                 "--out", str(tmp_path / "clf.npz")], work, tmp_path / "reads.json")
    assert f"epoch {epochs}/{epochs}" in out.stdout
    in_training = {site: n for site, n in reads.items() if site.endswith("(train)")}
    assert list(in_training.values()) == [epochs], reads              # the epoch's losses, together
    # the rest: the held-out logits after each epoch, and the trained arrays when saving
    assert all(site.endswith(("(train)", "(logits)", "(<dictcomp>)")) for site in reads), reads


def test_positions_the_model_never_trained_on(work, tmp_path):
    # a model trained on 16 of its 64 positions: classify notes texts read past them, and few-shot prompts too
    run("train.py", "--data", str(work / "task.csv"), *TINY, "--max-steps", "2", "--out", "short", cwd=tmp_path)
    r = classify("train", "--data", str(work / "task.csv"), "--ckpt", "short", "--mode", "head", "--epochs", "1",
                 "--out", "h.npz", cwd=tmp_path)
    assert "note: the model trained on 16 positions and never learned those past them; --max-tokens 16" in r.stdout
    r = classify("fewshot", "--data", str(work / "task.csv"), "--ckpt", "short", "--shots", "1", cwd=tmp_path)
    assert "note: prompts fill the model's 64 positions, and it trained on 16: it never learned those past them" \
        in r.stderr


def test_eval_reads_other_columns_and_train_survives_a_closed_pipe(work, head, tmp_path):
    rows = task_rows(20, 3)
    write_csv(tmp_path / "other.csv", rows, header="sentence,y")
    r = classify("eval", "--model", str(work / "head.npz"), "--data", "other.csv", "--text-field", "sentence",
                 "--label-field", "y", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["n"] == len(rows)
    assert_user_error(classify("eval", "--model", str(work / "head.npz"), "--text-field", "sentence", cwd=tmp_path,
                               check=False), "--text-field and --label-field name the columns of --data")
    # `classify train | head -1`: the reader goes after one line; training goes on, saves, and exits 0
    proc = subprocess.Popen([sys.executable, "-m", "tinypalm.classify", "train", "--data", str(work / "task.csv"),
                             "--ckpt", str(work / "base"), "--mode", "head", "--epochs", "3", "--out", "p.npz"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert (tmp_path / "p.npz").exists()


def test_trained_length_is_the_longest_recorded_run():
    from types import SimpleNamespace as NS
    from tinypalm.loading import trained_length
    config = NS(max_seq_len=64)
    base = NS(train_args={"seq_len": 32})
    assert trained_length(NS(config=config, adapter=None), base) == 32
    adapted = NS(config=config, adapter=NS(meta={"train_args": {"seq_len": 8}}))
    assert trained_length(adapted, base) == 32                       # a short LoRA run unlearns nothing
    assert trained_length(NS(config=config, adapter=NS(meta={"train_args": {"seq_len": 48}})), base) == 48
    assert trained_length(NS(config=config, adapter=None), NS(train_args={})) == 64     # nothing recorded
