"""Registration entries: which workload (a set of selectors) gets which SPIFFE ID, and which
audiences it may ask tokens for. Pure: no I/O, no clock.

Selectors name facts an attestor established about the caller, in SPIRE's spelling:

* ``unix:uid:N``, ``unix:gid:N`` — the peer credentials of the caller's socket;
* ``unix:path:/abs/path`` — the resolved path of the caller's executable (``/proc/PID/exe``);
* ``unix:sha256:HEX`` — the SHA-256 of that executable's content;
* ``k8s:ns:NS``, ``k8s:sa:SA`` — namespace and service account of a verified Kubernetes
  service-account token; ``k8s:cluster:ISSUER`` — the cluster issuer that signed it.

An entry matches when ALL its selectors are among the caller's. When several entries match,
the most specific (most selectors) wins, then the first in file order: so a general entry
(``unix:uid:1000``) can be refined by a stricter one (``unix:uid:1000`` + ``unix:sha256:...``).
Two entries with the same selector set are refused at start as ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.authz.policy import segment_glob
from sidecar.config_source import keep_going, report
from sidecar.config_util import get_duration, get_str, get_str_list, known_keys, section
from sidecar.errors import ConfigError

UNIX_KINDS = frozenset({"uid", "gid", "path", "sha256"})
K8S_KINDS = frozenset({"ns", "sa", "cluster"})
MAX_SPIFFE_ID = 2048
MAX_TTL = 86400.0

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
# SPIFFE ID (SPIFFE-ID §2): spiffe://<trust domain>/<path>, trust domain [a-z0-9.-_],
# path segments of [A-Za-z0-9.-_], no empty, "." or ".." segment, no query or fragment.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def is_dns_label(value: str) -> bool:
    return bool(_DNS_LABEL.match(value))


def is_dns_subdomain(value: str) -> bool:
    return bool(_DNS_SUBDOMAIN.match(value))


def validate_spiffe_id(value: str) -> str | None:
    """None if ``value`` is a valid SPIFFE ID, else what is wrong with it."""
    if len(value) > MAX_SPIFFE_ID:
        return "longer than 2048 bytes"
    if not value.startswith("spiffe://"):
        return "does not start with spiffe://"
    rest = value[len("spiffe://") :]
    domain, slash, path = rest.partition("/")
    if not domain or not _TRUST_DOMAIN.match(domain):
        return "trust domain is empty or has characters other than [a-z0-9._-]"
    if slash and not path:
        return "has a trailing slash"
    for segment in path.split("/") if path else []:
        if segment in ("", ".", "..") or not _PATH_SEGMENT.match(segment):
            return f"path segment {segment!r} is empty, a dot segment, or not [A-Za-z0-9._-]"
    return None


def normalize_selector(raw: str, key: str) -> str:
    """Validate one selector; returns its canonical spelling (sha256 in lower case)."""
    prefix, sep, rest = raw.partition(":")
    kind, sep2, value = rest.partition(":")
    if not sep or not sep2 or not value:
        raise ConfigError(key, "a selector 'unix:KIND:VALUE' or 'k8s:KIND:VALUE'", raw)
    if prefix == "unix":
        if kind not in UNIX_KINDS:
            raise ConfigError(key, f"a unix selector kind from {sorted(UNIX_KINDS)}", raw)
        if kind in ("uid", "gid"):
            if not value.isdigit() or int(value) > 0xFFFFFFFF:
                raise ConfigError(key, f"unix:{kind}: with a decimal id", raw)
            return f"unix:{kind}:{int(value)}"
        if kind == "path":
            if not value.startswith("/") or "/../" in value + "/" or "//" in value:
                raise ConfigError(key, "unix:path: with an absolute, normalized path", raw)
            return raw
        if not _HEX64.match(value):
            raise ConfigError(key, "unix:sha256: with 64 hex digits", raw)
        return f"unix:sha256:{value.lower()}"
    if prefix == "k8s":
        if kind not in K8S_KINDS:
            raise ConfigError(key, f"a k8s selector kind from {sorted(K8S_KINDS)}", raw)
        if kind == "ns" and not is_dns_label(value):
            raise ConfigError(key, "k8s:ns: with a namespace name (RFC 1123 label)", raw)
        if kind == "sa" and not is_dns_subdomain(value):
            raise ConfigError(key, "k8s:sa: with a service account name (RFC 1123 subdomain)", raw)
        return raw
    raise ConfigError(key, "a selector starting with 'unix:' or 'k8s:'", raw)


def audience_pattern(pattern: str) -> re.Pattern[str]:
    """An audience glob: ``*`` matches within one path segment (no ``/``), ``**`` matches
    anything, everything else is literal. Audiences are any URI (``https://*.example.com``),
    so ``**`` is not confined to whole segments as in the authorizer's principals
    (``sidecar.authz.policy``); ``*`` is the same segment glob as there."""
    out = []
    for i, part in enumerate(pattern.split("**")):
        if i:
            out.append(".*")
        out.append(segment_glob(part))
    return re.compile("".join(out) + r"\Z", re.S)


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    spiffe_id: str
    selectors: frozenset[str]
    audiences: tuple[str, ...]  # as configured (globs allowed)
    ttl: float | None
    _patterns: tuple[re.Pattern[str], ...]

    @property
    def attestor(self) -> str:
        return next(iter(self.selectors)).split(":", 1)[0]

    def allows_audience(self, audience: str) -> bool:
        return any(p.match(audience) for p in self._patterns)


def parse_entry(raw: Any, key: str, index: int) -> Entry:
    item = section(raw, key)
    known_keys(item, key, {"spiffe_id", "selectors", "audiences", "ttl"})
    spiffe_id = get_str(item, "spiffe_id", key)
    problem = validate_spiffe_id(spiffe_id)
    if problem is not None:
        raise ConfigError(f"{key}.spiffe_id", f"a SPIFFE ID ({problem})", spiffe_id)
    raw_selectors = get_str_list(item, "selectors", key)
    if not raw_selectors:
        raise ConfigError(f"{key}.selectors", "at least one selector")
    selectors = frozenset(
        normalize_selector(s, f"{key}.selectors[{i}]") for i, s in enumerate(raw_selectors)
    )
    prefixes = {s.split(":", 1)[0] for s in selectors}
    if len(prefixes) > 1:
        raise ConfigError(
            f"{key}.selectors", "selectors of one attestor only (unix: or k8s:, not both)"
        )
    if prefixes == {"unix"} and not any(
        s.startswith(("unix:uid:", "unix:gid:")) for s in selectors
    ):
        # A path or hash alone would let ANY local user who can run that binary get the ID.
        raise ConfigError(f"{key}.selectors", "a unix:uid: or unix:gid: selector among them")
    if prefixes == {"k8s"} and not any(s.startswith("k8s:ns:") for s in selectors):
        raise ConfigError(f"{key}.selectors", "a k8s:ns: selector among them")
    audiences = get_str_list(item, "audiences", key)
    if not audiences:
        raise ConfigError(f"{key}.audiences", "at least one audience (globs: * and **)")
    ttl = None
    if item.get("ttl") is not None:
        ttl = get_duration(item, "ttl", key, 1.0, minimum=1.0)
        if ttl > MAX_TTL:
            raise ConfigError(f"{key}.ttl", f"at most {int(MAX_TTL)} seconds", ttl)
    return Entry(
        index=index,
        spiffe_id=spiffe_id,
        selectors=selectors,
        audiences=tuple(audiences),
        ttl=ttl,
        _patterns=tuple(audience_pattern(a) for a in audiences),
    )


class Registry:
    """The entries of one broker, with the match rule of the module docstring."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = tuple(entries)
        seen: dict[frozenset[str], int] = {}
        for entry in self.entries:
            if entry.selectors in seen:
                raise ConfigError(
                    f"entries[{entry.index}].selectors",
                    f"a selector set different from entries[{seen[entry.selectors]}] "
                    "(the same set for two entries is ambiguous)",
                )
            seen[entry.selectors] = entry.index
        # Most specific first, then file order: the first subset found is the answer.
        self._ordered = sorted(self.entries, key=lambda e: (-len(e.selectors), e.index))
        #: Whether any entry needs the executable's hash (hashing is skipped otherwise).
        self.needs_sha256 = any(s.startswith("unix:sha256:") for e in entries for s in e.selectors)

    def match(self, selectors: Iterable[str]) -> Entry | None:
        have = frozenset(selectors)
        for entry in self._ordered:
            if entry.selectors <= have:
                return entry
        return None

    def max_ttl(self, default_ttl: float) -> float:
        return max([default_ttl, *(e.ttl for e in self.entries if e.ttl is not None)])


def parse_entries(raw: Any, key: str = "entries") -> Registry:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        report(ConfigError(key, "a list of registration entries", raw))
        raw = []
    entries = []
    for i, item in enumerate(raw):
        with keep_going():  # one entry's mistake does not hide the next one's
            entries.append(parse_entry(item, f"{key}[{i}]", i))
    return Registry(entries)


def unix_selectors(*, uid: int, gid: int, path: str | None, sha256: str | None) -> frozenset[str]:
    out = {f"unix:uid:{uid}", f"unix:gid:{gid}"}
    if path is not None:
        out.add(f"unix:path:{path}")
    if sha256 is not None:
        out.add(f"unix:sha256:{sha256}")
    return frozenset(out)


def k8s_selectors(*, namespace: str, service_account: str, cluster: str) -> frozenset[str]:
    return frozenset({f"k8s:ns:{namespace}", f"k8s:sa:{service_account}", f"k8s:cluster:{cluster}"})
