"""The exceptions the CLI turns into one line: user mistakes (exit code 2) and SIGTERM (exit 143)."""

import signal


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad data); shown without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, a container stopping), raised where the command is, as Ctrl-C
    raises KeyboardInterrupt: the same clean-up and messages (train's resume hint, compare's), where
    SIGTERM's default ended the process at once, running no `finally`. The CLI exits with a shell's
    status for it."""

    status = 128 + int(signal.SIGTERM)
