"""Every identity error code, each produced by the code that raises it.

``IdentityCode`` is a closed set: the codes are metric labels and log fields, so an issuer must
not be able to add to it. A meta-test fails when a code is added without a case here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.attestors import FileAttestor, K8sAttestor, _map_errors
from sidecar.identity.errors import IdentityCode, IdentityError
from sidecar.identity.rfc8693_exchange import error_from_response, parse_token_response
from sidecar.identity.spiffe_attestor import SpiffeAttestor
from sidecar.identity.workload_api import WorkloadApiUnavailable
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc9449_dpop import ProofSigner

NOW = 1_700_000_000.0
AUD = "spiffe://demo.local/ns/shop/sa/orders"
ISSUER = "https://issuer.example"
KEY = ec.derive_private_key(11, ec.SECP256R1())
SIGNER = ProofSigner(KEY)

Produce = Callable[[Path], IdentityError]


def raised(coro_or_call: Callable[[], object]) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        result = coro_or_call()
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return info.value


def issuer_says(code: str, status: int = 400) -> Produce:
    body = json.dumps({"error": code}).encode()
    return lambda _tmp: error_from_response(status, {}, body)


def token_response(doc: dict[str, object]) -> Produce:
    def produce(_tmp: Path) -> IdentityError:
        return raised(
            lambda: parse_token_response(
                200,
                {},
                json.dumps(doc).encode(),
                audience=AUD,
                requested_at=NOW,
                expected_jkt=SIGNER.thumbprint,
                require_dpop=True,
            )
        )

    return produce


def boundary(exc: BaseException) -> Produce:
    async def body() -> None:
        async with _map_errors("token request"):
            raise exc

    return lambda _tmp: raised(body)


def k8s(tmp: Path, **kw: object) -> K8sAttestor:
    return K8sAttestor(issuer=ISSUER, token_file=str(tmp / "sa-token"), signer=SIGNER, **kw)  # type: ignore[arg-type]


def metadata(doc: dict[str, object]) -> Produce:
    async def body(tmp: Path) -> None:
        attestor = k8s(tmp)
        try:
            attestor._check_metadata(doc, f"{ISSUER}/.well-known/openid-configuration")
        finally:
            await attestor.close()

    return lambda tmp: raised(lambda: body(tmp))


def subject_token_missing(tmp: Path) -> IdentityError:
    async def body() -> None:
        attestor = k8s(tmp, token_endpoint=f"{ISSUER}/token")
        try:
            await attestor.fetch(AUD)
        finally:
            await attestor.close()

    return raised(body)


def file_token_expired(tmp: Path) -> IdentityError:
    path = tmp / "token"
    path.write_text(sign_compact(KEY, "ES256", {"exp": NOW - 1, "aud": AUD}))
    return raised(lambda: FileAttestor(str(path), SIGNER, clock=lambda: NOW).fetch(AUD))


class _RefusingApi:
    def __init__(self, status: str) -> None:
        self.status = status

    async def jwt_svid(self, audience: str) -> object:
        raise WorkloadApiUnavailable("refused", self.status)

    async def close(self) -> None:
        return None


def workload_api(status: str) -> Produce:
    def produce(_tmp: Path) -> IdentityError:
        attestor = SpiffeAttestor.__new__(SpiffeAttestor)
        attestor._api = _RefusingApi(status)  # type: ignore[assignment]
        return raised(lambda: attestor.fetch(AUD))

    return produce


def no_valid_token(_tmp: Path) -> IdentityError:
    from test_identity_source import A, make

    async def body() -> None:
        source, attestor, _, _ = make([])
        attestor.error = IdentityError(IdentityCode.UNAVAILABLE, "down")
        async with source:
            await source.get(A)

    return raised(body)


def attestor_bug(_tmp: Path) -> IdentityError:
    from test_identity_source import A, make

    async def body() -> None:
        source, attestor, _, _ = make([])

        async def broken(audience: str) -> object:
            raise KeyError("bug")

        attestor.fetch = broken  # type: ignore[assignment,method-assign]
        async with source:
            await source.get(A)

    err = raised(body)
    assert err.code is IdentityCode.NO_VALID_TOKEN
    assert isinstance(getattr(err, "cause", None), IdentityError)
    cause = err.cause  # type: ignore[attr-defined]
    assert isinstance(cause, IdentityError)
    return cause


CASES: dict[IdentityCode, Produce] = {
    IdentityCode.INVALID_REQUEST: issuer_says("invalid_request"),
    IdentityCode.INVALID_CLIENT: issuer_says("invalid_client", 401),
    IdentityCode.INVALID_GRANT: issuer_says("invalid_grant"),
    IdentityCode.UNAUTHORIZED_CLIENT: issuer_says("unauthorized_client"),
    IdentityCode.UNSUPPORTED_GRANT_TYPE: issuer_says("unsupported_grant_type"),
    IdentityCode.INVALID_SCOPE: issuer_says("invalid_scope"),
    IdentityCode.INVALID_TARGET: issuer_says("invalid_target"),
    IdentityCode.ACCESS_DENIED: issuer_says("access_denied", 403),
    IdentityCode.INVALID_DPOP_PROOF: issuer_says("invalid_dpop_proof"),
    IdentityCode.USE_DPOP_NONCE: issuer_says("use_dpop_nonce"),
    IdentityCode.SERVER_ERROR: issuer_says("anything", 502),
    IdentityCode.TEMPORARILY_UNAVAILABLE: issuer_says("slow_down", 429),
    IdentityCode.ISSUER_ERROR: issuer_says("vendor_specific_error"),
    IdentityCode.UNAVAILABLE: boundary(ConnectionResetError(104, "reset")),
    IdentityCode.TIMEOUT: boundary(TimeoutError()),
    IdentityCode.BAD_RESPONSE: token_response({"token_type": "DPoP", "expires_in": 60}),
    IdentityCode.DISCOVERY_FAILED: metadata({"issuer": "https://someone.else"}),
    IdentityCode.SUBJECT_TOKEN_UNAVAILABLE: subject_token_missing,
    IdentityCode.BINDING_MISMATCH: token_response(
        {"access_token": "x", "token_type": "Bearer", "expires_in": 60}
    ),
    IdentityCode.TOKEN_EXPIRED: file_token_expired,
    IdentityCode.NO_VALID_TOKEN: no_valid_token,
    IdentityCode.INTERNAL_ERROR: attestor_bug,
    IdentityCode.DPOP_UNSUPPORTED: metadata(
        {
            "issuer": ISSUER,
            "token_endpoint": f"{ISSUER}/token",
            "dpop_signing_alg_values_supported": ["RS256"],
        }
    ),
    IdentityCode.WORKLOAD_API_REFUSED: workload_api("unimplemented"),
}


@pytest.mark.parametrize("code", list(CASES), ids=str)
def test_each_code_comes_from_its_failure(code: IdentityCode, tmp_path: Path) -> None:
    err = CASES[code](tmp_path)
    assert err.code is code, err


def test_every_code_has_a_case() -> None:
    assert set(CASES) == set(IdentityCode)


def test_an_unknown_issuer_code_is_one_label_and_kept_in_the_detail() -> None:
    seen = {issuer_says(f"custom_{i}")(Path()).code for i in range(50)}
    assert seen == {IdentityCode.ISSUER_ERROR}
    assert "custom_7" in issuer_says("custom_7")(Path()).detail


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("unavailable", IdentityCode.UNAVAILABLE),
        ("deadline_exceeded", IdentityCode.TIMEOUT),
        ("permission_denied", IdentityCode.ACCESS_DENIED),
        ("invalid_argument", IdentityCode.WORKLOAD_API_REFUSED),
    ],
)
def test_workload_api_statuses_map_onto_our_codes(status: str, code: IdentityCode) -> None:
    err = workload_api(status)(Path())
    assert err.code is code and status in err.detail


def test_every_public_error_is_a_sidecar_error() -> None:
    import importlib
    import pkgutil

    import sidecar
    from sidecar.errors import SidecarError

    outside = []
    for info in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if info.name.startswith("sidecar.demo") or info.name.endswith("__main__"):
            continue  # the demo (a program) and entry points (run on import) are not the library
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and value.__module__ == info.name
                and not name.startswith("_")
                and not issubclass(value, SidecarError)
            ):
                outside.append(f"{info.name}.{name}")
    assert outside == []
