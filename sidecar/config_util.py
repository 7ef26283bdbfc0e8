"""Small typed readers for YAML configuration: every error names the key and what it expects.

A reader that finds a wrong value reports it (:func:`sidecar.config_source.report`) and goes
on with the default, so one run over a file finds every mistake; only a missing required value
stops the part of the file it is in. Overrides from the environment arrive as strings and are
converted here, by what the key holds."""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sidecar.config_source import ENV_PREFIX as ENV_PREFIX
from sidecar.config_source import EnvValue, or_default, report
from sidecar.config_source import apply_env_overrides as apply_env_overrides
from sidecar.config_source import load_yaml_file as load_yaml_file
from sidecar.errors import ConfigError
from sidecar.jose.rfc7518_algorithms import ASYMMETRIC_ALGORITHMS, with_aliases
from sidecar.jose.rfc9449_dpop import DEFAULT_PROOF_ALGORITHMS, DPoPPolicy
from sidecar.jwks_source import JwksLocation
from sidecar.tls_settings import TLSClient, TLSServer

T = TypeVar("T")
_MISSING: Any = object()


def section(data: Any, key: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        report(ConfigError(key, "a mapping", data))
        return {}
    return data


def known_keys(data: Mapping[str, Any], key: str, allowed: Set[str]) -> None:
    """Every unknown key is a mistake of its own (a typo hides nothing else)."""
    for name in sorted(set(data) - allowed, key=str):
        report(ConfigError(f"{key}.{name}", f"one of the known keys {sorted(allowed)}"))


def get_str(data: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> str:
    value = data.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{path}.{key}", "a string (required)")
    if not isinstance(value, str) or not value:
        error = ConfigError(f"{path}.{key}", "a non-empty string", value)
        if not isinstance(default, str):
            raise error
        report(error)
        return default
    return value


def get_opt_str(data: Mapping[str, Any], key: str, path: str) -> str | None:
    return None if data.get(key) is None else get_str(data, key, path)


def _number(value: Any, whole: bool) -> Any:
    """An override's string as the number it spells (YAML already typed the file's values)."""
    if isinstance(value, EnvValue):
        try:
            return int(value) if whole else float(value)
        except ValueError:
            return value
    return value


def get_num(
    data: Mapping[str, Any], key: str, path: str, default: float, *, minimum: float = 0.0
) -> float:
    value = _number(data.get(key, default), whole=False)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        report(ConfigError(f"{path}.{key}", f"a number >= {minimum}", value))
        return float(default)
    return float(value)


def get_int(data: Mapping[str, Any], key: str, path: str, default: int, *, minimum: int = 0) -> int:
    value = _number(data.get(key, default), whole=True)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        report(ConfigError(f"{path}.{key}", f"an integer >= {minimum}", value))
        return default
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """Seconds in a duration: a number of seconds, or a string ``250ms``, ``5s``, ``5m``,
    ``1h`` (or a plain number); None when ``value`` is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is not None:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None


def get_duration(
    data: Mapping[str, Any], key: str, path: str, default: float, *, minimum: float = 0.0
) -> float:
    """A duration in seconds (see :func:`parse_duration`)."""
    value = data.get(key, default)
    seconds = parse_duration(value)
    if seconds is None or not seconds >= minimum:
        report(
            ConfigError(
                f"{path}.{key}",
                f"a duration >= {minimum:g}s: seconds, or a number with ms, s, m or h (250ms, 5m)",
                value,
            )
        )
        return float(default)
    return seconds


def get_whole_seconds(
    data: Mapping[str, Any], key: str, path: str, default: int, *, minimum: int = 0
) -> int:
    """A duration that must be a whole number of seconds (an HTTP max-age, a poll's wait)."""
    seconds = get_duration(data, key, path, default, minimum=minimum)
    if seconds != int(seconds):
        report(ConfigError(f"{path}.{key}", "a whole number of seconds", data.get(key)))
        return default
    return int(seconds)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def get_bool(data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = data.get(key, default)
    if isinstance(value, EnvValue) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        report(ConfigError(f"{path}.{key}", "true or false", value))
        return default
    return value


def get_str_list(
    data: Mapping[str, Any], key: str, path: str, default: Any = _MISSING
) -> list[str]:
    """A list of strings; one string is a list of one, an override is comma-separated."""
    value = data.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{path}.{key}", "a list of strings (required)")
    if isinstance(value, EnvValue):
        value = [EnvValue(part.strip(), value.source) for part in value.split(",") if part.strip()]
    elif isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        error = ConfigError(f"{path}.{key}", "a list of non-empty strings", value)
        if not isinstance(default, list):
            raise error
        report(error)
        return list(default)
    return list(value)


def get_algorithms(
    data: Mapping[str, Any], key: str, path: str, default: list[str]
) -> frozenset[str]:
    """A JWS algorithm allowlist: asymmetric algorithms only, and never empty (an empty list
    would deny every token or proof without saying why)."""
    algs = get_str_list(data, key, path, default)
    for alg in algs:
        if alg not in ASYMMETRIC_ALGORITHMS:
            report(
                ConfigError(
                    f"{path}.{key}",
                    f"asymmetric JWS algorithms from {sorted(ASYMMETRIC_ALGORITHMS)}",
                    alg,
                )
            )
            return with_aliases(frozenset(default))
    if not algs:
        report(
            ConfigError(f"{path}.{key}", "at least one algorithm (an empty list denies all)", algs)
        )
        return with_aliases(frozenset(default))
    return with_aliases(frozenset(algs))


def check_url(value: str, key: str, *, bare: bool = False) -> str:
    """An absolute http(s) URL with a host. ``bare`` (an issuer identifier we publish, OIDC
    Discovery §3 / RFC 8414 §2): also no user information, query, fragment or trailing slash,
    refused rather than normalized because clients must use exactly this string."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, "an absolute http(s) URL", value)
    if bare and (parts.query or parts.fragment or value.endswith(("/", "?", "#")) or "#" in value):
        raise ConfigError(key, "a URL without query, fragment or trailing slash", value)
    if bare and (parts.username or parts.password):
        raise ConfigError(key, "a URL without user information", value)
    return value


def get_opt_url(data: Mapping[str, Any], key: str, path: str) -> str | None:
    value = get_opt_str(data, key, path)
    return None if value is None else or_default(None, lambda: check_url(value, f"{path}.{key}"))


def exactly_one(path: str, chosen: Mapping[str, object]) -> None:
    """Refuse a section that sets none or several of mutually exclusive sources (a source is
    set unless its value is None or False)."""
    if sum(value is not None and value is not False for value in chosen.values()) != 1:
        names = list(chosen)
        listed = ", ".join(names[:-1]) + f" or {names[-1]}"
        raise ConfigError(path, f"exactly one of {listed}")


#: The keys :func:`get_jwks_location` reads.
JWKS_LOCATION_KEYS = frozenset({"issuer", "jwks_file", "jwks_uri", "discovery", "tls"})


def get_jwks_location(item: Mapping[str, Any], path: str) -> JwksLocation:
    """Where an issuer's keys come from: exactly one of ``jwks_file``, ``jwks_uri`` or
    ``discovery: true`` (the default when neither of the others is set), and the ``tls``
    block of those fetches."""
    issuer = get_str(item, "issuer", path)
    jwks_file = get_opt_str(item, "jwks_file", path)
    jwks_uri = get_opt_url(item, "jwks_uri", path)
    discovery = get_bool(item, "discovery", path, jwks_file is None and jwks_uri is None)
    exactly_one(path, {"jwks_file": jwks_file, "jwks_uri": jwks_uri, "discovery: true": discovery})
    if discovery:
        check_url(issuer, f"{path}.issuer")
    return JwksLocation(
        issuer=issuer,
        file=jwks_file,
        uri=jwks_uri,
        discovery=discovery,
        tls=parse_fetch_tls(item, path, jwks_file is None),
    )


# -- TLS blocks (sidecar.tls_settings builds the contexts) ------------------------------------

TLS_CLIENT_KEYS = {"ca_file", "cert_file", "key_file", "server_name"}
TLS_SERVER_KEYS = {"cert_file", "key_file", "client_ca_file"}


def _tls_pair(block: Mapping[str, Any], path: str) -> tuple[str | None, str | None]:
    cert_file = get_opt_str(block, "cert_file", path)
    key_file = get_opt_str(block, "key_file", path)
    if (cert_file is None) != (key_file is None):
        missing = "key_file" if key_file is None else "cert_file"
        raise ConfigError(
            f"{path}.{missing}",
            "a path: cert_file and key_file are set together (the certificate and its key)",
        )
    return cert_file, key_file


def parse_tls_client(data: Any, path: str) -> TLSClient | None:
    """The ``tls`` block at ``path`` (None when absent: system trust, no client certificate)."""
    if data is None:
        return None
    block = section(data, path)
    known_keys(block, path, TLS_CLIENT_KEYS)
    ca_file = get_opt_str(block, "ca_file", path)
    cert_file, key_file = _tls_pair(block, path)
    server_name = get_opt_str(block, "server_name", path)
    if server_name is not None and ("/" in server_name or ":" in server_name):
        raise ConfigError(
            f"{path}.server_name", "a host name (no scheme, port or path)", server_name
        )
    return TLSClient.load(ca_file, cert_file, key_file, server_name, path=path)


def parse_tls_server(data: Any, path: str) -> TLSServer | None:
    """A listener's ``tls`` block (None when absent: plain HTTP)."""
    if data is None:
        return None
    block = section(data, path)
    known_keys(block, path, TLS_SERVER_KEYS)
    cert_file, key_file = _tls_pair(block, path)
    if cert_file is None or key_file is None:
        raise ConfigError(
            f"{path}.cert_file", "a path: a TLS listener needs cert_file and key_file"
        )
    client_ca_file = get_opt_str(block, "client_ca_file", path)
    return TLSServer.load(cert_file, key_file, client_ca_file, path=path)


def parse_fetch_tls(item: Mapping[str, Any], path: str, fetched: bool) -> TLSClient | None:
    """``item.tls`` of a source that may fetch over https; ``fetched`` says whether it does
    (a block on a file or socket source would be silently unused: refuse it instead)."""
    if item.get("tls") is not None and not fetched:
        raise ConfigError(
            f"{path}.tls", "no tls block here: it applies only to a URL fetched over http(s)"
        )
    return parse_tls_client(item.get("tls"), f"{path}.tls")


def get_dpop_policy(
    dpop: Mapping[str, Any], path: str, *, limits: Mapping[str, Any], limits_path: str
) -> DPoPPolicy:
    """The proof acceptance policy from a ``dpop`` section (``algorithms``, ``max_age``,
    ``future_leeway``) and ``max_proof_bytes`` from ``limits``: ingress and broker alike."""
    default = DPoPPolicy()
    return DPoPPolicy(
        algorithms=get_algorithms(dpop, "algorithms", path, list(DEFAULT_PROOF_ALGORITHMS)),
        max_age=get_duration(dpop, "max_age", path, default.max_age, minimum=1.0),
        future_leeway=get_duration(dpop, "future_leeway", path, default.future_leeway),
        max_bytes=get_int(limits, "max_proof_bytes", limits_path, default.max_bytes, minimum=256),
    )


def get_choice(
    data: Mapping[str, Any], key: str, path: str, choices: tuple[str, ...], default: str
) -> str:
    value = data.get(key, default)
    if value not in choices:
        error = ConfigError(f"{path}.{key}", f"one of {list(choices)}", value)
        if default not in choices:
            raise error
        report(error)
        return default
    return str(value)


def parse_listen(value: Any, key: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:port`` for IPv6)."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(key, "host:port", value)
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, "host:port with a port in 0..65535", value)
    return host, int(port)


#: The admin listener every long-running command shares (``sidecar run`` / ``sidecar authz``).
DEFAULT_ADMIN_LISTEN = "127.0.0.1:15020"


def parse_admin_listen(
    data: Mapping[str, Any], default: str = DEFAULT_ADMIN_LISTEN
) -> tuple[str, int]:
    """The ``admin`` section: only ``listen`` is known."""
    admin = section(data.get("admin"), "admin")
    known_keys(admin, "admin", {"listen"})
    return parse_listen(admin.get("listen", default), "admin.listen")
