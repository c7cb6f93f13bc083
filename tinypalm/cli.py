"""What the command-line programs share: clean exits on user errors, --help with defaults, durations for humans."""

import argparse
import errno
import json
import math
import os
import shlex
import signal
import subprocess
import sys

from .errors import TinyPalmError, os_error_advice


def run_cli(main):
    """Run main(); a TinyPalmError (or an OSError: full disk, permissions) becomes one line on stderr and exit
    status 2, with no traceback. Ctrl-C exits with 130, as shells expect, so `a && b` stops."""
    signal.signal(signal.SIGINT, signal.default_int_handler)   # a program may quiet Ctrl-C while it imports
    if hasattr(sys.stdout, "reconfigure"):     # text the terminal's encoding lacks (LANG=C, a Windows console)
        sys.stdout.reconfigure(errors="replace")              # prints as ?, instead of ending the program
        if not sys.stdout.isatty() and "PYTHONIOENCODING" not in os.environ:
            sys.stdout.reconfigure(encoding="utf-8", errors="replace")   # a file or pipe: UTF-8 (Windows: not cp1252)
    try:
        main()
    except TinyPalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:      # output piped into `head` and the like
        sys.exit(0)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; {os_error_advice(e)}", file=sys.stderr)
        sys.exit(2)


def finite_float(text):
    """argparse type for a real number: nan and inf are refused (argparse then names the flag, exit status 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_ranges(args, at_least_1=(), not_negative=(), fraction=()):
    """Refuse, in one line naming the flag and its value, a count below 1, an amount below 0 or a rate outside
    [0, 1). A name the args lack (another subcommand's flag) or left at None is not checked."""
    for names, ok, rule in ((at_least_1, lambda v: v >= 1, "must be at least 1"),
                            (not_negative, lambda v: v >= 0, "must not be negative"),
                            (fraction, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not ok(value):
                raise TinyPalmError(f"--{name.replace('_', '-')} {rule}, got {value}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a mistake on the command line told as every other user error: one line,
    `error: ...`, and exit status 2 (argparse's own prints the whole usage first)."""

    def __init__(self, *args, formatter_class=None, **kwargs):        # every flag's help ends with its default
        super().__init__(*args, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def shell_quote(text):
    """text as one argument in a command the user will type: quoted for a POSIX shell, or for cmd.exe on Windows."""
    return subprocess.list2cmdline([text]) if os.name == "nt" else shlex.quote(text)


def reader_gone(error):
    """Whether a write to stdout failed because the reading end of its pipe closed: BrokenPipeError, or on Windows
    an OSError with EINVAL (what a write to a closed pipe raises there)."""
    return isinstance(error, BrokenPipeError) or (os.name == "nt" and error.errno in (errno.EINVAL, errno.EPIPE))


class StdoutThatMayClose:
    """sys.stdout for a long run: once its reader has gone (`python train.py | head`, after head's lines), what is
    printed goes nowhere and the run carries on writing its files, instead of stopping half-way."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            if not reader_gone(e):
                raise
            self._reader_gone()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            if not reader_gone(e):
                raise
            self._reader_gone()

    def _reader_gone(self):
        # the stream's file descriptor now leads to os.devnull, so no later flush (at exit too) fails
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and ends every flag's help with its default (unless the help already
    says what happens without the flag, as flags whose default is None or False do)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "default" in text \
                or not action.option_strings:         # (`is`: a default of 0 is shown, unlike False)
            return text
        return f"{text} (default: %(default)s)"


# the model-shape flags of train.py and the bench: Config field -> (type, what it sets)
SHAPE_FLAGS = {"d_model": (int, "model width"), "n_layers": (int, "number of blocks"), "n_heads": (int, "query heads"),
               "n_kv_heads": (int, "key/value heads (1: multi-query)"), "head_dim": (int, "width of each head"),
               "d_ff": (int, "SwiGLU hidden width"),
               "max_seq_len": (int, "longest context the model can see (a preset's is raised to --seq-len if shorter)"),
               "rope_base": (finite_float, "rotary embedding base"),
               "norm_eps": (finite_float, "LayerNorm epsilon"), "z_loss": (finite_float, "weight of the z-loss")}


def add_adamw_flags(group, weight_decay, beta2, decayed="the layers' matrices and LoRA adapters that train (never "
                    "norms or the embedding)"):
    """AdamW's flags, shared by train.py and classify train, with the defaults each program's recipe uses."""
    group.add_argument("--weight-decay", type=finite_float, default=weight_decay,
                       help=f"AdamW's decoupled weight decay of {decayed}")
    group.add_argument("--beta1", type=finite_float, default=0.9, help="AdamW's first-moment decay")
    group.add_argument("--beta2", type=finite_float, default=beta2, help="AdamW's second-moment decay")
    group.add_argument("--grad-clip", type=finite_float, default=1.0, help="global gradient-norm clip (0: off)")


def add_shape_flags(group, names, default):
    """--d-model and the like for the Config fields `names` (keys of SHAPE_FLAGS), each None unless given;
    default says in the help what stands without the flag."""
    for name in names:
        kind, what = SHAPE_FLAGS[name]
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{what} (default: {default})")


def with_shape_flags(shape, args, derive=True):
    """shape (a Config as a dict) with the shape flags args gives put in. derive: head_dim follows a given d_model
    or n_heads, and d_ff a given d_model (d_model / n_heads, 4 d_model), unless they are given too."""
    given = {name for name in SHAPE_FLAGS if getattr(args, name, None) is not None}
    shape = {**shape, **{name: getattr(args, name) for name in given}}
    if derive and "head_dim" not in given and given & {"d_model", "n_heads"}:
        shape["head_dim"] = None
    if derive and "d_ff" not in given and "d_model" in given:
        shape["d_ff"] = None
    return shape


def json_line(record):
    """A dict as one line of strict JSON: a NaN or infinite float (bits per byte of no bytes, the perplexity of a
    huge loss) becomes null, which every JSON reader accepts (json.dumps would write NaN or Infinity)."""
    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return {k: strict(x) for k, x in v.items()} if isinstance(v, dict) else v
    return json.dumps(strict(record))


def format_duration(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
