"""Expected failures: a user can act on them, so they are reported in one line, without a traceback."""
import os
import sys


class UserError(Exception):
    """An expected failure the user can act on: printed as one line, no traceback, exit 2."""
    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C was handled: the state is saved; exit 130 like an interrupted shell command."""
    exit_code = 130


def is_rank_zero():
    """Whether this is the main process (always, unless torchrun started several)."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(message):
    """One line on stderr, from the main process only."""
    if is_rank_zero():
        print(message, file=sys.stderr)
