"""train.py and sample.py as a user runs them: end to end, exact resume, fine-tuning, Ctrl-C, NaN, bad input."""

import json
import os
import shutil
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
    done = r.stdout[r.stdout.index("done: 20 steps"):r.stdout.index("--- sample ---")]
    for where in ("out/best.npz", "out/loss.svg", "out/metrics.jsonl", "python sample.py --ckpt out"):
        assert where in done, where
    log = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert any('"split": "val"' in line for line in log) and any('"split": "train"' in line for line in log)
    assert "<polyline" in (tmp_path / "out" / "loss.svg").read_text()
    s = run("sample.py", "--ckpt", "out", "--prompt", "the cat", "--max-new-tokens", "25", "--seed", "1", cwd=tmp_path)
    assert s.stdout.startswith("the cat") and len(s.stdout) > len("the cat")
    assert "tokens/s" in s.stderr and "loaded out/best.npz: step 20, best val loss" in s.stderr
    greedy = [run("sample.py", "--ckpt", "out/last.npz", "--temperature", "0", "--max-new-tokens", "20",
                  cwd=tmp_path).stdout for _ in range(2)]
    assert greedy[0] == greedy[1]
    ascii_terminal = run("sample.py", "--ckpt", "out", "--prompt", "café 😀", "--max-new-tokens", "3", cwd=tmp_path,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert ascii_terminal.stdout.startswith("caf? ?")        # what the terminal cannot show, not a crash
    (tmp_path / "p.txt").write_bytes(b"one\r\ntwo\r")          # --prompt-file: the text as it is, line ends too
    raw = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", "out", "--prompt-file", "p.txt",
                          "--max-new-tokens", "1"], cwd=tmp_path, capture_output=True, timeout=120)
    assert raw.returncode == 0 and raw.stdout.startswith(b"one\r\ntwo\r"), raw


def test_resume_is_exact(corpus, tmp_path):
    common = ["--data", str(corpus), *TINY, "--dtype", "float64", "--decay-steps", "20", "--dropout", "0.1"]
    run("train.py", *common, "--max-steps", "10", "--out", "a", cwd=tmp_path)
    run("train.py", "--resume", "--out", "a", "--max-steps", "20", cwd=tmp_path)
    run("train.py", *common, "--max-steps", "20", "--out", "b", cwd=tmp_path)
    resumed, straight = (checkpoint.load(str(tmp_path / d / "last.npz"), optimizer=True) for d in ("a", "b"))
    assert resumed.step == straight.step == 20
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])
    for key in straight.opt_state:
        np.testing.assert_array_equal(resumed.opt_state[key], straight.opt_state[key])


def test_bpe_tokenizer_is_trained_and_saved(corpus, tmp_path):
    r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", "--tokenizer", "bpe", "--vocab-size", "300",
            cwd=tmp_path)
    ck = checkpoint.load(str(tmp_path / "out" / "last.npz"))
    assert f"trained BPE: {ck.config.vocab_size} tokens" in r.stdout
    # fourteen words run out of repeating pairs long before 300 tokens, and the run says so
    assert ck.config.vocab_size < 300 and "not the 300 of --vocab-size: no other pair of tokens repeats" in r.stdout
    # the model's vocabulary is the tokenizer's: at most the 300 asked for (fewer if the corpus runs out of pairs)
    assert ck.tokenizer_dict["kind"] == "bpe"
    assert 256 < ck.config.vocab_size == 256 + len(ck.tokenizer_dict["merges"]) + 1 <= 300   # + end-of-text
    s = run("sample.py", "--ckpt", "out", "--prompt", "the dog 你好", "--max-new-tokens", "5", cwd=tmp_path)
    assert s.stdout.startswith("the dog 你好")


def test_prepared_token_file_trains(corpus, tmp_path):
    r = run("train.py", "--data", str(corpus), "--prepare", "corpus.tok", cwd=tmp_path)
    assert "wrote" in r.stdout and (tmp_path / "corpus.tok").exists()
    r = run("train.py", "--data", "corpus.tok", *TINY, "--max-steps", "5", cwd=tmp_path)
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 5
    assert "data: corpus.tok, a token file of" in r.stdout and "byte tokens (vocabulary 257)" in r.stdout
    # the token file fixes the tokenizer: flags that would change it are refused, not ignored
    r = run("train.py", "--data", "corpus.tok", *TINY, "--tokenizer", "bpe", "--out", "b", cwd=tmp_path, check=False)
    assert_user_error(r, "corpus.tok", "own tokenizer (byte, 257 tokens)", "drop --tokenizer", "--prepare")


