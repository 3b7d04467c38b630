"""
argparse types shared by every tool: a bad value is refused where the flag is parsed, before any model or
data is loaded, never replaced by a default. Each raises argparse.ArgumentTypeError, which argparse turns
into one line naming the flag, the value and what is allowed:

    parser.add_argument("--batch_size", type=positive_int, default=8)
    $ python eval.py RUN --batch_size 0
    eval.py: error: argument --batch_size: must be an integer > 0, got 0

A flag whose unset value means "the run's own" defaults to None (never given to type=) and is tested with
`is None`, so 0 or '' on the command line cannot fall back to the run's value.
"""
import argparse
import math


def _shown(text):
    return text if text and text.strip() == text else repr(text)  # '' and blanks quoted, so they show


def _number(conv, what, ok):
    def check(text):
        try:
            v = conv(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {_shown(text)}")
        return v
    return check


positive_int = _number(int, "an integer > 0", lambda v: v > 0)
nonneg_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
nonneg_float = _number(float, "a finite number >= 0", lambda v: v >= 0)
fraction = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def nonempty(text):
    """A path, hub id, name or list: anything but an empty string or blanks."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty value, got {_shown(text)}")
    return text


def run(main, tool):
    """main() as a tool's entry point: Ctrl-C is one line on stderr and exit status 130, not a traceback
    (every file the tools write is written whole or not at all, see files.py)."""
    import sys
    try:
        main()
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        sys.exit(130)
