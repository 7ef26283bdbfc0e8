"""``/tokens`` (``sidecar run``'s admin) answers only connections from the sidecar's own host
or pod, judged from the socket's addresses (never a header): the admin listener may be on
the pod IP for the kubelet and Prometheus, and the claims are not for them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecar.run_command import TOKENS_KEY, _tokens_handler


class Transport:
    """What aiohttp reads of the connection: the two ends of the socket."""

    def __init__(self, peer: Any, local: Any) -> None:
        self._extra = {"peername": peer, "sockname": local}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)


def _answer(peer: Any, local: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    app = web.Application()
    app[TOKENS_KEY] = None
    request = make_mocked_request(
        "GET", "/tokens", headers=headers, app=app, transport=Transport(peer, local)
    )
    response = asyncio.run(_tokens_handler(request))
    assert isinstance(response, web.Response) and response.text is not None
    return response.status, json.loads(response.text)


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        (("127.0.0.1", 40000), ("0.0.0.0", 15120)),
        (("127.0.0.7", 40000), ("127.0.0.1", 15120)),
        (("::1", 40000, 0, 0), ("::", 15120, 0, 0)),
        (("::ffff:127.0.0.1", 40000, 0, 0), ("::", 15120, 0, 0)),
        (("10.1.2.3", 40000), ("10.1.2.3", 15120)),  # another container of the same pod
        ("", "/run/sidecar/admin.sock"),  # a unix socket
    ],
)
def test_the_own_host_or_pod_gets_the_claims(peer: Any, local: Any) -> None:
    status, body = _answer(peer, local)
    assert status == 200 and body["audiences"] == []


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        (("10.1.2.9", 40000), ("10.1.2.3", 15120)),  # another pod, e.g. Prometheus
        (("192.168.0.4", 40000), ("0.0.0.0", 15120)),
        (("fe80::1%eth0", 40000, 0, 2), ("fe80::2%eth0", 15120, 0, 2)),
        (("not an address", 1), ("10.1.2.3", 15120)),
        (None, None),
    ],
)
def test_other_hosts_are_refused_whatever_they_claim(peer: Any, local: Any) -> None:
    status, body = _answer(peer, local, {"X-Forwarded-For": "127.0.0.1", "Host": "127.0.0.1"})
    assert status == 403
    assert body["error"] == "tokens_local_only"
    assert "audiences" not in body
