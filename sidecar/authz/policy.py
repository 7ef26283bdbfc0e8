"""Ingress policy: which callers (SPIFFE IDs) may use which methods and paths, default deny,
and per route how callers must authenticate (DPoP by default, bearer where allowed).

Principal patterns: an exact ID, or a glob where ``*`` matches within one path segment and
``**`` matches any characters including ``/`` (``spiffe://demo.local/ns/shop/**``).
Path patterns are segment-aware prefixes: ``/orders`` matches ``/orders`` and ``/orders/42``,
never ``/ordersX``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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

AuthMode = Literal["dpop", "bearer", "wimse"]
_SLASHES = re.compile(r"/{2,}")
_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def canonical_path(raw: str) -> str | None:
    """The path a policy is matched against, or None if it is ambiguous and must be denied.

    Drops the query, decodes percent-escapes and refuses dot segments, encoded slashes and
    backslashes, so ``/%2e%2e/admin`` cannot slip past a ``/public`` rule.
    """
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
    principals: tuple[re.Pattern[str], ...]
    methods: frozenset[str] | None  # None: any method
    paths: tuple[str, ...]

    def matches(self, principal: str, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if not any(_prefix_matches(p, path) for p in self.paths):
            return False
        return any(rx.match(principal) for rx in self.principals)


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
            auth: Any = get_choice(item, "auth", key, ("dpop", "bearer", "wimse"), "dpop")
            routes.append(Route(prefix, auth, get_bool(item, "nonce", key, nonce_default)))
        routes.sort(key=lambda r: len(r.prefix), reverse=True)
        rules = []
        for i, raw in enumerate(root.get("rules") or []):
            key = f"{path}.rules[{i}]"
            item = section(raw, key)
            known_keys(item, key, {"name", "principals", "methods", "paths"})
            principals = get_str_list(item, "principals", key)
            methods_list = item.get("methods")
            methods = None
            if methods_list is not None and methods_list != ["*"] and methods_list != "*":
                methods = frozenset(m.upper() for m in get_str_list(item, "methods", key))
                bad = sorted(methods - _HTTP_METHODS)
                if bad:
                    raise ConfigError(
                        f"{key}.methods", f"HTTP methods from {sorted(_HTTP_METHODS)}", bad[0]
                    )
            paths = get_str_list(item, "paths", key, ["/"])
            for p in paths:
                if not p.startswith("/"):
                    raise ConfigError(f"{key}.paths", "paths starting with '/'", p)
            rules.append(
                Rule(
                    name=get_str(item, "name", key, f"rule-{i}"),
                    principals=tuple(_glob_regex(p) for p in principals),
                    methods=methods,
                    paths=tuple(paths),
                )
            )
        return cls(tuple(routes), tuple(rules), Route("/", "dpop", nonce_default))


def empty_policy() -> Policy:
    return Policy((), (), Route("/", "dpop", False))
