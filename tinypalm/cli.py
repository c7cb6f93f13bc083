"""What the command-line programs share: clean exits on user errors, --help with defaults, durations for humans."""

import argparse
import sys

from .errors import TinyPalmError


def run_cli(main):
    """Run main(); a TinyPalmError (or an OSError: full disk, permissions) becomes one line on stderr and exit
    status 2, with no traceback. Ctrl-C exits with 130, as shells expect, so `a && b` stops."""
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
        print(f"error: {where}{e.strerror or e}; free some disk space or check the permissions", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and ends every flag's help with its default (unless the help already
    says what happens without the flag, as flags whose default is None or False do)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def format_duration(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