def test_fine_tune_with_frozen_layers(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "10", "--out", "base", cwd=tmp_path)
    base = load_params(tmp_path / "base" / "last.npz")
    other = tmp_path / "other.txt"
    other.write_text("completely different text about numbers 123 456 789. " * 300)
    r = run("train.py", "--init-from", "base/last.npz", "--data", str(other), *TINY, "--max-steps", "5",
            "--freeze-layers", "1", "--out", "ft", cwd=tmp_path)
    assert "frozen: the embedding and layer 0 (" in r.stdout and "training layer 1 and the final norm" in r.stdout
    tuned = checkpoint.load(str(tmp_path / "ft" / "last.npz"), optimizer=True)
    assert tuned.step == 5 and int(tuned.opt_state["step"]) == 5           # a fresh optimizer
    for name in ("embed", "layers.0.wq", "layers.0.norm", "layers.0.w_down"):
        np.testing.assert_array_equal(tuned.params[name], base[name])
    for name in ("layers.1.wq", "layers.1.w_down", "norm"):
        assert not np.array_equal(tuned.params[name], base[name]), name
    r = run("train.py", "--init-from", "base/last.npz", "--d-model", "32", *TINY, cwd=tmp_path, check=False)
    assert_user_error(r, "--init-from", "--d-model")
    r = run("train.py", "--resume", "--out", "base", "--n-layers", "3", cwd=tmp_path, check=False)
    assert_user_error(r, "--resume", "--n-layers")


