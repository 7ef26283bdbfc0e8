"""Ingress policy: which callers (SPIFFE IDs) may use which methods and paths, default deny,
and per route how callers must authenticate (DPoP by default, bearer where allowed).

Principal patterns: a ``spiffe://`` or ``wimse://`` ID, exact or a glob where ``*`` matches
within one path segment and ``**`` (a whole segment) matches any number of segments
(``spiffe://demo.local/ns/shop/**``); ``**`` alone is any authenticated caller. Patterns are
validated at load: one that cannot match any workload ID is refused, not kept silently.

Path patterns are segment-aware prefixes: ``/orders`` matches ``/orders`` and ``/orders/42``,
never ``/ordersX``. A segment may hold ``*`` (one non-empty segment, or within a segment:
``/v*/orders``) and a whole segment may be ``**`` (zero or more segments): ``/orders/*/items``
matches ``/orders/42/items`` and below. Literal prefixes are matched with string operations;
each rule's globs are compiled at load into one anchored regular expression, tried only when
no literal prefix matched.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

from sidecar.config_util import (
    get_bool,
    get_choice,
    get_str,
    get_str_list,
    known_keys,
    section,
)
from sidecar.errors import ConfigError
from sidecar.jose.spiffe_id import MAX_ID_BYTES, valid_trust_domain

log = logging.getLogger(__name__)

AuthMode = Literal["dpop", "bearer", "wimse"]
_SLASHES = re.compile(r"/{2,}")
_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}

#: ``**`` alone: any authenticated caller.
ANY_PRINCIPAL = "**"
_PRINCIPAL_SCHEMES = ("spiffe://", "wimse://")
#: SPIFFE ID path segments (SPIFFE ID §2.2); WIMSE identifiers are URIs: RFC 3986 pchar.
_SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._*-]+")
_WIMSE_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()+,;=:@%*-]+")
_TRUST_DOMAIN_GLOB = re.compile(r"[a-z0-9._*-]+")
PRINCIPAL_FORMS = (
    "SPIFFE or WIMSE IDs (spiffe://trust-domain/path), exact or with * within a segment "
    "and ** for any number of segments; ** alone for any authenticated caller"
)


def segment_glob(segment: str) -> str:
    """One segment of a glob: ``*`` within it matches any characters but ``/``."""
    return "[^/]*".join(re.escape(part) for part in segment.split("*"))


def _principal_regex(pattern: str) -> str:
    if pattern == ANY_PRINCIPAL:
        return ".*"
    scheme, _, rest = pattern.partition("://")
    out = [re.escape(scheme + "://")]
    for i, segment in enumerate(rest.split("/")):
        if segment == "**":
            # ``…/shop/**`` matches ``…/shop/a/b`` but never ``…/shopping``.
            out.append("/.*" if i else "[^/]*(?:/.*)?")
        else:
            out.append(("/" if i else "") + segment_glob(segment))
    return "".join(out)


def check_principal(pattern: str, key: str) -> None:
    """Refuse a principal pattern that can never match a workload ID, saying why."""
    if pattern == ANY_PRINCIPAL:
        return
    if pattern == "*":
        raise ConfigError(key, "** for any caller (* stays within one segment of an ID)", pattern)
    if not pattern.startswith(_PRINCIPAL_SCHEMES):
        raise ConfigError(key, PRINCIPAL_FORMS, pattern)
    if len(pattern.encode()) > MAX_ID_BYTES:
        raise ConfigError(key, f"an ID of at most {MAX_ID_BYTES} bytes", pattern)
    scheme, _, rest = pattern.partition("://")
    domain, *segments = rest.split("/")
    if domain not in ("*", "**") and not (
        valid_trust_domain(domain)
        if "*" not in domain
        else _TRUST_DOMAIN_GLOB.fullmatch(domain) and "**" not in domain
    ):
        raise ConfigError(
            key,
            "a trust domain of lower-case letters, digits, '.', '-' and '_' "
            "(or * within it, or a whole * or **)",
            pattern,
        )
    allowed = _SPIFFE_SEGMENT if scheme == "spiffe" else _WIMSE_SEGMENT
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ConfigError(
                key, "no empty, '.' or '..' path segment and no trailing '/' in an ID", pattern
            )
        if "**" in segment and segment != "**":
            raise ConfigError(key, "** as a whole segment (…/shop/**), not inside one", pattern)
        if allowed.fullmatch(segment) is None:
            chars = "letters, digits, '.', '-' and '_'" if scheme == "spiffe" else "URI path"
            raise ConfigError(key, f"ID path segments of {chars} (and * or **)", pattern)


def _path_regex(pattern: str) -> str:
    """A path glob as an anchored, segment-aware prefix regex (``re.match``)."""
    segments = pattern.split("/")[1:]
    trailing = segments[-1] == ""
    out = []
    for segment in segments[:-1] if trailing else segments:
        if segment == "**":
            out.append("(?:/[^/]+)*")
        elif segment == "*":
            out.append("/[^/]+")
        else:
            out.append("/" + segment_glob(segment))
    # "/orders/*/" asks for a "/" after the segment, as the literal "/orders/" does.
    return "".join(out) + ("/" if trailing else r"(?:/|\Z)")


def check_path(pattern: str, key: str) -> None:
    """Refuse a path pattern that no canonical request path (see :func:`canonical_path`) can
    ever match, saying why."""
    if not pattern.startswith("/"):
        raise ConfigError(key, "paths starting with '/'", pattern)
    if "?" in pattern or "#" in pattern:
        raise ConfigError(
            key, "a path without '?' or '#' (the query is not matched; * is the wildcard)", pattern
        )
    if "%" in pattern or "\\" in pattern:
        raise ConfigError(key, "a decoded path: no '%' escapes or backslashes", pattern)
    inner = pattern[1:-1] if pattern.endswith("/") else pattern[1:]
    if pattern != "/" and any(s in ("", ".", "..") for s in inner.split("/")):
        raise ConfigError(key, "a path without '//', '.' or '..' segments", pattern)
    if any("**" in s and s != "**" for s in inner.split("/")):
        raise ConfigError(key, "** as a whole segment (/orders/**), not inside one", pattern)


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _covers(outer: str, inner: str) -> bool:
    """Whether the literal path prefix ``outer`` matches every path ``inner`` (a literal
    prefix, or the literal part of a glob) matches."""
    return _prefix_matches(outer, inner) and (outer.endswith("/") <= inner.startswith(outer))


def _literal_head(pattern: str) -> str:
    """The segments of a path pattern before its first wildcard."""
    head = []
    for segment in pattern.split("/")[1:]:
        if "*" in segment:
            break
        head.append(segment)
    return "/" + "/".join(head)


def _alternation(regexes: Sequence[str]) -> re.Pattern[str] | None:
    if not regexes:
        return None
    return re.compile("|".join(f"(?:{rx})" for rx in regexes), re.S)


_CANONICAL_KEY_MAX = 512  # longer paths are computed each time, not kept


def canonical_path(raw: str) -> str | None:
    """The path a policy is matched against, or None if it is ambiguous and must be denied.

    Drops the query, decodes percent-escapes and refuses dot segments, encoded slashes and
    backslashes, so ``/%2e%2e/admin`` cannot slip past a ``/public`` rule. A pure function of
    ``raw``, memoized (bounded): the same few paths come back on every check.
    """
    return _canonical(raw) if len(raw) > _CANONICAL_KEY_MAX else _canonical_memo(raw)


@functools.lru_cache(maxsize=4096)
def _canonical_memo(raw: str) -> str | None:
    return _canonical(raw)


def _canonical(raw: str) -> str | None:
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in path or "%00" in lowered:
        return None
    try:
        decoded = unquote(path, errors="strict") if "%" in path else path
    except UnicodeDecodeError:
        return None
    # Envoy merges slashes (merge_slashes) before the app sees the path; do the same here
    # so "//pay" is matched as "/pay".
    decoded = _SLASHES.sub("/", decoded)
    segments = decoded.split("/")
    if any(s in (".", "..") for s in segments):
        return None
    return decoded


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    auth: AuthMode
    nonce: bool


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    principals: tuple[str, ...]  # as configured
    methods: frozenset[str] | None  # None: any method
    paths: tuple[str, ...]  # as configured
    # Compiled at load so a check does a set lookup, one str.startswith and at most one regex
    # match per field and rule.
    _exact_principals: frozenset[str] = field(default=frozenset(), repr=False)
    _principal_globs: re.Pattern[str] | None = field(default=None, repr=False)
    _exact_paths: frozenset[str] = field(default=frozenset(), repr=False)
    _path_prefixes: tuple[str, ...] = field(default=(), repr=False)
    _path_globs: re.Pattern[str] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        name: str,
        principals: Sequence[str],
        methods: frozenset[str] | None,
        paths: Sequence[str],
    ) -> Rule:
        """A rule from already validated patterns (:func:`check_principal`, :func:`check_path`)."""
        literal_paths = [p for p in paths if "*" not in p]
        return cls(
            name=name,
            principals=tuple(principals),
            methods=methods,
            paths=tuple(paths),
            _exact_principals=frozenset(p for p in principals if "*" not in p),
            _principal_globs=_alternation(
                [_principal_regex(p) + r"\Z" for p in principals if "*" in p]
            ),
            _exact_paths=frozenset(p for p in literal_paths if p != "/"),
            _path_prefixes=tuple("/" if p == "/" else p.rstrip("/") + "/" for p in literal_paths),
            _path_globs=_alternation([_path_regex(p) for p in paths if "*" in p]),
        )

    def matches(self, principal: str, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if not (
            path in self._exact_paths
            or path.startswith(self._path_prefixes)
            or (self._path_globs is not None and self._path_globs.match(path) is not None)
        ):
            return False
        return principal in self._exact_principals or (
            self._principal_globs is not None and self._principal_globs.match(principal) is not None
        )

    def _allows_principal(self, principal: str) -> bool:
        return principal in self._exact_principals or (
            self._principal_globs is not None and self._principal_globs.match(principal) is not None
        )

    def covers(self, other: Rule) -> bool:
        """Conservatively: whether this rule allows everything ``other`` allows (then
        ``other``, placed after it, never decides anything). False when unsure."""
        if self.methods is not None and (other.methods is None or other.methods - self.methods):
            return False
        literal = [p for p in self.paths if "*" not in p]
        for path in other.paths:
            if "*" in path:
                if not any(_covers(p, _literal_head(path)) for p in literal):
                    return False
            elif not any(_covers(p, path) for p in literal) and not (
                self._path_globs is not None and self._path_globs.match(path)
            ):
                return False
        if ANY_PRINCIPAL in self.principals:
            return True
        wide = [p[:-3] for p in self.principals if p.endswith("/**")]
        for principal in other.principals:
            if "*" in principal:
                if not any(principal.startswith(w + "/") for w in wide):
                    return False
            elif not self._allows_principal(principal):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Policy:
    routes: tuple[Route, ...]  # longest prefix first
    rules: tuple[Rule, ...]
    default_route: Route

    def route_for(self, path: str) -> Route:
        for route in self.routes:
            if _prefix_matches(route.prefix, path):
                return route
        return self.default_route

    def allowing_rule(self, principal: str, method: str, path: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(principal, method, path):
                return rule
        return None

    def lint(self, path: str = "authz") -> list[str]:
        """What an operator should hear at start: no rule at all, or rules that can never
        decide anything because an earlier rule allows all they allow."""
        if not self.rules:
            return [
                f"{path}.rules is empty: every authenticated request is denied 403 "
                "policy_denied (default deny); add a rule to allow callers"
            ]
        found = []
        for j, later in enumerate(self.rules):
            for i, earlier in enumerate(self.rules[:j]):
                if earlier.covers(later):
                    found.append(
                        f"{path}.rules[{j}] ({later.name}) is shadowed by {path}.rules[{i}] "
                        f"({earlier.name}), which allows everything it allows: it never "
                        "decides a request (remove it, or move it first)"
                    )
                    break
        return found

    @classmethod
    def from_config(cls, data: Any, path: str = "authz", *, nonce_default: bool = False) -> Policy:
        root = section(data, path)
        for name in ("routes", "rules"):
            if not isinstance(root.get(name) or [], list):
                raise ConfigError(f"{path}.{name}", "a list", root.get(name))
        routes = []
        for i, raw in enumerate(root.get("routes") or []):
            key = f"{path}.routes[{i}]"
            item = section(raw, key)
            known_keys(item, key, {"prefix", "auth", "nonce"})
            prefix = get_str(item, "prefix", key)
            if not prefix.startswith("/"):
                raise ConfigError(f"{key}.prefix", "a path starting with '/'", prefix)
            if "*" in prefix:
                # Routes are ordered by prefix length; a glob has no length to order by.
                raise ConfigError(
                    f"{key}.prefix",
                    "a literal prefix without * (/orders already covers /orders/42)",
                    prefix,
                )
            auth: Any = get_choice(item, "auth", key, ("dpop", "bearer", "wimse"), "dpop")
            routes.append(Route(prefix, auth, get_bool(item, "nonce", key, nonce_default)))
        routes.sort(key=lambda r: len(r.prefix), reverse=True)
        rules = []
        for i, raw in enumerate(root.get("rules") or []):
            key = f"{path}.rules[{i}]"
            item = section(raw, key)
            known_keys(item, key, {"name", "principals", "methods", "paths"})
            principals = _non_empty(get_str_list(item, "principals", key), f"{key}.principals")
            for principal in principals:
                check_principal(principal, f"{key}.principals")
            methods_list = item.get("methods")
            methods = None
            if methods_list is not None and methods_list != ["*"] and methods_list != "*":
                methods_given = get_str_list(item, "methods", key)
                methods = frozenset(m.upper() for m in _non_empty(methods_given, f"{key}.methods"))
                bad = sorted(methods - _HTTP_METHODS)
                if bad:
                    raise ConfigError(
                        f"{key}.methods", f"HTTP methods from {sorted(_HTTP_METHODS)}", bad[0]
                    )
            paths = _non_empty(get_str_list(item, "paths", key, ["/"]), f"{key}.paths")
            for p in paths:
                check_path(p, f"{key}.paths")
            rules.append(
                Rule.build(get_str(item, "name", key, f"rule-{i}"), principals, methods, paths)
            )
        policy = cls(tuple(routes), tuple(rules), Route("/", "dpop", nonce_default))
        for warning in policy.lint(path):
            log.warning("%s", warning)
        return policy


def _non_empty(values: list[str], key: str) -> list[str]:
    if not values:
        raise ConfigError(key, "at least one entry (an empty list matches nothing)", values)
    return values


def empty_policy() -> Policy:
    return Policy((), (), Route("/", "dpop", False))
