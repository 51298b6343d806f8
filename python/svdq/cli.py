"""The `svdq` command line. Each subcommand lives in `svdq/commands/<name>.py` and provides
`add_parser(subparsers)` (which sets `func` via `set_defaults`) — list it in `COMMANDS` below."""

from __future__ import annotations

import argparse
import importlib
import sys

from .version import __version__

COMMANDS = ("demo", "quantize", "generate", "eval", "lora", "bench", "doctor", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdq",
        description="4-bit (W4A4) SVDQuant inference for diffusion models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `svdq <command> --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"svdq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        importlib.import_module(f"svdq.commands.{name}").add_parser(sub)
    for p in _all_parsers(parser):  # `svdq quantize ... --debug` works too
        if p is not parser:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(p)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure prints one line ``svdq <command>: error: <message>`` (the message names
    the file or argument at fault) and returns 1; Ctrl-C returns 130. ``--debug`` re-raises instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"svdq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the CLI's contract: one line, no traceback (docs/cli.md)
        if args.debug:
            raise
        print(f"svdq {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 1


# Errors whose message is written for the user (it names the file / argument); others get their type too.
_USER_ERRORS = (ValueError, OSError, TypeError)


def error_line(e: BaseException) -> str:
    """One line for ``e``: its message (lines joined), prefixed with the exception type unless it is one of
    svdq's user-facing errors, and a pointer to --debug for unexpected ones."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    if isinstance(e, _USER_ERRORS):
        return msg
    return f"{type(e).__name__}: {msg} (run `svdq --debug ...` for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
