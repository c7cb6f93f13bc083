"""The one exception type users see.

A TinyPalmError carries a single line that names the problem and what to do about it. The command-line
scripts print it as `error: <message>` and exit with status 2, without a traceback.
"""


class TinyPalmError(Exception):
    pass
