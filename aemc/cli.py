"""Command-line plumbing every script shares: flags reported in one line, expected failures
without a traceback, positive numbers."""
import argparse
import sys

from aemc.errors import Interrupted, UserError, warn
from aemc.files import discard_if_unused, forget_run_folders


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus a hint) and exits with status 2, and takes
    no abbreviation of a flag (`--epoch 1` is an error, not a silent `--epochs 1`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} -h)", file=sys.stderr)
        sys.exit(2)


def description(doc):
    """A script's --help description: the whole first paragraph of its docstring, as one line (its
    first line alone may stop mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def run_cli(main, parser, argv=None):
    """Parse the command line (or `argv`) and run `main(args)`; expected failures exit without a
    traceback."""
    args = parser.parse_args(argv)
    forget_run_folders()
    try:
        try:
            main(args)
        except BaseException:  # a run that failed before writing anything leaves no folder behind
            discard_if_unused()
            raise
    except Interrupted as e:
        warn(f"{parser.prog}: {e}")
        sys.exit(e.exit_code)
    except UserError as e:  # under torchrun every process meets the same error: rank 0 says it
        warn(f"{parser.prog}: error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        warn(f"{parser.prog}: interrupted")
        sys.exit(130)


def json_object(text):
    """argparse type: a JSON object ('{"width": 32}') -> dict."""
    import json
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 32}}', got {text!r}")
    return value


def positive(kind):
    """argparse type: a strictly positive int or float."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse
