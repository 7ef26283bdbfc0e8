"""The embedded issuer/STS: OIDC discovery, JWKS, an RFC 8693 token endpoint and a Unix-socket
attestation endpoint, both issuing DPoP-bound RFC 9068 access tokens.

Run with ``sidecar broker -c broker.yaml`` (see ``examples/broker.yaml``).
"""
