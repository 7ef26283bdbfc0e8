"""JOSE building blocks: base64url, compact JWS parsing, JWK import, htu normalization, algorithm
and key pairing, access-token verification per issuer algorithm, and a second JOSE library
(jwcrypto) as an independent peer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from factory import (
    AUDIENCE,
    NOW,
    ec_key,
    ed_key,
    encode_segment,
    es_issuer,
    key_store,
    rsa_key,
)
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws
from jwcrypto import jwt as jc_jwt

from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.rfc7515_jws import JWSFormatError, parse_compact, sign_compact
from sidecar.jose.rfc7517_jwk import JWKError, import_jwks, import_public_jwk, public_jwk_dict
from sidecar.jose.rfc7518_algorithms import key_fits_algorithm, verify_signature
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint
from sidecar.jose.rfc9068_access_token import verify_access_token
from sidecar.jose.rfc9449_dpop import (
    DPoPPolicy,
    ProofKeyCache,
    ProofSigner,
    access_token_hash,
    normalize_htu,
    verify_proof,
)

# -- base64url (RFC 7515 §2) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\xff\xfe", b"abc", b"\x00" * 31, bytes(range(256))],
    ids=["empty", "zero", "high-bytes", "3-bytes", "31-bytes", "all-bytes"],
)
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize(
    "text",
    [
        "QQ==",
        "QQ=",
        "a+b/",
        "a/bc",
        "QUJD\n",
        " QUJD",
        "QU JD",
        "QUJD\t",
        "A",
        "QUJDR",
        "QUJ\u00e9",
        "QUJD\x00",
        "QU%4A",
    ],
    ids=[
        "padding-2",
        "padding-1",
        "plus-and-slash",
        "slash",
        "trailing-newline",
        "leading-space",
        "inner-space",
        "tab",
        "one-char",
        "5-chars",
        "non-ascii",
        "nul",
        "percent",
    ],
)
def test_b64url_decode_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


# -- compact JWS parsing (RFC 7515 §7.1, RFC 8725) ------------------------------------------

HEADER = encode_segment({"alg": "ES256", "typ": "at+jwt"})
PAYLOAD = encode_segment({"sub": "x"})
SIG = b64url_encode(b"\x01" * 64)


def seg(raw: bytes) -> str:
    return b64url_encode(raw)


def jws3(h: bytes | str = HEADER, p: bytes | str = PAYLOAD, s: str = SIG) -> str:
    """A three-part token; bytes are base64url-encoded, strings used as they are."""
    h = seg(h) if isinstance(h, bytes) else h
    p = seg(p) if isinstance(p, bytes) else p
    return f"{h}.{p}.{s}"


@pytest.mark.parametrize(
    "token",
    [
        f"{HEADER}.{PAYLOAD}",
        f"{HEADER}.{PAYLOAD}.{SIG}.{SIG}",
        f"{HEADER}.{PAYLOAD}.{SIG}.{SIG}.{SIG}",
        jws3(h=""),
        jws3(p=""),
        "..",
        "",
        jws3(s=SIG + "="),
        jws3(h=b"not json"),
        jws3(p=b"not json"),
        jws3(p=b"[1,2,3]"),
        jws3(p=b'"a string"'),
        jws3(h=b"[]"),
        jws3(h=b'{"alg":"ES256","alg":"none"}'),
        jws3(p=b'{"sub":"a","sub":"b"}'),
        jws3(h=b'{"alg":"ES256","crit":["exp"],"exp":1}'),
        jws3(h=b'{"alg":"ES256","crit":[]}'),
        jws3(p=b'{"exp":NaN}'),
        jws3(p=b'{"exp":Infinity}'),
        jws3(p=b'{"exp":-Infinity}'),
        jws3(h=b'{"typ":"JWT"}'),
        jws3(h=b'{"alg":256}'),
        jws3(h=b'{"alg":"ES256"}\xff'),
        jws3(p=b'{"a":' * 5000 + b"1" + b"}" * 5000),
        jws3(p=b'{"big":' + b"9" * 5000 + b"}"),
    ],
    ids=[
        "two-parts",
        "four-parts",
        "five-parts",
        "empty-header",
        "empty-payload",
        "all-empty",
        "empty-string",
        "padded-signature",
        "header-not-json",
        "payload-not-json",
        "payload-json-array",
        "payload-json-string",
        "header-json-array",
        "duplicate-header-member",
        "duplicate-claim",
        "crit",
        "crit-empty",
        "NaN",
        "Infinity",
        "minus-Infinity",
        "no-alg",
        "alg-not-a-string",
        "header-not-utf8",
        "deeply-nested",
        "huge-integer",
    ],
)
def test_parse_compact_refuses(token: str) -> None:
    with pytest.raises(JWSFormatError):
        parse_compact(token, max_bytes=1_000_000)


def test_parse_compact_refuses_oversize() -> None:
    token = f"{HEADER}.{PAYLOAD}.{SIG}"
    assert parse_compact(token, max_bytes=len(token)).payload == {"sub": "x"}
    with pytest.raises(JWSFormatError, match="longer"):
        parse_compact(token, max_bytes=len(token) - 1)


def test_parse_compact_lets_an_empty_signature_reach_the_alg_check() -> None:
    """An unsecured JWT (alg none, empty signature) parses so that it is refused as an
    algorithm, not as garbage."""
    jws = parse_compact(f"{encode_segment({'alg': 'none'})}.{PAYLOAD}.", max_bytes=4096)
    assert jws.header == {"alg": "none"} and jws.signature == b""


def test_parse_compact_result() -> None:
    jws = parse_compact(f"{HEADER}.{PAYLOAD}.{SIG}", max_bytes=4096)
    assert jws.header == {"alg": "ES256", "typ": "at+jwt"}
    assert jws.signing_input == f"{HEADER}.{PAYLOAD}".encode()
    assert jws.signature == b"\x01" * 64


# -- JWK import (RFC 7517) ------------------------------------------------------------------

EC_JWK = public_jwk_dict(ec_key(1))
RSA_JWK = public_jwk_dict(rsa_key("issuer"))
ED_JWK = public_jwk_dict(ed_key(1))


def _private_rsa_members_of(key: rsa.RSAPrivateKey) -> dict[str, str]:
    n = key.private_numbers()
    return {
        name: b64url_encode(i.to_bytes((i.bit_length() + 7) // 8, "big"))
        for name, i in (
            ("d", n.d),
            ("p", n.p),
            ("q", n.q),
            ("dp", n.dmp1),
            ("dq", n.dmq1),
            ("qi", n.iqmp),
        )
    }


def _private_rsa_members() -> dict[str, str]:
    return _private_rsa_members_of(rsa_key("issuer"))


@pytest.mark.parametrize(
    "jwk",
    [
        {**EC_JWK, "d": b64url_encode(b"\x01" * 32)},
        {**RSA_JWK, **_private_rsa_members()},
        {**RSA_JWK, "q": _private_rsa_members()["q"]},
        {**RSA_JWK, "qi": _private_rsa_members()["qi"]},
        {**ED_JWK, "d": b64url_encode(b"\x01" * 32)},
        {"kty": "oct", "k": b64url_encode(b"secret" * 6)},
        {"kty": "oct", "k": b64url_encode(b"secret" * 6), "alg": "HS256"},
        {**EC_JWK, "crv": "P-192"},
        {**EC_JWK, "crv": "P-384"},
        {**EC_JWK, "crv": "secp256k1"},
        {**EC_JWK, "y": EC_JWK["x"]},
        {**EC_JWK, "x": EC_JWK["x"][:-2]},
        {**EC_JWK, "x": 12345},
        {"kty": "EC", "crv": "P-256", "x": EC_JWK["x"]},
        {**ED_JWK, "crv": "X25519"},
        {**ED_JWK, "x": "AAAA"},
        {**EC_JWK, "use": "enc"},
        {**EC_JWK, "alg": "HS256"},
        {**EC_JWK, "alg": "none"},
        {**EC_JWK, "kid": 7},
        {**EC_JWK, "kty": "ec"},
        {k: v for k, v in EC_JWK.items() if k != "kty"},
    ],
    ids=[
        "ec-with-d",
        "rsa-private",
        "rsa-with-q-only",
        "rsa-with-qi-only",
        "okp-with-d",
        "oct",
        "oct-hs256",
        "bad-curve-P-192",
        "curve-size-mismatch",
        "secp256k1-not-on-curve",
        "point-not-on-curve",
        "short-coordinate",
        "coordinate-not-a-string",
        "missing-y",
        "x25519",
        "short-okp",
        "use-enc",
        "alg-hs256",
        "alg-none",
        "kid-not-a-string",
        "kty-lower-case",
        "no-kty",
    ],
)
def test_import_public_jwk_refuses(jwk: dict[str, Any]) -> None:
    with pytest.raises(JWKError):
        import_public_jwk(jwk)


def test_import_public_jwk_refuses_non_objects() -> None:
    with pytest.raises(JWKError):
        import_public_jwk([EC_JWK])  # type: ignore[arg-type]


def test_import_public_jwk_refuses_rsa_below_2048_bits() -> None:
    with pytest.raises(JWKError):
        import_public_jwk(public_jwk_dict(rsa_key("weak", 1024)))


def test_rsa_below_2048_bits_never_verifies() -> None:
    weak = rsa_key("weak", 1024)
    sig_input = b"a.b"
    from sidecar.jose.rfc7518_algorithms import _IMPLS

    signature = _IMPLS["RS256"].sign(sig_input, weak)
    assert not verify_signature("RS256", weak.public_key(), sig_input, signature)


@pytest.mark.parametrize(
    "jwk",
    [EC_JWK, RSA_JWK, ED_JWK, {**EC_JWK, "kid": "k1", "alg": "ES256", "use": "sig"}],
    ids=["ec", "rsa", "okp", "ec-with-metadata"],
)
def test_import_public_jwk_accepts(jwk: dict[str, Any]) -> None:
    key = import_public_jwk(jwk)
    assert key.thumbprint == jwk_thumbprint(jwk)
    assert key.kid == jwk.get("kid")


def test_import_jwks_skips_unusable_keys_and_is_bounded() -> None:
    doc = {"keys": [EC_JWK, {"kty": "oct", "k": "AAAA"}, {**EC_JWK, "use": "enc"}, RSA_JWK]}
    assert [k.kty for k in import_jwks(doc)] == ["EC", "RSA"]
    with pytest.raises(JWKError):
        import_jwks({"keys": [EC_JWK] * 65})
    with pytest.raises(JWKError):
        import_jwks({"keys": "nope"})


# -- htu normalization (RFC 9449 §4.3 step 9, RFC 3986 §6.2.2-§6.2.3) -----------------------


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTPS://Server.Example.COM/token", "https://server.example.com/token"),
        ("https://server.example.com:443/token", "https://server.example.com/token"),
        ("http://server.example.com:80/token", "http://server.example.com/token"),
        ("https://server.example.com:80/token", "https://server.example.com:80/token"),
        ("http://server.example.com:443/token", "http://server.example.com:443/token"),
        ("https://server.example.com:8443/token", "https://server.example.com:8443/token"),
        ("https://server.example.com", "https://server.example.com/"),
        ("https://server.example.com?x=1", "https://server.example.com/"),
        ("https://server.example.com/a?x=1#frag", "https://server.example.com/a"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://[2001:DB8::1]/x", "http://[2001:db8::1]/x"),
        ("http://127.0.0.1:80/x", "http://127.0.0.1/x"),
        ("https://ex.com/%7e%41%2d%5F%2E", "https://ex.com/~A-_."),
        ("https://ex.com/%2f%2a%c3%a9", "https://ex.com/%2F%2A%C3%A9"),
        ("https://ex.com/a%20b", "https://ex.com/a%20b"),
        ("https://ex.com/Path/CASE", "https://ex.com/Path/CASE"),
    ],
    ids=[
        "case",
        "https-443",
        "http-80",
        "https-80-kept",
        "http-443-kept",
        "other-port",
        "missing-path",
        "query-without-path",
        "query-and-fragment",
        "ipv6-default-port",
        "ipv6-port",
        "ipv6-case",
        "ipv4",
        "unreserved-decoded",
        "reserved-upper-cased",
        "space-kept-encoded",
        "path-case-kept",
    ],
)
def test_normalize_htu(url: str, normal: str) -> None:
    assert normalize_htu(url) == normal


@pytest.mark.parametrize(
    "url",
    [
        "ftp://ex.com/x",
        "ex.com/x",
        "/relative",
        "https:///path",
        "https://ex.com:99999/",
        "https://ex.com:port/",
        "http://[::1/x",
        "",
    ],
    ids=[
        "ftp",
        "no-scheme",
        "relative",
        "no-host",
        "port-out-of-range",
        "port-not-a-number",
        "broken-ipv6",
        "empty",
    ],
)
def test_normalize_htu_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_htu(url)


# -- algorithms and keys --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg", "fits"),
    [
        (ec_key(1).public_key(), "ES256", True),
        (ec_key(1, ec.SECP384R1()).public_key(), "ES256", False),
        (ec_key(1, ec.SECP384R1()).public_key(), "ES384", True),
        (ec_key(1).public_key(), "ES384", False),
        (ec_key(1).public_key(), "RS256", False),
        (ec_key(1).public_key(), "EdDSA", False),
        (rsa_key("issuer").public_key(), "RS256", True),
        (rsa_key("issuer").public_key(), "PS256", True),
        (rsa_key("issuer").public_key(), "ES256", False),
        (rsa_key("weak", 1024).public_key(), "RS256", False),
        (ed_key(1).public_key(), "EdDSA", True),
        (ed_key(1).public_key(), "ES256", False),
        (ec_key(1).public_key(), "HS256", False),
        (ec_key(1).public_key(), "none", False),
        (ec_key(1), "ES256", False),  # a private key object is not a public key
    ],
    ids=[
        "es256-p256",
        "es256-p384",
        "es384-p384",
        "es384-p256",
        "rs256-ec",
        "eddsa-ec",
        "rs256-rsa",
        "ps256-rsa",
        "es256-rsa",
        "rs256-rsa1024",
        "eddsa-ed25519",
        "es256-ed25519",
        "hs256",
        "none",
        "private-key",
    ],
)
def test_key_fits_algorithm(key: Any, alg: str, fits: bool) -> None:
    assert key_fits_algorithm(key, alg) is fits


def test_verify_signature_never_raises() -> None:
    key = ec_key(1).public_key()
    for sig in (b"", b"\x00", b"\x00" * 64, b"\xff" * 1000):
        assert verify_signature("ES256", key, b"a.b", sig) is False
    assert verify_signature("HS256", key, b"a.b", b"x") is False
    assert verify_signature("ES256", "not a key", b"a.b", b"x" * 64) is False


# -- access tokens per issuer algorithm -----------------------------------------------------


def _verify_token(token: str, *issuers: Any, now: float = NOW) -> Any:
    return verify_access_token(
        token,
        issuers={i.iss: i.policy for i in issuers},
        keys=key_store(*issuers),
        audiences=frozenset({AUDIENCE}),
        now=now,
        leeway=5.0,
        max_bytes=8192,
    )


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_verify_rsa_issuer_token(rsa_iss: Any, alg: str) -> None:
    verified = _verify_token(rsa_iss.token(alg=alg, jkt="A" * 43), rsa_iss)
    assert verified.alg == alg and verified.issuer == rsa_iss.iss and verified.jkt == "A" * 43


def test_verify_eddsa_issuer_token(ed_iss: Any) -> None:
    verified = _verify_token(ed_iss.token(), ed_iss)
    assert verified.alg == "EdDSA" and verified.jkt is None


def test_verify_es256_issuer_token_fields(es: Any) -> None:
    verified = _verify_token(es.token(jti="j-1"), es)
    assert verified.subject == "spiffe://demo.local/ns/shop/sa/frontend"
    assert verified.audiences == (AUDIENCE,)
    assert verified.expires_at == NOW + 300
    assert verified.kid == "es-1" and verified.jti == "j-1" and verified.client_id == "frontend"


def test_token_of_one_issuer_does_not_verify_with_another_issuers_key(
    es: Any, rsa_iss: Any, ed_iss: Any
) -> None:
    # An EdDSA token claiming the RSA issuer: that issuer does not allow EdDSA.
    forged = ed_iss.token(iss=rsa_iss.iss)
    with pytest.raises(AuthError) as info:
        _verify_token(forged, es, rsa_iss, ed_iss)
    assert info.value.reason is Reason.ALG_NOT_ALLOWED


def test_token_without_kid_tries_every_key_of_the_issuer(es: Any) -> None:
    claims = es.claims()
    token = sign_compact(es.private_key, "ES256", claims, header={"typ": "at+jwt"})
    assert _verify_token(token, es).kid is None


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": "1"}, Reason.MALFORMED_TOKEN),
        ({"exp": True}, Reason.MALFORMED_TOKEN),
        ({"exp": [1]}, Reason.MALFORMED_TOKEN),
        ({"exp": 1e300}, Reason.MALFORMED_TOKEN),
        ({"nbf": "0"}, Reason.MALFORMED_TOKEN),
        ({"iat": False}, Reason.MALFORMED_TOKEN),
        ({"aud": 5}, Reason.MALFORMED_TOKEN),
        ({"aud": []}, Reason.MALFORMED_TOKEN),
        ({"aud": [AUDIENCE, 5]}, Reason.MALFORMED_TOKEN),
        ({"aud": [f"a{i}" for i in range(33)] + [AUDIENCE]}, Reason.MALFORMED_TOKEN),
        ({"sub": ""}, Reason.MALFORMED_TOKEN),
        ({"sub": 5}, Reason.MALFORMED_TOKEN),
        ({"sub": "x" * 3000}, Reason.MALFORMED_TOKEN),
        ({"cnf": "jkt"}, Reason.MALFORMED_TOKEN),
        ({"cnf": {"jkt": 5}}, Reason.MALFORMED_TOKEN),
        ({"jti": 5}, Reason.MALFORMED_TOKEN),
        ({"client_id": {}}, Reason.MALFORMED_TOKEN),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v),
)
def test_claim_types(es: Any, claims: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(AuthError) as info:
        _verify_token(es.token(**claims), es)
    assert info.value.reason is reason


# -- jwcrypto as an independent peer --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ec_key(7), "ES256"),
        (ed_key(7), "EdDSA"),
        (rsa_key("client"), "RS256"),
        (rsa_key("client"), "PS256"),
    ],
    ids=["ES256", "EdDSA", "RS256", "PS256"],
)
def test_our_proof_verifies_with_jwcrypto(key: Any, alg: str) -> None:
    signer = ProofSigner(key, alg)
    token = "an-access-token"
    proof = signer.proof(
        method="POST", url="https://api.example.com/x?q=1", now=NOW, access_token=token, nonce="n-1"
    )
    header = json.loads(jc_jws.base64url_decode(proof.split(".")[0]))
    peer_key = jc_jwk.JWK(**header["jwk"])
    verifier = jc_jws.JWS()
    verifier.deserialize(proof)
    verifier.verify(peer_key, alg=alg)  # raises on a bad signature
    claims = json.loads(verifier.payload)
    assert header["typ"] == "dpop+jwt" and header["alg"] == alg
    assert claims["htm"] == "POST" and claims["htu"] == "https://api.example.com/x"
    assert claims["iat"] == int(NOW) and claims["nonce"] == "n-1"
    assert claims["ath"] == access_token_hash(token)
    assert len(jc_jws.base64url_decode(claims["jti"])) >= 16  # >= 128 random bits
    # RFC 7638 thumbprint, computed by both libraries.
    assert peer_key.thumbprint() == signer.thumbprint == jwk_thumbprint(header["jwk"])
    assert not peer_key.has_private


def test_jwcrypto_proof_verifies_with_us() -> None:
    key = jc_jwk.JWK.generate(kty="EC", crv="P-256")
    public = json.loads(key.export_public())
    claims = {
        "jti": "peer-jti-0001",
        "htm": "GET",
        "htu": "https://api.example.com/r",
        "iat": int(NOW),
    }
    token = jc_jwt.JWT(header={"typ": "dpop+jwt", "alg": "ES256", "jwk": public}, claims=claims)
    token.make_signed_token(key)
    verified = verify_proof(
        token.serialize(),
        method="GET",
        url="https://api.example.com/r?x",
        access_token=None,
        expected_jkt=key.thumbprint(),
        now=NOW,
        policy=DPoPPolicy(algorithms=frozenset({"ES256"})),
        key_cache=ProofKeyCache(),
    )
    assert verified.jkt == key.thumbprint()


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA"])
def test_our_access_tokens_verify_with_jwcrypto(
    es: Any, rsa_iss: Any, ed_iss: Any, alg: str
) -> None:
    issuer = {"ES256": es, "RS256": rsa_iss, "PS256": rsa_iss, "EdDSA": ed_iss}[alg]
    token = issuer.token(alg=alg)
    verifier = jc_jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jc_jwk.JWK(**issuer.jwk), alg=alg)
    assert json.loads(verifier.payload)["iss"] == issuer.iss


def test_jwcrypto_access_token_verifies_with_us() -> None:
    es = es_issuer()
    key = jc_jwk.JWK.from_pyca(es.private_key)
    token = jc_jwt.JWT(header={"alg": "ES256", "typ": "at+jwt", "kid": es.kid}, claims=es.claims())
    token.make_signed_token(key)
    assert _verify_token(token.serialize(), es).issuer == es.iss


def test_rsa_private_key_objects_are_rsa() -> None:
    assert isinstance(rsa_key("issuer"), rsa.RSAPrivateKey)


# -- the proof-key cache --------------------------------------------------------------------


def _proof_with_jwk(key: Any, alg: str, jwk: dict[str, Any], jti: str) -> str:
    claims = {"jti": jti, "htm": "GET", "htu": "https://api.example.com/r", "iat": int(NOW)}
    return sign_compact(key, alg, claims, header={"typ": "dpop+jwt", "jwk": jwk})


def _verify_with(cache: ProofKeyCache, proof: str) -> Any:
    return verify_proof(
        proof,
        method="GET",
        url="https://api.example.com/r",
        access_token=None,
        expected_jkt=None,
        now=NOW,
        policy=DPoPPolicy(algorithms=frozenset({"ES256", "RS256"}), max_bytes=8192),
        key_cache=cache,
    )


def test_proof_key_cache_reuses_imported_keys() -> None:
    cache = ProofKeyCache(capacity=2)
    key = ec_key(7)
    jwk = public_jwk_dict(key)
    for i in range(3):
        _verify_with(cache, _proof_with_jwk(key, "ES256", jwk, f"j{i}"))
    assert len(cache) == 1
    for seed in (8, 9, 10):
        other = ec_key(seed)
        _verify_with(cache, _proof_with_jwk(other, "ES256", public_jwk_dict(other), "j"))
    assert len(cache) == 2  # bounded


@pytest.mark.parametrize("member", ["d", "k"])
def test_private_member_refused_even_when_the_key_is_cached(member: str) -> None:
    cache = ProofKeyCache()
    key = ec_key(7)
    jwk = public_jwk_dict(key)
    _verify_with(cache, _proof_with_jwk(key, "ES256", jwk, "first"))
    leaked = {**jwk, member: b64url_encode(b"\x01" * 32)}
    with pytest.raises(AuthError) as info:
        _verify_with(cache, _proof_with_jwk(key, "ES256", leaked, "second"))
    assert info.value.reason is Reason.PROOF_INVALID


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi"])
def test_rsa_private_member_refused_even_when_the_key_is_cached(member: str) -> None:
    """RFC 9449 §4.3 step 7 holds on a cache hit too: a jwk with the same public members plus
    one private member (``q`` alone factors n) is a different header and is refused."""
    cache = ProofKeyCache()
    key = rsa_key("client")
    jwk = public_jwk_dict(key)
    _verify_with(cache, _proof_with_jwk(key, "RS256", jwk, "first"))
    leaked = {**jwk, member: _private_rsa_members_of(key)[member]}
    with pytest.raises(AuthError) as info:
        _verify_with(cache, _proof_with_jwk(key, "RS256", leaked, "second"))
    assert info.value.reason is Reason.PROOF_INVALID


def test_rsa_private_member_refused_on_first_sight() -> None:
    key = rsa_key("client")
    leaked = {**public_jwk_dict(key), "q": _private_rsa_members_of(key)["q"]}
    with pytest.raises(AuthError) as info:
        _verify_with(ProofKeyCache(), _proof_with_jwk(key, "RS256", leaked, "first"))
    assert info.value.reason is Reason.PROOF_INVALID


# -- typ (RFC 7515 §4.1.9): one normalization for access tokens and proofs ------------------


TYP_VARIANTS = [
    ("dpop+jwt", True),
    ("application/dpop+jwt", True),
    ("DPoP+JWT", True),
    ("Application/DPOP+JWT", True),
    ("application/jwt", False),
    ("text/dpop+jwt", False),
    ("dpop+jwt ", False),
    ("jwt", False),
]


@pytest.mark.parametrize(("typ", "accepted"), TYP_VARIANTS)
def test_proof_typ_is_normalized_like_the_token_typ(typ: str, accepted: bool) -> None:
    key = ec_key(31)
    jwk = public_jwk_dict(key)
    claims = {"jti": "typ-jti", "htm": "GET", "htu": "https://api.example.com/r", "iat": int(NOW)}
    proof = sign_compact(key, "ES256", claims, header={"typ": typ, "jwk": jwk})
    if accepted:
        assert _verify_with(ProofKeyCache(), proof).jti == "typ-jti"
    else:
        with pytest.raises(AuthError) as err:
            _verify_with(ProofKeyCache(), proof)
        assert err.value.reason is Reason.PROOF_INVALID and "typ" in err.value.detail


@pytest.mark.parametrize(
    ("typ", "accepted"),
    [
        (t.replace("dpop", "at").replace("DPoP", "AT").replace("DPOP", "AT"), ok)
        for t, ok in TYP_VARIANTS
    ],
)
def test_token_typ_follows_the_same_rule(es: Any, typ: str, accepted: bool) -> None:
    token = es.token(typ=typ)
    if accepted:
        assert _verify_token(token, es).issuer == es.iss
    else:
        with pytest.raises(AuthError) as err:
            _verify_token(token, es)
        assert err.value.reason is Reason.WRONG_TYPE
