"""The ``lorakit`` command.

Each subcommand is a module in this package exposing ``add_parser(subparsers)`` (which returns its
argparse parser, with ``func`` set to a callable taking the parsed args and returning an exit code)
and nothing else the command needs: the work happens in the library.  Modules are discovered, so a
new subcommand is a new file.  Running ``lorakit`` with no subcommand runs ``lorakit train``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from ..errors import LorakitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning, inspection and analysis. Run a subcommand with --help for examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused a path the user gave (permissions, a full disk, no such dir)
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err) else ""
        print(f"lorakit {args.command}: error: {err}{where}; check the path, its permissions and free space",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
