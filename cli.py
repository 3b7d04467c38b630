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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the description as written, and every flag's default where it has one (a None default: the
    flag's help says what it means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def first_line(e):
    """The first line of an exception's message ('' if it has none): errors stay one line."""
    return (str(e).strip().splitlines() or [""])[0]


def read_json(path, what, name=None):
    """The JSON value in the file at path; ValueError in one line naming the file (as name, default path) when it is
    not UTF-8 JSON: its first bad byte or its syntax error's line and column, nesting too deep for Python, an
    integer of more than 4300 digits. what: what the file should be, e.g. 'a transformers config.json'."""
    import json
    name = path if name is None else name
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start}); expected {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{name} is not {what} (arrays or objects nested too deep)") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ValueError(f"{name} is not {what} ({first_line(e)[:100]})") from None


def one_line_errors(parser, tool):
    """argparse's errors as one line, `tool: error: ...`, without the usage dump."""
    def error(msg):
        raise SystemExit(f"{tool}: error: {msg}")
    parser.error = error
    return parser


def resolve_device(name):
    """--device (cpu, cuda, cuda:N or auto) -> the device to use; ValueError in one line for anything else, and for
    a GPU that is not there."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"--device {name!r} is not one of cpu, cuda, cuda:N, auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asked for, but no CUDA GPU is available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: there are {torch.cuda.device_count()} CUDA GPU(s), cuda:0.."
                         f"cuda:{torch.cuda.device_count() - 1}")
    return name


def fmt_time(s):
    """Seconds as 1m05s, or 2h03m from an hour on."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
