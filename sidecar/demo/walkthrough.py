"""The scripted walkthrough: what a legacy frontend (plain HTTP to 127.0.0.1), an on-path
observer and an operator do, and what each should see.

Every step states what it expects and records what it observed; nothing here decides an
outcome except the comparison of the two, so a broken component shows up as a FAIL row.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.demo.report import Report, Step
from sidecar.demo.tap import Captured, WireTap
from sidecar.demo.topology import FRONTEND_ID, REPORTS_ID, Placement
from sidecar.jose.rfc7515_jws import JWSFormatError, parse_compact


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated ones comma-joined
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def reason(self) -> str:
        return self.headers.get("x-authz-reason", "")

    def seen_identity(self) -> str:
        headers = self.json().get("headers", {})
        return str(headers.get("x-workload-id", "")) if isinstance(headers, dict) else ""


def call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One plain HTTP/1.1 request to 127.0.0.1, as a legacy client makes it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        merged: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Reply(resp.status, merged, data)
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    """Sum of a Prometheus metric's samples on an admin port (0 if absent)."""
    text = call(port, "GET", "/metrics").body.decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def current_token(admin_port: int) -> dict[str, Any]:
    """The claims of a sidecar's cached token (its admin /tokens: never the token itself)."""
    audiences = call(admin_port, "GET", "/tokens").json().get("audiences", [])
    if not audiences or not isinstance(audiences[0], dict):
        return {}
    claims = audiences[0].get("claims") or {}
    return claims if isinstance(claims, dict) else {}