def test_ctrl_c_saves_and_exits_with_status_130(corpus, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus), *TINY,
                             "--max-steps", "100000", "--eval-every", "100000", "--log-every", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while not line.startswith("step 3/"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err                   # so `train.py && sample.py` stops here
    assert "continue with --resume" in out and "Traceback" not in err
    ck = checkpoint.load(str(tmp_path / "out" / "last.npz"))
    assert 3 <= ck.step < 100000
    # the evaluation made on stopping decides nothing the run goes by: no best.npz, no best loss, no --patience
    assert "on stopping, off the --eval-every steps that best.npz and --patience go by" in out
    assert ck.best_val_loss is None and ck.evals_without_gain == 0
    assert not (tmp_path / "out" / "best.npz").exists()


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_ctrl_c_while_the_modules_load_ends_quietly(script, tmp_path):
    # the disposition of SIGINT when tinypalm's modules are imported, and once the program runs: a Ctrl-C while
    # they load (a third of a second) ends the process as a shell expects, with no KeyboardInterrupt traceback
    probe = ("import runpy, signal, sys\n"
             "seen = []\n"
             "class Probe:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'tinypalm':\n"
             "            seen.append(signal.getsignal(signal.SIGINT) is signal.SIG_DFL)\n"
             "sys.meta_path.insert(0, Probe())\n"
             f"sys.argv = [{os.path.join(ROOT, script)!r}, '--help']\n"
             "try:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "seen.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
             "print(seen)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "[True, True]", (r.stdout, r.stderr)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", cwd=tmp_path)
    before = open(tmp_path / "out" / "last.npz", "rb").read()
    r = run("train.py", "--resume", "--max-steps", "200", "--lr", "1e30", "--min-lr", "1e30", "--grad-clip", "0",
            "--log-every", "1", cwd=tmp_path, check=False)
    assert_user_error(r, "training diverged", "last good checkpoint", "lower --lr")
    last_logged = [line for line in r.stdout.splitlines() if line.startswith("step ")][-1]
    done = int(last_logged.split()[1].split("/")[0])
    assert f"training diverged at step {done + 1}:" in r.stderr       # numbered as the progress lines number steps
    assert open(tmp_path / "out" / "last.npz", "rb").read() == before


def test_the_checkpoint_named_after_a_divergence_is_a_good_one(corpus, tmp_path):
    # lr 50 without clipping: the weights blow up while the training loss is still finite, and the first
    # non-finite loss is a validation loss, measured after the update; those weights must not be saved
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", cwd=tmp_path)
    r = run("train.py", "--data", str(corpus), *TINY, "--init-from", "out/best.npz", "--out", "div", "--lr", "50",
            "--min-lr", "0", "--warmup-steps", "0", "--grad-clip", "0", "--eval-every", "1", "--max-steps", "100",
            cwd=tmp_path, check=False)
    assert_user_error(r, "training diverged", "validation loss nan", "not saved",
                      "the last good checkpoint is div/last.npz")
    r = subprocess.run([sys.executable, "-m", "tinypalm.evaluate", "--ckpt", "div/last.npz", "--data", str(corpus),
                        "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert np.isfinite(json.loads(r.stdout)["loss"])


def test_flags_a_checkpoint_overrides_or_that_change_the_data_get_a_note(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", cwd=tmp_path)
    r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "1", "--init-from", "out/best.npz", "--out", "ft",
            cwd=tmp_path)
    assert "note: --preset tiny is not used: the model's shape comes from out/best.npz" in r.stdout
    (tmp_path / "other.txt").write_text("other text, " * 400)
    r = run("train.py", "--resume", "--data", "other.txt", "--max-steps", "3", cwd=tmp_path)
    assert f"note: --data other.txt is not the data this run trained on ({corpus})" in r.stdout
    assert "note: --data" not in run("train.py", "--resume", "--data", "other.txt", "--max-steps", "4", cwd=tmp_path).stdout


def test_learning_rate_schedules_that_surprise_get_a_note(corpus, tmp_path):
    r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "4", "--warmup-steps", "8", "--out", "w",
            cwd=tmp_path)
    assert "note: --warmup-steps 8 is beyond --max-steps 4: the learning rate climbs to 1.00e-03, never to --lr 0.002" \
        in r.stdout
    # a finished run trained further: its cosine decay follows the new --max-steps, back up from the floor
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "4", "--warmup-steps", "1", cwd=tmp_path)
    for keep in (False, True):
        shutil.copytree(tmp_path / "out", tmp_path / f"more{keep}")
        r = run("train.py", "--resume", "--out", f"more{keep}", "--max-steps", "8", "--log-every", "1",
                *(["--decay-steps", "4"] if keep else []), cwd=tmp_path)
        rates = {rec["step"]: rec["lr"] for rec in read_log(tmp_path / f"more{keep}" / "metrics.jsonl", "train")}
        if keep:
            assert "note: the cosine decay" not in r.stdout and rates[5] == pytest.approx(2e-4)      # the floor
        else:
            assert ("note: the cosine decay now ends at --max-steps 8, not 4: the learning rate at step 4 is "
                    f"{rates[5]:.2e} instead of 2.00e-04; pass --decay-steps 4 to keep the run's schedule") in r.stdout
            assert rates[5] > 5 * 2e-4


def test_prepare_never_replaces_a_file_unasked(corpus, tmp_path):
    (tmp_path / "src.txt").write_bytes(corpus.read_bytes())
    (tmp_path / "mine.tok").write_text("a file of the user's")
    assert_user_error(run("train.py", "--data", "src.txt", "--prepare", "mine.tok", cwd=tmp_path, check=False),
                      "--prepare mine.tok exists", "--overwrite")
    assert (tmp_path / "mine.tok").read_text() == "a file of the user's"
    (tmp_path / "folder").mkdir()
    assert_user_error(run("train.py", "--data", "src.txt", "--prepare", "folder", cwd=tmp_path, check=False),
                      "--prepare folder is a directory", "folder/train.tok")
    run("train.py", "--data", "src.txt", "--prepare", "new/dir/a.tok", cwd=tmp_path)      # its directory is made
    first = (tmp_path / "new" / "dir" / "a.tok").read_bytes()
    (tmp_path / "other.txt").write_text("other text " * 500)
    assert_user_error(run("train.py", "--data", "other.txt", "--prepare", "new/dir/a.tok", cwd=tmp_path, check=False),
                      "exists")
    assert (tmp_path / "new" / "dir" / "a.tok").read_bytes() == first
    run("train.py", "--data", "other.txt", "--prepare", "new/dir/a.tok", "--overwrite", cwd=tmp_path)
    assert (tmp_path / "new" / "dir" / "a.tok").read_bytes() != first
    # never its own input, even with --overwrite; never a token file read as text
    assert_user_error(run("train.py", "--data", "src.txt", "--prepare", "src.txt", "--overwrite", cwd=tmp_path,
                          check=False), "--prepare src.txt is --data itself")
    assert (tmp_path / "src.txt").read_bytes() == corpus.read_bytes()
    assert_user_error(run("train.py", "--data", "new/dir/a.tok", "--prepare", "b.tok", cwd=tmp_path, check=False),
                      "is a token file already", "--data new/dir/a.tok")
    assert_user_error(run("train.py", "--data", "other.txt", "--prepare", "src.txt/c.tok", cwd=tmp_path, check=False),
                      "--prepare src.txt/c.tok:", "src.txt is a file, not a directory")


def test_a_vocab_size_a_token_file_does_not_use_gets_a_note(corpus, tmp_path):
    run("train.py", "--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300", "--prepare", "b.tok",
        cwd=tmp_path)
    r = run("train.py", "--data", "b.tok", *TINY, "--max-steps", "1", "--tokenizer", "bpe", "--vocab-size", "400",
            cwd=tmp_path)
    assert "note: --vocab-size 400 is not used: --data b.tok (a token file) comes with its own tokenizer (bpe" in r.stdout
    assert_user_error(run("train.py", "--data", "b.tok", *TINY, "--max-steps", "1", "--tokenizer", "bpe",
                          "--vocab-size", "280", "--out", "o2", cwd=tmp_path, check=False), "cannot change")


def test_train_piped_into_head_trains_to_the_end(corpus, tmp_path):
    # the reader of stdout goes away after the first line: the run still trains and saves all its steps
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus), *TINY,
                             "--log-every", "1", "--max-steps", "30"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 30


