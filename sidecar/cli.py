"""``sidecar`` command line. Each subcommand lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from sidecar.errors import ConfigError
from sidecar.observability.logs import LOG_FORMATS, LOG_LEVELS, setup_logging

# One line per subcommand module; each defines ``register(subparsers)``.
COMMANDS = (
    "sidecar.authz.command",
    "sidecar.broker.command",
    "sidecar.demo.command",
    "sidecar.envoy_command",
    "sidecar.run_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Workload Identity Sidecar")
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=LOG_LEVELS,
        help="%(choices)s (default INFO, or SIDECAR_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        choices=LOG_FORMATS,
        help="text (key=value) or json (one object per line); default SIDECAR_LOG_FORMAT or text",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


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
        return int(args.func(args))
    except ConfigError as exc:
        where = f" in {config}" if config and exc.key != "config file" else ""
        print(f"sidecar: configuration error{where}: {exc}", file=sys.stderr)
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
