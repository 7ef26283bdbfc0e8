"""``sidecar`` command line. Each subcommand lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import sys
from typing import Any

from sidecar.errors import ConfigError, ConfigErrors
from sidecar.observability.logs import LOG_FORMATS, LOG_LEVELS, setup_logging

# One line per subcommand module; each defines ``register(subparsers)``.
COMMANDS = (
    "sidecar.authz.command",
    "sidecar.broker.command",
    "sidecar.check_command",
    "sidecar.demo.command",
    "sidecar.envoy_command",
    "sidecar.run_command",
)


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """Options every command takes, before or after its name (``sidecar --log-level DEBUG run``
    and ``sidecar run --log-level DEBUG``); after the name, ``default`` is SUPPRESS so an
    option given before it is not reset."""
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.upper,
        choices=LOG_LEVELS,
        help="%(choices)s (default INFO, or SIDECAR_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        default=default,
        choices=LOG_FORMATS,
        help="text (key=value) or json (one object per line); default SIDECAR_LOG_FORMAT or text",
    )


def version() -> str:
    try:
        return importlib.metadata.version("workload-identity-sidecar")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Workload Identity Sidecar")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    _global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        _global_options(command, argparse.SUPPRESS)
    return parser


def print_config_error(exc: ConfigError, config: str | None) -> None:
    """One line per mistake; the file is named once unless each error names its line."""
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    located = all(e.where for e in errors)
    where = f" in {config}" if config and not located and exc.key != "config file" else ""
    if len(errors) == 1:
        print(f"sidecar: configuration error{where}: {errors[0]}", file=sys.stderr)
        return
    print(f"sidecar: {len(errors)} configuration errors{where}:", file=sys.stderr)
    for error in errors:
        print(f"  {error}", file=sys.stderr)


#: Errors of the environment an operator set up (a port taken, a directory missing or not
#: writable, a file unreadable) that reach here without a ConfigError: one line, exit 2.
OPERATOR_ERRNOS = frozenset(
    {
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EROFS,
    }
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = getattr(args, "config", None)
    try:
        setup_logging(args.log_level, args.log_format)
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "check", False):
            from sidecar.check_command import run_check

            return run_check(args)
        return int(args.func(args))
    except ConfigError as exc:
        print_config_error(exc, config)
        return 2
    except OSError as exc:
        if exc.errno not in OPERATOR_ERRNOS:
            raise
        where = f" (configuration {config})" if config else ""
        print(f"sidecar: cannot start{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