def test_non_utf8_corpus_is_accepted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café olé naïve ".encode("latin-1") * 200 + b"\xff\xfe\x80")
    run("train.py", "--data", str(path), *TINY, "--max-steps", "2", cwd=tmp_path)
    run("train.py", "--data", str(path), *TINY, "--max-steps", "2", "--tokenizer", "bpe", "--vocab-size", "280",
        "--out", "bpe", cwd=tmp_path)


def test_long_prompt_is_cut_from_the_left_with_a_notice(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", "--max-seq-len", "32", cwd=tmp_path)
    r = run("sample.py", "--ckpt", "out", "--prompt", "x" * 100, "--max-new-tokens", "3", cwd=tmp_path)
    assert "the prompt is 100 tokens and the model sees at most 32; keeping its last 32" in r.stderr
    r = run("sample.py", "--ckpt", "out", "--prompt", "x" * 32, "--max-new-tokens", "1", cwd=tmp_path)
    assert "keeping" not in r.stderr and r.stdout.startswith("x" * 32)          # exactly max_seq_len: all of it
    # a cut inside a character (3 bytes each) shows no stray bytes of it; a BOM in a prompt file is dropped
    (tmp_path / "p.txt").write_bytes(("\ufeff" + "日" * 30 + "abc").encode("utf-8"))
    r = run("sample.py", "--ckpt", "out", "--prompt-file", "p.txt", "--max-new-tokens", "1", cwd=tmp_path)
    assert r.stdout.startswith("日" * 9 + "abc")                  # the last 32 bytes: 2 stray, 9 characters, abc
    r = run("sample.py", "--ckpt", "out", "--prompt", os.fsdecode(b"\x80\x80abc"), "--max-new-tokens", "1", cwd=tmp_path)
    assert r.stdout.startswith("\ufffd\ufffdabc")              # an uncut prompt is shown whole, odd bytes and all
    (tmp_path / "q.txt").write_bytes(("\ufeff" + "ab").encode("utf-8"))
    r = run("sample.py", "--ckpt", "out", "--prompt-file", "q.txt", "--max-new-tokens", "1", cwd=tmp_path)
    assert r.stdout.startswith("ab")


@pytest.mark.parametrize("args,words", [
    (["--data", "does/not/exist.txt"], ["does/not/exist.txt", "no such file"]),
    (["--data", "EMPTY"], ["empty"]),
    (["--data", "SHORT"], ["too short", "--seq-len"]),
    (["--preset", "huge"], ["unknown preset 'huge'"]),
    (["--d-model", "30", "--n-heads", "4"], ["not divisible by n_heads"]),
    (["--n-heads", "4", "--n-kv-heads", "3"], ["not divisible by n_kv_heads"]),
    (["--d-model", "20", "--n-heads", "4"], ["head_dim must be an even integer", "got 5"]),
    (["--head-dim", "7"], ["head_dim must be an even integer", "got 7"]),
    (["--resume"], ["--resume", "does not exist"]),
    (["--preset", "huge", "--data", "does/not/exist.txt"], ["unknown preset 'huge'"]),    # checked before any data
    (["--d-model", "30", "--n-heads", "4", "--data", "does/not/exist.txt"], ["not divisible by n_heads"]),
    (["--warmup-steps", "-1"], ["--warmup-steps must not be negative, got -1"]),
    (["--patience", "-1"], ["--patience must not be negative, got -1"]),
    (["--warmup-steps", "6", "--decay-steps", "3", "--max-steps", "10"],
     ["--decay-steps 3 ends the decay before --warmup-steps 6", "counts from step 0, warmup included"]),
    (["--save-every-s", "-5"], ["--save-every-s must not be negative"]),
    (["--lr", "1e-3", "--min-lr", "2e-3"], ["--min-lr 0.002 must be between 0 and --lr 0.001"]),
    (["--vocab-size", "512"], ["--vocab-size 512", "--tokenizer bpe"]),
    (["--preset", "palm-540b"], ["palm-540b", "needs about", "TiB", "smaller preset"]),
    (["--lr", "nan"], ["argument --lr: expected a finite number, got 'nan'", "see train.py --help"]),
    (["--grad-clip", "inf"], ["argument --grad-clip: expected a finite number, got 'inf'"]),
    (["--batch-size", "many"], ["argument --batch-size: invalid int value: 'many'", "see train.py --help"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["--seed", "-1"], ["--seed must not be negative, got -1"]),
    (["--rope-base", "0"], ["rope_base must be a finite number, above 0, got 0.0"]),
    (["--norm-eps", "-1"], ["norm_eps must be a finite number, above 0, got -1.0"]),
    (["--z-loss", "-1"], ["z_loss must be a finite number, at least 0, got -1.0"]),
    (["--out", "A_FILE"], ["--out A_FILE is a file", "directory"]),
])
def test_train_bad_input(args, words, tmp_path):
    (tmp_path / "A_FILE").write_text("a file of the user's")
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
    (tmp_path / "notes.txt").write_text("my notes\n")
    assert_user_error(run("sample.py", "--ckpt", "notes.txt", cwd=tmp_path, check=False),
                      "notes.txt: not a tinypalm checkpoint (not an .npz file)")
    np.savez(tmp_path / "foreign.npz", w=np.zeros(2))
    assert_user_error(run("sample.py", "--ckpt", "foreign.npz", cwd=tmp_path, check=False), "not a tinypalm checkpoint")
    with np.load(tmp_path / "out" / "last.npz") as npz:
        arrays = dict(npz)
    arrays["meta"] = np.array(str(arrays["meta"]).replace('"version": 1', '"version": 7'))
    np.savez(tmp_path / "future.npz", **arrays)
    assert_user_error(run("sample.py", "--ckpt", "future.npz", cwd=tmp_path, check=False), "version 7")
    with np.load(tmp_path / "out" / "last.npz") as npz:
        arrays = dict(npz)
    arrays["param.layers.0.wq"][0, :] = np.nan                         # what a diverged run could leave
    np.savez(tmp_path / "nan.npz", **arrays)
    assert_user_error(run("sample.py", "--ckpt", "nan.npz", cwd=tmp_path, check=False),
                      "nan.npz", "layers.0.wq holds NaN", "earlier checkpoint")
    assert_user_error(run("sample.py", "--ckpt", "out", "--prompt-file", "nope.txt", cwd=tmp_path, check=False),
                      "nope.txt")


def read_log(path, split):
    return [json.loads(line) for line in open(path) if json.loads(line)["split"] == split]


def test_lr_never_climbs_above_lr(corpus, tmp_path):
    # a fine-tuning rate below the old fixed 2e-4 floor: the floor now follows --lr (lr / 10)
    run("train.py", "--data", str(corpus), *TINY, "--lr", "1e-4", "--warmup-steps", "2", "--max-steps", "8",
        "--log-every", "1", cwd=tmp_path)
    rates = [r["lr"] for r in read_log(tmp_path / "out" / "metrics.jsonl", "train")]
    assert len(rates) == 8 and max(rates) <= 1e-4
    assert rates[1] == pytest.approx(1e-4) and rates[-1] < rates[1] and min(rates[2:]) >= 1e-5
    r = run("train.py", "--data", str(corpus), *TINY, "--lr", "1e-4", "--min-lr", "2e-4", "--out", "b", cwd=tmp_path,
            check=False)
    assert_user_error(r, "--min-lr 0.0002", "--lr 0.0001")


def test_a_new_run_never_replaces_a_trained_one_unasked(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", cwd=tmp_path)
    before = (tmp_path / "out" / "best.npz").read_bytes()
    for extra in ([], ["--init-from", "out/best.npz"]):
        r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", *extra, cwd=tmp_path, check=False)
        assert_user_error(r, "--out out already holds a trained run", "out/best.npz: step 5, best val loss",
                          "--resume", "another --out", "--overwrite")
    assert (tmp_path / "out" / "best.npz").read_bytes() == before
    r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", "--overwrite", cwd=tmp_path)
    assert "--overwrite: replacing the run in out" in r.stdout
    assert checkpoint.load(str(tmp_path / "out" / "best.npz")).step == 2
    assert [rec["step"] for rec in read_log(tmp_path / "out" / "metrics.jsonl", "val")] == [2]   # a fresh log
    assert_user_error(run("train.py", "--resume", "--overwrite", cwd=tmp_path, check=False), "exclude each other")
    r = run("train.py", "--resume", cwd=tmp_path, check=False)           # a finished run: say how to go on
    assert_user_error(r, "already at step 2 of --max-steps 2", "raise --max-steps")


def test_resume_counts_patience_on_from_where_the_run_stopped(corpus, tmp_path):
    # an lr far below the weights' float32 resolution leaves them as they are: every evaluation after the first
    # gives the same loss, no improvement
    frozen_run = [*TINY, "--lr", "1e-30", "--eval-every", "1", "--max-steps", "50"]
    r = run("train.py", "--data", str(corpus), *frozen_run, "--patience", "2", cwd=tmp_path)
    assert "early stop: no improvement in 2 evaluations" in r.stdout
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 3
    r = run("train.py", "--resume", "--patience", "2", cwd=tmp_path, check=False)
    assert_user_error(r, "out/last.npz stopped early at step 3", "--patience 2", "raise --patience", "--patience 0")
    r = run("train.py", "--resume", "--patience", "3", cwd=tmp_path)     # one more evaluation without gain
    assert "resuming at step 3" in r.stdout and "early stop: no improvement in 3 evaluations" in r.stdout
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 4


def test_one_out_directory_holds_one_running_run(corpus, tmp_path):
    proc = train_until(tmp_path, "step 5/", "--data", str(corpus), *TINY, "--max-steps", "100000", "--log-every", "1")
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "200000", *extra, cwd=tmp_path,
                    check=False)
            assert_user_error(r, "--out out is in use by another training run right now", "pick another --out")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    stopped_at = checkpoint.load(str(tmp_path / "out" / "last.npz")).step          # its checkpoint, untouched
    assert stopped_at >= 5
    run("train.py", "--resume", "--max-steps", str(stopped_at + 2), cwd=tmp_path)  # free again once it has ended


def test_overwrite_never_deletes_the_checkpoint_a_run_starts_from(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "5", cwd=tmp_path)
    before = (tmp_path / "out" / "best.npz").read_bytes()
    for extra in ([], ["--lora-rank", "2"]):
        r = run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", "--init-from", "out/best.npz",
                "--overwrite", *extra, cwd=tmp_path, check=False)
        assert_user_error(r, "--init-from out/best.npz is a checkpoint of the run in --out out", "copy it out of out")
    assert (tmp_path / "out" / "best.npz").read_bytes() == before


def test_a_killed_save_leaves_nothing_behind_at_the_next_start(corpus, tmp_path):
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", cwd=tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / "out" / f"last.npz.tmp{gone.pid}"
    stale.write_bytes(b"\0" * 3 * 2**20)                      # what a kill -9 in the middle of a save leaves
    live = tmp_path / "out" / f"best.npz.tmp{os.getpid()}"     # a live process's: it may be saving right now
    live.write_bytes(b"\0")
    r = run("train.py", "--resume", "--max-steps", "3", cwd=tmp_path)
    assert f"removed {os.path.join('out', stale.name)} (3.0 MB)" in r.stderr
    assert not stale.exists() and live.exists()
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 3


def train_until(tmp_path, line_start, *args):
    """Start train.py and read its output until a line starts with line_start; returns the running process."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while not line.startswith(line_start):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    return proc


def test_timed_saves_between_evaluations_survive_kill_9(corpus, tmp_path):
    proc = train_until(tmp_path, "step 20/", "--data", str(corpus), *TINY, "--max-steps", "100000",
                       "--eval-every", "100000", "--log-every", "1", "--save-every-s", "0.001")
    proc.kill()
    proc.communicate(timeout=60)
    ck = checkpoint.load(str(tmp_path / "out" / "last.npz"), optimizer=True)
    assert 1 <= ck.step <= 20 and ck.opt_state is not None              # saved with no evaluation at all
    assert not (tmp_path / "out" / "best.npz").exists()
    assert read_log(tmp_path / "out" / "metrics.jsonl", "val") == []


def test_ctrl_c_during_the_final_sample_stops_it_with_status_130(corpus, tmp_path):
    proc = train_until(tmp_path, "--- sample ---", "--data", str(corpus), *TINY[:-2], "--max-steps", "3",
                       "--sample-tokens", "100000")
    assert len(proc.stdout.read(20)) == 20 and proc.poll() is None     # the sample streams while it is made
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 3


def test_help_shows_defaults(tmp_path):
    for command, defaults in [([os.path.join(ROOT, "train.py")], ["(default: 0.002)", "(default: 16)", "(default: out)",
                                                                  "(default: 600)", "(default: --lr / 10)",
                                                                  "before the residual add (default: 0.0)",
                                                                  "(0: never) (default: 0)"]),
                              ([os.path.join(ROOT, "sample.py")], ["(default: 500)", "(default: 0.8)"]),
                              (["-m", "tinypalm.bench"], ["(default: 12)", "(default: 64)"]),
                              (["-m", "tinypalm.evaluate"], ["windows per forward pass (default: 8)"]),
                              (["-m", "tinypalm.classify", "train"], ["decayed linearly to 0 (default: 2e-05)",
                                                                      "passes over the training examples (default: 3)"])]:
        r = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        for d in defaults:
            assert d in " ".join(r.stdout.split()), (command, d)


def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(corpus, tmp_path):
    # the disk fills up after the first evaluation's two saves (best.npz, last.npz)
    script = ("import errno, numpy, runpy, sys\n"
              "real, calls = numpy.savez, []\n"
              "def savez(file, **arrays):\n"
              "    calls.append(1)\n"
              "    if len(calls) > 2:\n"
              "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "    real(file, **arrays)\n"
              "numpy.savez = savez\n"
              f"sys.argv = [{os.path.join(ROOT, 'train.py')!r}] + sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", script, "--data", str(corpus), *TINY, "--max-steps", "10"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_user_error(r, "cannot write checkpoint out/best.npz: No space left on device",
                      "the previous out/best.npz is intact")
    assert checkpoint.load(str(tmp_path / "out" / "last.npz")).step == 5
    assert sorted(os.listdir(tmp_path / "out")) == ["best.npz", "last.npz", "loss.svg", "metrics.jsonl"]


@pytest.mark.parametrize("args,words", [
    (["--preset", "palm-540b"], ["palm-540b", "needs about", "TiB", "smaller preset"]),
    (["--preset", "nope"], ["unknown preset 'nope'"]),
    (["--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
    (["--steps", "0"], ["--steps must be at least 1"]),
    (["--peak-tflops", "-5"], ["--peak-tflops -5.0", "above 0"]),
    (["--peak-tflops", "nan"], ["argument --peak-tflops: expected a finite number"]),
    (["TINYPALM_NUM_THREADS=0"], ["TINYPALM_NUM_THREADS='0'", "a positive whole number"]),
])
def test_bench_bad_input(args, words, tmp_path):
    env = {**os.environ, **dict(a.split("=") for a in args if "=" in a)}
    r = subprocess.run([sys.executable, "-m", "tinypalm.bench", *[a for a in args if "=" not in a]], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120, env=env)
    assert_user_error(r, *words)


def test_bench_cupy_without_a_gpu(tmp_path):
    try:
        import cupy
        if cupy.is_available():
            pytest.skip("a GPU is present; the error path cannot be reached")
    except Exception:
        pass
    r = subprocess.run([sys.executable, "-m", "tinypalm.bench", "--backend", "cupy"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert_user_error(r, "--backend cupy", "--backend numpy")


@pytest.mark.parametrize("args,words", [
    (["--top-k", "-5"], ["--top-k must be at least 1, got -5"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1, got 0"]),
    (["--num-samples", "0"], ["--num-samples must be at least 1, got 0"]),
    (["--temperature", "-1"], ["--temperature must not be negative, got -1.0"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1], got 1.5"]),
    (["--temperature", "nan"], ["argument --temperature: expected a finite number, got 'nan'", "see sample.py --help"]),
    (["--seed", "-1"], ["--seed must not be negative, got -1"]),
    (["--prompt", "a", "--prompt-file", "p.txt"], ["argument --prompt-file: not allowed with argument --prompt"]),
    (["--stop", ""], ["--stop ''", "empty string"]),
    (["--prompt", ""], ["the prompt is empty"]),                # said before any checkpoint is read
    (["--prompt", "\\q"], ["no such checkpoint"]),               # an unknown escape stays as it is, unwarned
])
def test_sample_bad_input(args, words, tmp_path):
    r = run("sample.py", "--ckpt", "out", *args, cwd=tmp_path, check=False)
    assert_user_error(r, *words)


def test_data_notices_for_binary_files_and_folders(corpus, tmp_path):
    folder = tmp_path / "docs"
    (folder / ".git").mkdir(parents=True)
    (folder / "a.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "b.txt").write_text("more text\n")
    (folder / "logo.png").write_bytes(b"\x89PNG\0\0\0" * 100)
    r = run("train.py", "--data", "docs", "--prepare", "docs.tok", cwd=tmp_path)
    assert "note: --data docs: reading 2 text files, skipping 1 binary (logo.png) and 1 hidden\n" in r.stderr
    os.symlink("moved.txt", folder / "notes.txt")                  # a link to a file that is gone
    r = run("train.py", "--data", "docs", "--prepare", "docs2.tok", cwd=tmp_path)
    assert ("note: --data docs: reading 2 text files, skipping 1 binary (logo.png), 1 hidden and 1 broken link "
            "(notes.txt)\n") in r.stderr
    r = run("train.py", "--data", "docs/logo.png", "--prepare", "logo.tok", cwd=tmp_path)
    assert "note: --data docs/logo.png looks binary" in r.stderr


def test_output_to_a_file_or_pipe_is_utf8_and_a_closed_pipe_on_windows_is_a_gone_reader(monkeypatch, tmp_path):
    import errno
    import io
    from tinypalm import cli
    # stdout redirected where the locale's encoding is cp1252 (Windows): labels and samples arrive as UTF-8
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="cp1252"))
    with pytest.raises(SystemExit) as done:
        cli.run_cli(lambda: (print("正面 Ελληνικά"), sys.exit(0)))
    assert done.value.code == 0
    sys.stdout.flush()
    assert raw.getvalue().decode("utf-8") == "正面 Ελληνικά\n"

    class ClosedPipe:                        # what a write to a pipe whose reader has gone raises on Windows
        def __init__(self, path):
            self.file = open(path, "w")

        def write(self, text):
            raise OSError(errno.EINVAL, "Invalid argument")

        def fileno(self):
            return self.file.fileno()
    out = cli.StdoutThatMayClose(ClosedPipe(tmp_path / "pipe"))
    with pytest.raises(OSError):             # elsewhere EINVAL is a real error
        out.write("x")
    monkeypatch.setattr(os, "name", "nt")
    assert out.write("step 1\n") == 7        # the run carries on, its output going nowhere
    out.stream.file.close()



def test_commands_shown_to_the_user_are_quoted_for_their_shell(monkeypatch):
    from tinypalm.cli import shell_quote
    assert shell_quote("my run") == "'my run'" and shell_quote("out") == "out"
    monkeypatch.setattr(os, "name", "nt")                         # cmd.exe knows double quotes only
    assert shell_quote("my run") == '"my run"' and shell_quote("out") == "out"
