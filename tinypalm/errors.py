"""The one exception type users see.

A TinyPalmError carries a single line that names the problem and what to do about it. The command-line
scripts print it as `error: <message>` and exit with status 2, without a traceback.
"""

import errno


class TinyPalmError(Exception):
    pass


OS_ERROR_ADVICE = {errno.ENOENT: "check the path (its directory must exist)",
                   errno.EISDIR: "give a file name, not a directory",
                   errno.ENOTDIR: "check the path: a part of it is a file, not a directory",
                   errno.EEXIST: "check the path: a part of it is a file, not a directory",   # os.makedirs
                   errno.ENOSPC: "free some disk space",
                   errno.EDQUOT: "free some disk space",
                   errno.EACCES: "check the permissions",
                   errno.EPERM: "check the permissions",
                   errno.EROFS: "choose a place on a writable disk"}


def os_error_advice(e):
    """What to do about an OSError (a full disk, a missing directory, ...), by its errno."""
    return OS_ERROR_ADVICE.get(e.errno, "check the path and the disk")
