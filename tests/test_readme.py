"""The README's Python snippets run as written, in order, and do what their comments say: the docs cannot drift
from the code unnoticed."""

import os
import re

import numpy as np

from tinypalm import PaLM
from test_cli import ROOT, TINY, corpus, run  # noqa: F401  (corpus is a fixture)


def python_blocks():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readmes_python_snippets_run(corpus, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2                        # the model's API and LoRA's
    run("train.py", "--data", str(corpus), *TINY, "--max-steps", "2", cwd=tmp_path)    # the "out" they load
    monkeypatch.chdir(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    scope = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1)}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    model = scope["model"]
    assert isinstance(model, PaLM) and scope["tokenizer"] is not None and scope["ckpt"].step == 2
    assert 1 <= len(scope["new_ids"]) <= 20 and scope["text"] == scope["tokenizer"].decode(scope["new_ids"])
    loss, grads = scope["loss"], scope["grads"]
    assert np.isfinite(float(loss))
    assert grads.flat.size == 0                    # LoRA's block froze the base: no weight gradients
    assert grads.adapter.flat.size == model.adapter.n_params > 0
    assert scope["logits"].shape == (2, 16, 256)
