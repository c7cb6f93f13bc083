"""Generation: the KV cache changes nothing but the cost; greedy is deterministic; sampling filters."""

import numpy as np
import pytest

from tinypalm import Config, PaLM, TinyPalmError
from tinypalm.generate import choose_token, generate


def model():
    return PaLM(Config.preset("tiny", max_seq_len=16), dtype="float64", seed=4)


def test_cached_and_uncached_generation_agree_past_the_context_limit():
    m = model()
    prompt = [5, 9, 11]
    # 30 new tokens overflow max_seq_len 16, so the context is cut back to its last half along the way
    cached = generate(m, prompt, 30, temperature=0.0, use_cache=True)
    full = generate(m, prompt, 30, temperature=0.0, use_cache=False)
    assert cached == full and len(cached) == 30


def test_greedy_is_deterministic_and_picks_the_argmax():
    m = model()
    a = generate(m, [1, 2, 3], 10, temperature=0.0, seed=1)
    b = generate(m, [1, 2, 3], 10, temperature=0.0, seed=2)
    assert a == b
    assert a[0] == int(np.argmax(m.forward(np.array([[1, 2, 3]]))[0, -1]))


def test_sampling_is_reproducible_per_seed():
    m = model()
    assert generate(m, [7], 20, seed=3) == generate(m, [7], 20, seed=3)
    assert generate(m, [7], 20, seed=3) != generate(m, [7], 20, seed=4)


def test_top_k_and_top_p_restrict_the_choice():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.9, -1.0, 2.8])
    picks = {choose_token(logits, 1.0, 2, None, rng) for _ in range(300)}
    assert picks == {1, 2}
    assert {choose_token(logits, 1.0, 1, None, rng) for _ in range(50)} == {1}
    probs = np.exp(logits) / np.exp(logits).sum()          # p = .03, .38, .35, .01, .32 (rounded)
    assert probs[1] + probs[2] < 0.8 < probs[1] + probs[2] + probs[4]
    picks = {choose_token(logits, 1.0, None, 0.8, rng) for _ in range(500)}
    assert picks == {1, 2, 4}
    assert {choose_token(logits, 1.0, None, 0.01, rng) for _ in range(50)} == {1}


def test_stream_writes_each_token_as_it_is_made():
    from tinypalm.generate import stream
    from tinypalm.tokenizer import ByteTokenizer

    class Recorder:
        def __init__(self):
            self.parts, self.flushes = [], 0

        def write(self, text):
            self.parts.append(text)

        def flush(self):
            self.flushes += 1

    m, tok, out = model(), ByteTokenizer(), Recorder()
    new, stopped = stream(m, tok, [104, 105], 12, out, temperature=0.0)
    assert stopped == "" and new == generate(m, [104, 105], 12, temperature=0.0)
    assert "".join(out.parts) == "hi" + tok.decode(new) + "\n"
    assert out.flushes >= 12 + 1                      # the prompt, then once per token


@pytest.mark.parametrize("prompt,kwargs,words", [
    ([], {}, "the prompt is empty"),
    ([1], {"max_new_tokens": -3}, "max_new_tokens -3 is negative"),
    ([1], {"temperature": float("nan")}, "temperature nan must be a finite number, at least 0"),
    ([1], {"temperature": -1.0}, "temperature -1.0"),
    ([1], {"top_k": 0}, "top_k 0 must be at least 1"),
    ([1], {"top_p": 0.0}, "top_p 0.0 must be above 0 and at most 1"),
    ([1], {"top_p": 2.0}, "top_p 2.0"),
    ([1], {"temperature": None}, "temperature None must be a number"),
    ([1], {"seed": -1}, "seed -1: .*give a whole number, at least 0"),
])
def test_generate_refuses_what_it_cannot_do(prompt, kwargs, words):
    with pytest.raises(TinyPalmError, match=f"generate: {words}"):
        generate(model(), prompt, **{"max_new_tokens": 2, **kwargs})


def test_generate_with_a_one_token_context_and_whole_number_arguments():
    model = PaLM(Config(vocab_size=16, d_model=8, n_layers=1, n_heads=1, max_seq_len=1), seed=0)
    greedy = generate(model, [1, 2, 3], 4, temperature=0)
    assert len(greedy) == 4
    expect, token = [], 3                                   # each token from the last one alone
    for _ in range(4):
        token = int(np.argmax(model.forward(np.array([[token]]))[0, -1]))
        expect.append(token)
    assert greedy == expect
    for kwargs, words in ((dict(max_new_tokens=2.5), "max_new_tokens 2.5 must be a whole number"),
                          (dict(max_new_tokens=2, top_k=2.5), "top_k 2.5 must be a whole number"),
                          (dict(max_new_tokens=True), "max_new_tokens True")):
        with pytest.raises(TinyPalmError, match=words):
            generate(model, [1], **kwargs)


def test_top_k_keeps_exactly_k_tokens_and_a_tiny_temperature_is_greedy():
    tied = np.array([1.0, 1.0, 1.0, 0.0, 0.0])                    # three tokens tie for the top
    for k in (1, 2):
        chosen = {choose_token(tied, 1.0, k, None, np.random.default_rng(seed)) for seed in range(60)}
        assert len(chosen) == k and chosen <= {0, 1, 2}
    logits = np.array([0.5, 3.0, -1.0, 2.9])
    for temperature in (1e-309, 1e-320):                            # logits / T would be inf - inf: NaN
        assert choose_token(logits, temperature, None, None, np.random.default_rng(0)) == 1


def test_generate_ends_at_the_stop_id():
    m = PaLM(Config(vocab_size=16, d_model=8, n_layers=1, n_heads=1, max_seq_len=16), seed=0)
    greedy = generate(m, [1, 2], 6, temperature=0)
    assert generate(m, [1, 2], 6, temperature=0, stop_id=greedy[2]) == greedy[:greedy.index(greedy[2]) + 1]
    assert generate(m, [1, 2], 6, temperature=0, stop_id=99) == greedy   # an id it never makes: to the end
