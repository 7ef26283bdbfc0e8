"""The transport-free request view and the one Decision type both ext_authz transports render."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from sidecar.errors import Reason

Header = tuple[str, str]
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class RequestView(NamedTuple):
    """What the authorizer needs of one request. Header names are lower-case; a header sent
    more than once arrives comma-merged (Envoy's gRPC ``headers`` map does this).

    A named tuple: one is built per check, and a frozen dataclass's ``__init__`` costs twice
    as much. The connection's peer address is deliberately absent: no decision depends on it.
    """

    method: str
    scheme: str
    authority: str
    path: str  # with the query string, as received
    headers: Mapping[str, str]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"


# Identity and Allow are named tuples, as RequestView: several are built per check and a
# frozen dataclass costs three times as much to build (1.5 µs more for seven fields).


class Identity(NamedTuple):
    subject: str
    issuer: str
    auth: str  # "dpop" or "bearer"
    jkt: str | None
    client_id: str | None
    token_jti: str | None
    rule: str


class Allow(NamedTuple):
    identity: Identity
    headers_to_set: tuple[Header, ...]
    headers_to_remove: tuple[str, ...]
    response_headers: tuple[Header, ...] = ()
    metadata: Mapping[str, Any] = _NO_METADATA

    # Read like Deny's fields (a NamedTuple holds no plain class attributes).
    @property
    def allowed(self) -> bool:
        return True

    @property
    def status(self) -> int:
        return 200

    @property
    def reason(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: Reason
    detail: str
    headers: tuple[Header, ...]
    body: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    allowed = False


Decision = Allow | Deny
