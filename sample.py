"""Generate text from a trained checkpoint, streaming tokens as they are made.

    python sample.py --ckpt out                                   # out/best.npz (or out/last.npz)
    python sample.py --ckpt out/last.npz --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 50
    python sample.py --ckpt out --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    python sample.py --ckpt out --temperature 0                   # greedy: the same text every time
    python sample.py --ckpt out --adapter lora_out                # with LoRA adapters trained on that checkpoint
    python sample.py --ckpt sft --prompt "Q: ..." --stop "\\n\\n" "###"  # stop at either string (not shown)

Generation also stops when the model emits the end-of-text token (instruction-tuned models end answers with it).
"""

import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)     # Ctrl-C while the modules below load: a quiet exit

import re
import sys
import time
import warnings

from tinypalm import TinyPalmError
from tinypalm.cli import ArgumentParser, check_ranges, finite_float, run_cli
from tinypalm.generate import stream
from tinypalm.loading import load_model


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint .npz, or a training --out directory (its best.npz, else last.npz)")
    p.add_argument("--adapter", default=None, help="LoRA adapter file (or a LoRA run's --out) trained on --ckpt")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="\n", help="text to continue (default: a newline); backslash escapes such "
                   "as \\n are understood (--prompt-file takes its text as it is)")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file instead of --prompt")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="sampling temperature; 0 picks the most likely token every time")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=finite_float, default=None,
                   help="sample among the most likely tokens holding this much probability (default: all)")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling; sample i uses seed + i")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64", "bfloat16"],
                   help="the dtype of the weights and activations (default: the one the checkpoint was trained in)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token (slow; for comparison)")
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="TEXT",
                   help="stop when the new text contains one of these strings, which is not shown; backslash "
                        "escapes such as \\n are understood")
    return p


# Python's string escapes; a bare \x, \u, \U or \N (no digits or name after it) is matched to be refused
ESCAPE = re.compile(r"\\(?:[\\'\"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]*\}|[xuUN])")


def parse_escapes(text, flag):
    """A --prompt or --stop string with its backslash escapes (\\n, \\t, \\x41, \\u00e9) turned into characters:
    a shell passes "Q: cat\\n" as a backslash and an n. Any other backslash (\\q, \\日) is kept as it is."""
    def one(escape):
        try:
            with warnings.catch_warnings():        # \777 decodes (to U+01FF), without Python's warning about it
                warnings.simplefilter("ignore", DeprecationWarning)
                return escape.group().encode("ascii").decode("unicode_escape")
        except UnicodeError as e:
            raise TinyPalmError(f"{flag} {text!r}: bad backslash escape {escape.group()!r} ({getattr(e, 'reason', e)}); "
                                "write a backslash as \\\\") from None
    return ESCAPE.sub(one, text)


def read_prompt(args):
    if args.prompt_file is None:
        return parse_escapes(args.prompt, "--prompt")
    try:
        with open(args.prompt_file, encoding="utf-8-sig", newline="") as f:  # \r\n stays \r\n; a BOM is dropped
            return f.read()
    except FileNotFoundError:
        raise TinyPalmError(f"--prompt-file {args.prompt_file}: no such file; pass an existing UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinyPalmError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from None


def check_args(args):
    check_ranges(args, at_least_1=["max_new_tokens", "num_samples"], not_negative=["seed"])
    if args.temperature < 0:
        raise TinyPalmError(f"--temperature must not be negative, got {args.temperature} (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise TinyPalmError(f"--top-k must be at least 1, got {args.top_k} (leave it out to sample among all tokens)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise TinyPalmError(f"--top-p must be in (0, 1], got {args.top_p}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    stops = [parse_escapes(s, "--stop") for s in args.stop]
    if "" in stops:
        raise TinyPalmError("--stop '': an empty string would stop at once; give the text to stop at")
    prompt = read_prompt(args)
    if not prompt:
        raise TinyPalmError("the prompt is empty; pass some text with --prompt or --prompt-file")
    model, tokenizer, ckpt = load_model(args.ckpt, args.adapter, backend=args.backend, dtype=args.dtype, trains=False)
    val = f", best val loss {ckpt.best_val_loss:.4f}" if ckpt.best_val_loss is not None else ""
    adapter = f", with the adapter {model.adapter.path}" if model.adapter is not None else ""
    print(f"loaded {ckpt.path}: step {ckpt.step}{val}, {ckpt.config.n_params() / 1e6:.2f}M parameters{adapter}",
          file=sys.stderr)

    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    limit = model.config.max_seq_len
    echo = None
    if len(prompt_ids) > limit:
        print(f"note: the prompt is {len(prompt_ids)} tokens and the model sees at most {limit}; "
              f"keeping its last {limit}", file=sys.stderr)
        prompt_ids = prompt_ids[-limit:]
        # the cut may fall inside a character: its stray continuation bytes (3 at most) are not shown
        kept = tokenizer.decode_bytes(prompt_ids)
        echo = (kept[:3].lstrip(bytes(range(0x80, 0xC0))) + kept[3:]).decode("utf-8", errors="replace")

    out = sys.stdout
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        start = time.perf_counter()
        new, stopped = stream(model, tokenizer, prompt_ids, args.max_new_tokens, out, stops,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + i,
                              use_cache=not args.no_cache, echo=echo)
        seconds = time.perf_counter() - start
        print(f"[{len(new)} tokens in {seconds:.2f}s, {len(new) / seconds:.1f} tokens/s"
              f"{', no cache' if args.no_cache else ''}{f'; stopped at {stopped}' if stopped else ''}]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
