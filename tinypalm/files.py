"""Writing files so that a crash at any moment leaves the old file or the new one, never half of one.

Every file tinypalm writes for a user (checkpoints, adapters, classifiers, token files, predicted labels, the
loss picture) but the run's log (metrics.jsonl, appended to) is written to `<path>.tmp<PID>` beside it, flushed
to disk, then renamed over `<path>`: a rename within a directory is atomic. A process killed half-way leaves its
temporary behind; the next write of the same path removes the temporaries whose process is gone (a live one may
be another program writing right now).
"""

import os
import re
import time

from .errors import TinyPalmError, os_error_advice


def write_atomically(path, write, what, other=""):
    """Call write(f) on a binary temporary file and rename it over path once it is complete and on disk (its
    directory is made if need be).

    what names the file in the error ("checkpoint", "token file"); other is more advice after the cause's own
    (" or pass another --out"). An OSError (a full disk, permissions) becomes that one-line TinyPalmError, saying
    whether the old file is intact; anything else write raises propagates, the temporary removed either way."""
    tmp, directory = f"{path}.tmp{os.getpid()}", os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries_of(path)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, tmp, path, directory):
            raise                         # about another file: one write() was reading (a corpus file)
        kept = f"the previous {path} is intact" if os.path.exists(path) else f"{path} was not written"
        raise TinyPalmError(f"cannot write {what} {path}: {e.strerror or e}; {kept}; {os_error_advice(e)}{other}") \
            from None
    finally:
        try:
            os.remove(tmp)
        except OSError:                   # already renamed, never created, or the disk is gone
            pass


def _replace(tmp, path, tries=20):
    # os.replace; on Windows a file another program holds open for a moment (a viewer, a virus scanner, the search
    # indexer) cannot be replaced: try again for about a second before giving up
    for attempt in range(tries):
        try:
            return os.replace(tmp, path)
        except PermissionError:
            if os.name != "nt" or attempt == tries - 1:
                raise
            time.sleep(0.05)


def check_writable(path, flag):
    """Refuse, before any work, a file path that write_atomically could not write: the nearest directory that
    exists on its way must be a writable directory (write_atomically makes the rest)."""
    if os.path.isdir(path):
        raise TinyPalmError(f"{flag} {path} is a directory; give the name of a file to write")
    place = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise TinyPalmError(f"{flag} {path}: {place} is a file, not a directory; pick another path")
    if not os.access(place, os.W_OK | os.X_OK):
        raise TinyPalmError(f"{flag} {path}: cannot write in {place} (its permissions, or a read-only disk); pick "
                            "another path")


_TEMPORARY = re.compile(r"\.tmp(\d+)$")


def remove_stale_temporaries(directory, suffix=".npz"):
    """Delete the `*<suffix>.tmp<PID>` files in directory whose writing process is gone; returns [(path, bytes)]."""
    return _remove_stale(directory, lambda target: target.endswith(suffix))


def remove_stale_temporaries_of(path):
    """Delete the `<path>.tmp<PID>` files whose writing process is gone; returns [(path, bytes)]."""
    directory, name = os.path.split(path)
    return _remove_stale(directory or ".", lambda target: target == name)


def _remove_stale(directory, wanted):
    # wanted(target): whether to clean the temporaries of the file named target (a temporary's name less .tmp<PID>)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.search(name)
        path = os.path.join(directory, name)
        if match and wanted(name[:match.start()]) and os.path.isfile(path) and not _alive(int(match.group(1))):
            try:
                size = os.path.getsize(path)
                os.remove(path)
            except OSError:                   # not ours to remove (another user's): leave it
                continue
            removed.append((path, size))
    return removed


def _alive(pid):
    if pid == os.getpid():
        return False                      # this process is not writing anything while it looks
    if os.name == "nt":
        return True                       # os.kill(pid, 0) is no question there (signal 0 is CTRL_C_EVENT): keep
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                       # it exists but belongs to someone else, or we cannot tell
        return True
    return True
