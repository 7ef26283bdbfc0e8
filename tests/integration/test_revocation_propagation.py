"""Revocation propagation with the real broker and authorizer processes at their default
revocation settings: a `sidecar broker revoke` reaches the authorizer (long-poll on the broker's
`/revocations`) in well under a second, while an idle authorizer sends almost no requests.
Also the long-poll protocol itself against the broker: held until a change, bounded in time
and in number, answered at once without `Prefer: wait`."""

from __future__ import annotations

import http.client
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sidecar.jose.rfc9449_dpop import ProofSigner
from tests.integration.broker_process import (
    TRUST,
    Answer,
    BrokerProcess,
    new_signer,
    python_entries,
)
from tests.integration.harness import ManagedProcess, free_port, http_request, wait_for_http

ORDERS = f"{TRUST}/ns/shop/sa/orders"
SUBJECT = f"{TRUST}/unix/python"
HOST = "orders.local"


@dataclass
class Pair:
    broker: BrokerProcess
    authz: ManagedProcess
    http_port: int
    admin_port: int

    def check(self, token: str, signer: ProofSigner) -> tuple[int, str | None]:
        """One HTTP ext_authz check as Envoy sends it: (status, x-authz-reason)."""
        path = "/orders/1"
        proof = signer.proof(
            method="GET", url=f"http://{HOST}{path}", now=time.time(), access_token=token
        )
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request(
                "GET",
                path,
                headers={"Host": HOST, "Authorization": f"DPoP {token}", "DPoP": proof},
            )
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("x-authz-reason")
        finally:
            conn.close()

    def broker_metric(self, name: str) -> float:
        text = http_request(f"{self.broker.admin_url}/metrics")[2].decode()
        return sum(
            float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        )

    def authz_metrics(self) -> str:
        return http_request(f"http://127.0.0.1:{self.admin_port}/metrics")[2].decode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("revocation")
    broker = BrokerProcess(tmp, entries=python_entries()).start()
    http_port, admin_port = free_port(), free_port()
    cfg = {
        "authz": {
            "audience": ORDERS,
            "issuers": [{"issuer": broker.issuer, "discovery": True, "algorithms": ["ES256"]}],
            "grpc": {"enabled": False},
            "http": {"listen": f"127.0.0.1:{http_port}"},
            # Only the URL: every other revocation setting is the default under test.
            "revocation": {"url": f"{broker.issuer}/revocations"},
            "rules": [
                {
                    "name": "all",
                    "principals": [f"{TRUST}/**"],
                    "methods": ["GET"],
                    "paths": ["/orders"],
                },
            ],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    (tmp / "authz.yaml").write_text(yaml.safe_dump(cfg))
    authz = ManagedProcess(
        [sys.executable, "-m", "sidecar", "authz", "-c", str(tmp / "authz.yaml")],
        name="authz",
        log_dir=tmp,
    )
    try:
        authz.start()
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 20, process=authz)
        yield Pair(broker, authz, http_port, admin_port)
    finally:
        authz.stop()
        broker.stop()


def test_revocation_reaches_the_authorizer_within_a_second(pair: Pair) -> None:
    signer = new_signer()
    token = pair.broker.unix_token([ORDERS], signer).token
    assert pair.check(token, signer) == (200, None)

    # Idle: the authorizer's long-poll is held by the broker; few requests while nothing changes.
    before = pair.broker_metric("sidecar_broker_revocation_list_requests_total")
    time.sleep(10.0)
    idle = pair.broker_metric("sidecar_broker_revocation_list_requests_total") - before
    assert idle <= 2, f"{idle:g} revocation-list requests in 10 s while nothing changed"
    assert pair.broker_metric("sidecar_broker_revocation_waiting") == 1

    rc, _, err = pair.broker.revoke("--sub", SUBJECT)
    revoked_at = time.monotonic()  # the broker has changed its list when the CLI returns
    assert rc == 0, err
    try:
        while (answer := pair.check(token, signer)) == (200, None):
            assert time.monotonic() - revoked_at < 5.0, "revocation not enforced within 5 s"
            time.sleep(0.01)
        took = time.monotonic() - revoked_at
        assert answer == (401, "revoked")
        print(f"revocation enforced {took * 1000:.0f} ms after `sidecar broker revoke` returned")
        assert took < 1.0, f"revocation took {took:.2f} s to reach the authorizer"
    finally:
        assert pair.broker.revoke("--sub", SUBJECT, "--restore")[0] == 0
    restored_at = time.monotonic()
    while pair.check(token, signer) != (200, None):
        assert time.monotonic() - restored_at < 1.0, "restore not seen within 1 s"
        time.sleep(0.01)
    # The authorizer measured the propagation of both changes from the broker's change time.
    metrics = pair.authz_metrics()
    count = re.search(r"^sidecar_authz_revocation_propagation_seconds_count (\S+)$", metrics, re.M)
    total = re.search(r"^sidecar_authz_revocation_propagation_seconds_sum (\S+)$", metrics, re.M)
    assert count and total and float(count.group(1)) >= 2
    assert float(total.group(1)) / float(count.group(1)) < 1.0
    silence = re.search(r"^sidecar_authz_revocation_silence_seconds (\S+)$", metrics, re.M)
    assert silence and float(silence.group(1)) < 1.0  # it has just heard from the broker


# -- the long-poll protocol at the broker --------------------------------------------------------


def long_poll_in_background(
    broker: BrokerProcess, etag: str, wait: int
) -> tuple[threading.Thread, list[Answer]]:
    answers: list[Answer] = []
    headers = {"If-None-Match": etag, "Prefer": f"wait={wait}"}
    thread = threading.Thread(target=lambda: answers.append(broker.get("/revocations", headers)))
    thread.start()
    time.sleep(0.3)  # held by now
    return thread, answers


@pytest.fixture(scope="module")
def small_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("longpoll")
    broker = BrokerProcess(
        tmp,
        name="small",
        entries=python_entries(),
        extra={
            "revocation": {"state_file": str(tmp / "rev.json"), "max_wait": 4, "max_waiting": 1}
        },
    ).start()
    try:
        yield broker
    finally:
        broker.stop()


def test_long_poll_is_held_until_the_list_changes(small_broker: BrokerProcess) -> None:
    etag = small_broker.get("/revocations").headers["etag"]
    # Without Prefer: answered at once, as before.
    started = time.monotonic()
    plain = small_broker.get("/revocations", {"If-None-Match": etag})
    assert plain.status == 304 and "preference-applied" not in plain.headers
    assert time.monotonic() - started < 0.5

    # Held for the granted wait (max_wait clamps the 50 s asked for), then 304.
    started = time.monotonic()
    held = small_broker.get("/revocations", {"If-None-Match": etag, "Prefer": "wait=50"})
    waited = time.monotonic() - started
    assert held.status == 304 and held.headers["preference-applied"] == "wait=4"
    assert 3.8 <= waited < 5.0, waited

    # A change ends the hold at once with the new list.
    poll, answers = long_poll_in_background(small_broker, etag, 4)
    victim = f"{TRUST}/ns/x/sa/gone"
    small_broker.admin_revoke("sub", victim)  # the admin socket: no CLI start-up in the window
    changed_at = time.monotonic()
    poll.join(5)
    try:
        [changed] = answers
        assert changed.status == 200 and victim in changed.body["subjects"]
        assert changed.headers["etag"] != etag
        assert float(changed.headers["sidecar-list-changed"]) <= time.time()
        assert time.monotonic() - changed_at < 1.0
    finally:
        small_broker.admin_revoke("sub", victim, restore=True)


def test_long_polls_beyond_max_waiting_are_answered_at_once(small_broker: BrokerProcess) -> None:
    etag = small_broker.get("/revocations").headers["etag"]
    holder, first = long_poll_in_background(small_broker, etag, 4)  # max_waiting: 1
    started = time.monotonic()
    second = small_broker.get("/revocations", {"If-None-Match": etag, "Prefer": "wait=4"})
    assert time.monotonic() - started < 0.5
    assert second.status == 304 and "preference-applied" not in second.headers
    holder.join(5)
    assert first[0].status == 304 and first[0].headers["preference-applied"] == "wait=4"


def test_stopping_the_broker_releases_held_requests(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path, name="stopping", entries=python_entries()).start()
    etag = broker.get("/revocations").headers["etag"]
    poll, answers = long_poll_in_background(broker, etag, 30)
    started = time.monotonic()
    broker.stop()
    poll.join(10)
    assert answers and answers[0].status == 304
    assert time.monotonic() - started < 3.0
