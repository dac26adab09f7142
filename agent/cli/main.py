"""`tcu-agent` command line: one module per command, each with add_parser() and run(args)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from .. import __version__
from ..errors import AgentError

COMMANDS = ["run", "status", "demo", "replay", "monitor", "dbc", "keys", "verify", "simulate", "modem",
            "update", "diag"]  # module names under agent.cli


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `only` the parser of that one command (the same
    parse for its command lines, without importing the other commands' modules)."""
    parser = Parser(
        prog="tcu-agent",
        description="Telematics agent: reads CAN, sends signed telemetry, runs verified commands.")
    parser.add_argument("--version", action="version", version=f"tcu-agent {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in [only] if only else COMMANDS:
        module = import_module(f"agent.cli.{name.replace('-', '_')}")
        module.add_parser(sub, _common)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    # Accepted before or after the command name; SUPPRESS keeps the subcommand from
    # overwriting a value given before it.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    parser.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"],
                        help="logging level on stderr (default: info)")


def command_of(argv: list[str]) -> str | None:
    """The command an argument list names, when nothing before it needs the full parser
    (help, version, an abbreviated or unknown option): None means build them all."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--debug" or arg.startswith("--log-level="):
            i += 1
        elif arg == "--log-level":
            i += 2
        else:
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    # Only the named command's module: `run` starts without importing replay, demo, diag ...
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    level = "debug" if debug else getattr(args, "log_level", "info")
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except AgentError as e:
        if debug:
            raise
        _json_error(args, str(e))
        print(f"tcu-agent: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        _json_error(args, f"internal error: {type(e).__name__}: {e}")
        print(f"tcu-agent: internal error: {type(e).__name__}: {e} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _json_error(args, message: str) -> None:
    """--json promises JSON on stdout: an error is {"error": ...} there too (and the usual
    line on stderr)."""
    if getattr(args, "json", False):
        import json
        print(json.dumps({"error": message}), flush=True)
