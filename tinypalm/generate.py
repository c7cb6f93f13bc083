"""Autoregressive generation with a key/value cache.

With the cache, the prompt runs through the model once and each new token costs one position's work: its
query attends to the cached keys and values of every earlier position. Without it (use_cache=False), every
new token reruns the whole context, which gives the same logits at a far higher cost.
"""

import codecs

import numpy

from .backend import to_numpy
from .errors import TinyPalmError


def choose_token(logits, temperature, top_k, top_p, rng):
    """One token id from a (V,) host array of logits: greedy at temperature 0, else sampled."""
    if not numpy.isfinite(logits).all():
        raise TinyPalmError("the model's output holds NaN or infinite values, so no token can be chosen; its weights "
                            "are broken (a diverged run?): use an earlier checkpoint or train again with a lower --lr")
    if temperature == 0:
        return int(numpy.argmax(logits))
    logits = logits.astype(numpy.float64)
    with numpy.errstate(over="ignore"):                 # largest first at 0: a tiny temperature makes -inf, not NaN
        logits = (logits - logits.max()) / temperature
    if top_k and top_k < logits.size:
        logits[numpy.argpartition(-logits, top_k - 1)[top_k:]] = -numpy.inf     # exactly k kept, ties too
    probs = numpy.exp(logits)                          # the largest is 0, so nothing overflows
    probs /= probs.sum()
    if top_p and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probabilities add up to at least top_p
        order = numpy.argsort(-probs, kind="stable")
        cumulative = numpy.cumsum(probs[order])
        cut = int(numpy.searchsorted(cumulative, top_p)) + 1
        probs[order[cut:]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def check_sampling(n_prompt, max_new_tokens, temperature, top_k, top_p):
    """Refuse what generate cannot do: sample.py's flags check the same ranges, with the flags' names."""
    whole = lambda n: isinstance(n, (int, numpy.integer)) and not isinstance(n, bool)
    number = lambda x: isinstance(x, (int, float, numpy.integer, numpy.floating)) and not isinstance(x, bool)
    problems = [(n_prompt < 1, "the prompt is empty: pass at least one token id"),
                (not whole(max_new_tokens), f"max_new_tokens {max_new_tokens!r} must be a whole number"),
                (whole(max_new_tokens) and max_new_tokens < 0, f"max_new_tokens {max_new_tokens} is negative"),
                (not number(temperature), f"temperature {temperature!r} must be a number (0: greedy)"),
                (number(temperature) and not 0 <= temperature < float("inf"),
                 f"temperature {temperature} must be a finite number, at least 0"),
                (top_k is not None and not whole(top_k), f"top_k {top_k!r} must be a whole number (None: no limit)"),
                (top_k is not None and whole(top_k) and top_k < 1, f"top_k {top_k} must be at least 1 (None: no limit)"),
                (top_p is not None and not 0 < top_p <= 1, f"top_p {top_p} must be above 0 and at most 1 (None: none)")]
    for wrong, message in problems:
        if wrong:
            raise TinyPalmError(f"generate: {message}")


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=0,
             use_cache=True, on_token=None, stop_id=None):
    """Continue prompt_ids (a non-empty list of ints); returns the new ids. on_token(id) sees each as it is made.
    stop_id (an instruction-tuned model: tokenizer.eot_id): generation ends when the model makes it, the last id
    returned; without it, generation runs to max_new_tokens, past any end-of-text.

    A prompt longer than max_seq_len is cut to its last max_seq_len tokens. When the context outgrows
    max_seq_len, its last max_seq_len // 2 tokens (at least one) are kept (the cache rebuilt from them) and
    generation goes on."""
    check_sampling(len(prompt_ids), max_new_tokens, temperature, top_k, top_p)
    max_len = model.config.max_seq_len
    try:
        rng = numpy.random.default_rng(seed)          # None: fresh randomness from the operating system
    except (TypeError, ValueError) as e:
        raise TinyPalmError(f"generate: seed {seed!r}: {e}; give a whole number, at least 0 (or None)") from None
    context = list(prompt_ids)[-max_len:]
    new_ids = []
    cache, fed = None, 0                     # fed: how many of the context's tokens the cache holds
    for _ in range(max_new_tokens):
        if len(context) > max_len:
            context = context[-max(1, max_len // 2):]
            cache = None
        if not use_cache:
            logits = model.forward(numpy.array([context]))[0, -1]
        else:
            if cache is None:
                cache, fed = model.new_kv_cache(batch_size=1), 0
            logits = model.forward(numpy.array([context[fed:]]), cache)[0, -1]
            fed = len(context)
        token = choose_token(to_numpy(logits), temperature, top_k, top_p, rng)
        context.append(token)
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token == stop_id:
            break
    return new_ids


class StopGenerating(Exception):
    """Raised from the token callback to end generation early; carries the reason."""


class StopStreamer:
    """Writes new tokens' text as it comes, stopping at end-of-text or before the first stop string.

    Text that could be the start of a stop string is held back until it is clear it is not, so a stop string
    never reaches the output, even one that spans several tokens."""

    def __init__(self, out, tokenizer, stops=()):
        self.out, self.tokenizer, self.stops = out, tokenizer, [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a character may span tokens
        self.text, self.shown, self.ids = "", 0, []

    def __call__(self, token):
        self.ids.append(token)
        if token == self.tokenizer.eot_id:
            self.finish()            # text held back as a stop string's possible start was text after all
            raise StopGenerating("end-of-text")
        self.text += self.decoder.decode(self.tokenizer.token_bytes(token))
        start = max(0, self.shown - max((len(s) for s in self.stops), default=0))
        found = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            at, stop = min(found)
            self._show(at)
            raise StopGenerating(f"stop string {stop!r}")
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._show(len(self.text) - held)

    def _show(self, end):
        if end > self.shown:
            self.out.write(self.text[self.shown:end])
            self.out.flush()
            self.shown = end

    def finish(self):
        self.text += self.decoder.decode(b"", final=True)
        self._show(len(self.text))


def stream(model, tokenizer, prompt_ids, max_new_tokens, out, stops=(), echo=None, **sampling):
    """Write the prompt's text to out (echo, or else its ids decoded), then each new token's as it is made, up to
    end-of-text or a stop string.

    sampling: generate()'s keyword arguments (temperature, top_k, top_p, seed, use_cache). Returns (the new ids,
    why generation stopped early: "" when it made max_new_tokens)."""
    out.write(tokenizer.decode(prompt_ids) if echo is None else echo)
    out.flush()
    streamer, stopped = StopStreamer(out, tokenizer, stops), ""
    try:
        generate(model, prompt_ids, max_new_tokens, on_token=streamer, **sampling)
        streamer.finish()
    except StopGenerating as e:
        stopped = str(e)
    out.write("\n")
    out.flush()
    return streamer.ids, stopped
