"""The `svdq` command line. Each subcommand lives in `svdq/commands/<name>.py` and provides
`add_parser(subparsers)` (which sets `func` via `set_defaults`) — list it in `COMMANDS` below."""

from __future__ import annotations

import argparse
import importlib
import sys

from .version import __version__

COMMANDS = ("demo", "quantize", "generate", "eval", "lora", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdq",
        description="4-bit (W4A4) SVDQuant inference for diffusion models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `svdq <command> --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"svdq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        importlib.import_module(f"svdq.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Expected user errors (bad paths, shapes, checkpoints): one clear line, no traceback.
        print(f"svdq {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