def wire_jti(captured: Captured | None) -> str | None:
    """The ``jti`` of the access token a captured request carried (read, not verified: the
    demo only wants to know WHICH token was on the wire)."""
    if captured is None:
        return None
    auth = next((v for k, v in captured.headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "dpop" or not token:
        return None
    try:
        jti = parse_compact(token.strip(), max_bytes=16384).payload.get("jti")
    except JWSFormatError:
        return None
    return jti if isinstance(jti, str) and jti else None


def describe(record: dict[str, Any], *, short: bool = False) -> str:
    """What the broker's audit record says vouched for a token, in a few words."""
    attestor = record.get("attestor")
    if attestor == "k8s":
        account = f"{record.get('namespace')}/{record.get('service_account')}"
        if short:
            return f"k8s attestor ({account})"
        return f"k8s attestor: service account {account} of {record.get('cluster')}"
    if attestor == "unix":
        if short:
            return f"unix attestor (uid {record.get('uid')})"
        return f"unix attestor: uid {record.get('uid')}, executable {record.get('exe')}"
    return "no issuance record found in the broker's audit log"


@dataclass
class Walkthrough:
    placement: Placement
    tap: WireTap
    broker_config: Path
    audit_log: Path
    token_ttl: float
    say: Callable[[str], None]

    def __post_init__(self) -> None:
        self.report = Report()

    # -- plumbing ----------------------------------------------------------------------------

    def _port(self, service: str, role: str) -> int:
        return self.placement.port(service, role)

    def _step(self, title: str, expected: str) -> Step:
        step = Step(len(self.report.steps) + 1, title, expected)
        self.report.steps.append(step)
        self.say(f"  step {step.number}: {title}")
        return step

    def _run(self, step: Step, body: Callable[[Step], None]) -> None:
        try:
            body(step)
        except Exception as exc:  # one broken step is a FAIL row, not a lost table
            step.ok = False
            step.observed = f"error: {type(exc).__name__}: {exc}"

    def vouched(self, service: str) -> dict[str, Any]:
        """The broker's audit record of the token ``service``'s sidecar holds now: who the
        broker issued it to and which attestor vouched (observed, not assumed)."""
        jti = current_token(self._port(service, "admin")).get("jti")
        deadline = time.monotonic() + 3.0
        while jti:
            try:
                lines = self.audit_log.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            for line in reversed(lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "issuance" and record.get("jti") == jti:
                    return dict(record)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {}

    def run(self) -> Report:
        self._run(
            self._step(
                "frontend calls orders: GET /orders/42 on 127.0.0.1:"
                f"{self._port('frontend-sidecar', 'egress')}",
                "200; orders sees frontend's SPIFFE ID, no token",
            ),
            self.allowed,
        )
        self._run(
            self._step("an on-path observer replays that exact request to Envoy", "401 replayed"),
            self.replayed,
        )
        self._run(
            self._step(
                "the observer takes the captured token and proof to GET /orders/43",
                "401 htu_mismatch",
            ),
            self.other_url,
        )
        self._run(
            self._step("reports calls orders (its sidecar, unix-attested)", "403 policy_denied"),
            self.forbidden,
        )
        self._run(
            self._step(
                "a client skips its sidecar and calls Envoy directly", "401 missing_credentials"
            ),
            self.no_credentials,
        )
        self._run(
            self._step(
                "frontend POSTs /checkout/7, a route that demands a DPoP nonce",
                "200 after one use_dpop_nonce challenge answered by the sidecar",
            ),
            self.nonce,
        )
        self._run(
            self._step(
                "calls continue while frontend's token is refreshed",
                "every call 200; a new token (new jti) is in use",
            ),
            self.refresh,
        )
        self._run(
            self._step(
                "an operator revokes frontend at the broker, then restores it",
                "401 revoked within a second; 200 again after restore",
            ),
            self.revocation,
        )
        self._run(
            self._step(
                "reports calls orders' WIMSE route: GET /reports/daily on "
                f"127.0.0.1:{self._port('reports-sidecar', 'wimse')}",
                "200; orders sees reports' SPIFFE ID from a WIT + WPT",
            ),
            self.wimse_allowed,
        )
        self._run(
            self._step(
                "the observer replays that WIMSE request (same WIT and WPT)",
                "401 replayed, WWW-Authenticate: WPT",
            ),
            self.wimse_replayed,
        )
        return self.report

    # -- steps -------------------------------------------------------------------------------

    def allowed(self, step: Step) -> None:
        reply = call(self._port("frontend-sidecar", "egress"), "GET", "/orders/42")
        seen = reply.json().get("headers", {})
        leaked = sorted({"authorization", "dpop"} & set(seen)) if isinstance(seen, dict) else []
        identity = reply.seen_identity()
        record = self.vouched("frontend-sidecar")
        step.ok = (
            reply.status == 200
            and identity == FRONTEND_ID
            and not leaked
            and record.get("sub") == FRONTEND_ID
            and record.get("attestor") == "k8s"
        )
        step.observed = (
            f"{reply.status}; orders saw x-workload-id={identity or '(none)'}, vouched for by "
            f"the {describe(record, short=True)}"
            + (f"; LEAKED {', '.join(leaked)}" if leaked else "; no authorization/dpop header")
        )
        step.details = {
            "status": reply.status,
            "x-workload-id": identity,
            "leaked": leaked,
            "attestor": record.get("attestor"),
        }

    def _captured(self, path: str) -> Captured:
        captured = self.tap.last
        if captured is None or captured.path != path:
            raise OSError(f"the wire tap saw no request for {path}")
        return captured

    def replayed(self, step: Step) -> None:
        captured = self._captured("/orders/42")
        reply = call(
            self._port("envoy", "ingress"), captured.method, captured.path, captured.headers
        )
        step.ok = reply.status == 401 and reply.reason == "replayed"
        step.observed = f"{reply.status} {reply.reason or '(no reason)'}"
        step.details = {"status": reply.status, "reason": reply.reason}

    def other_url(self, step: Step) -> None:
        captured = self._captured("/orders/42")
        reply = call(self._port("envoy", "ingress"), "GET", "/orders/43", captured.headers)
        step.ok = reply.status == 401 and reply.reason == "htu_mismatch"
        step.observed = f"{reply.status} {reply.reason or '(no reason)'}"
        step.details = {"status": reply.status, "reason": reply.reason}

    def forbidden(self, step: Step) -> None:
        reply = call(self._port("reports-sidecar", "egress"), "GET", "/orders/42")
        record = self.vouched("reports-sidecar")
        step.ok = (
            reply.status == 403
            and reply.reason == "policy_denied"
            and record.get("sub") == REPORTS_ID
            and record.get("attestor") == "unix"
        )
        step.observed = (
            f"{reply.status} {reply.reason or '(no reason)'}: the caller is "
            f"{record.get('sub', '(unknown)')}, vouched for by the "
            f"{describe(record, short=True)}; "
            "orders' policy does not list it"
        )
        step.details = {
            "status": reply.status,
            "reason": reply.reason,
            "sub": record.get("sub"),
            "attestor": record.get("attestor"),
        }

    def no_credentials(self, step: Step) -> None:
        reply = call(self._port("envoy", "ingress"), "GET", "/orders/42")
        challenge = reply.headers.get("www-authenticate", "")
        step.ok = reply.status == 401 and reply.reason == "missing_credentials" and bool(challenge)
        step.observed = f"{reply.status} {reply.reason or '(no reason)'}; WWW-Authenticate: " + (
            challenge.split(",")[0] if challenge else "(none)"
        )
        step.details = {"status": reply.status, "reason": reply.reason}

    def nonce(self, step: Step) -> None:
        admin = self._port("frontend-sidecar", "admin")
        before = metric(admin, "sidecar_egress_nonce_retries_total")
        body = json.dumps({"order": 7, "items": 2}).encode()
        reply = call(
            self._port("frontend-sidecar", "egress"),
            "POST",
            "/checkout/7",
            {"content-type": "application/json"},
            body,
        )
        retries = metric(admin, "sidecar_egress_nonce_retries_total") - before
        arrived = reply.json().get("body_bytes")
        step.ok = (
            reply.status == 200
            and reply.seen_identity() == FRONTEND_ID
            and retries == 1
            and arrived == len(body)
        )
        step.observed = (
            f"{reply.status}; {retries:.0f} challenge(s) answered by the sidecar; "
            f"orders got the {arrived}-byte body once, from {reply.seen_identity() or '(none)'}"
        )
        step.details = {"status": reply.status, "nonce_retries": retries, "body_bytes": arrived}

    def refresh(self, step: Step) -> None:
        egress = self._port("frontend-sidecar", "egress")
        # The tokens seen ON THE WIRE (by the tap), not what the sidecar says it holds.
        jtis: list[str] = []
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + self.token_ttl * 1.5 + 5
        settle_until: float | None = None
        calls = 0
        while time.monotonic() < deadline:
            reply = call(egress, "GET", f"/orders/{100 + calls}")
            calls += 1
            key = reply.status if reply.seen_identity() == FRONTEND_ID else -reply.status
            statuses[key] = statuses.get(key, 0) + 1
            jti = wire_jti(self.tap.last)
            if jti and (not jtis or jti != jtis[-1]):
                jtis.append(jti)
                if len(jtis) >= 2 and settle_until is None:
                    settle_until = time.monotonic() + 1.0  # keep calling a moment after
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            time.sleep(0.02)
        good = statuses.get(200, 0)
        step.ok = len(set(jtis)) >= 2 and good == calls and calls > 0
        if len(jtis) > 1:
            step.observed = f"{good} of {calls} calls 200; tokens on the wire: " + " → ".join(
                f"jti {_short(j)}" for j in jtis
            )
        else:
            step.observed = f"{good} of {calls} calls 200; the token on the wire did NOT change"
        step.details = {"calls": calls, "ok_calls": good, "jtis": jtis, "statuses": statuses}

    def revocation(self, step: Step) -> None:
        egress = self._port("frontend-sidecar", "egress")
        # Timed from when the CLI returns: by then the broker's list has changed, and orders'
        # sidecar, long-polling that list, hears of it within a round trip.
        self._revoke("--sub", FRONTEND_ID)
        revoked_at = time.monotonic()
        try:
            # Until orders' sidecar answers with a reason.
            denied_after, reply = self._until(egress, lambda r: bool(r.reason), 15.0)
        finally:
            self._revoke("--sub", FRONTEND_ID, "--restore")  # never leave frontend revoked
        restored_at = time.monotonic()
        back_after, back = self._until(egress, lambda r: r.status == 200, 15.0)
        reason = reply.reason
        took, back_took = denied_after - revoked_at, back_after - restored_at
        step.ok = (
            reply.status == 401
            and reason == "revoked"
            and took < 1.0
            and back.status == 200
            and back.seen_identity() == FRONTEND_ID
        )
        step.observed = (
            f"{reply.status} {reason or '(no reason)'} {took:.2f}s after "
            f"`sidecar broker revoke --sub` returned; {back.status} again {back_took:.2f}s "
            "after --restore"
        )
        step.details = {
            "denied": reply.status,
            "reason": reason,
            "restored": back.status,
            "denied_after_s": round(took, 3),
            "restored_after_s": round(back_took, 3),
        }

    def wimse_allowed(self, step: Step) -> None:
        reply = call(self._port("reports-sidecar", "wimse"), "GET", "/reports/daily")
        seen = reply.json().get("headers", {})
        seen = seen if isinstance(seen, dict) else {}
        wire = {k.lower(): v for k, v in self._captured("/reports/daily").headers.items()}
        carried = wire.get("authorization", "").split(" ")[0] == "WPT" and bool(
            wire.get("workload-identity-token")
        )
        leaked = sorted({"authorization", "workload-identity-token"} & set(seen))
        step.ok = (
            reply.status == 200
            and reply.seen_identity() == REPORTS_ID
            and seen.get("x-workload-auth") == "wimse"
            and carried
            and not leaked
        )
        step.observed = (
            f"{reply.status}; orders saw x-workload-id={reply.seen_identity() or '(none)'} "
            f"(auth {seen.get('x-workload-auth', '?')}); on the wire: "
            + ("Workload-Identity-Token + Authorization: WPT" if carried else "NO WIT/WPT")
            + (f"; LEAKED {', '.join(leaked)}" if leaked else "")
        )
        step.details = {
            "status": reply.status,
            "x-workload-id": reply.seen_identity(),
            "auth": seen.get("x-workload-auth"),
            "leaked": leaked,
        }

    def wimse_replayed(self, step: Step) -> None:
        captured = self._captured("/reports/daily")
        reply = call(
            self._port("envoy", "ingress"), captured.method, captured.path, captured.headers
        )
        challenge = reply.headers.get("www-authenticate", "")
        step.ok = reply.status == 401 and reply.reason == "replayed" and challenge[:3] == "WPT"
        step.observed = f"{reply.status} {reply.reason or '(no reason)'}; WWW-Authenticate: " + (
            challenge.split(",")[0] if challenge else "(none)"
        )
        step.details = {"status": reply.status, "reason": reply.reason}

    # -- helpers -----------------------------------------------------------------------------

    def _revoke(self, *args: str) -> None:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "broker",
                "revoke",
                "-c",
                str(self.broker_config),
                *args,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode != 0:
            raise OSError(
                f"sidecar broker revoke {' '.join(args)} failed: {done.stderr.strip()[-300:]}"
            )

    @staticmethod
    def _until(port: int, done: Callable[[Reply], bool], timeout: float) -> tuple[float, Reply]:
        deadline = time.monotonic() + timeout
        while True:
            reply = call(port, "GET", "/orders/42")
            if done(reply) or time.monotonic() > deadline:
                return time.monotonic(), reply
            time.sleep(0.02)


def _short(jti: object) -> str:
    text = str(jti)
    return text if len(text) <= 10 else text[:8] + "…"
