"""What train.py and sample.py share: clean exits on user errors, and durations for humans."""

import sys

from .errors import TinyPalmError


def run_cli(main):
    """Run main(); a TinyPalmError becomes one line on stderr and exit status 2, with no traceback."""
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


def format_duration(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
