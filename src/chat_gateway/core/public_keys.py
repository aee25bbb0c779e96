"""Public keys that verify user tokens: parsing ``AUTH_PUBLIC_KEY`` and pinning each
key's algorithms to its type (RSA: RS256/384/512, EC P-256: ES256, EC P-384: ES384,
Ed25519: EdDSA), so a token's header never chooses them.

Both the settings (checking the key at start) and the authenticator use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

# The algorithms a public key of each type verifies (pinned: never taken from a token).
RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",)}
ASYMMETRIC_ALGORITHMS = frozenset({*RSA_ALGORITHMS, "ES256", "ES384", "EdDSA"})


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verification key with the algorithms its type allows."""

    key: Any
    algorithms: tuple[str, ...]
    kid: str | None = None


def pinned_algorithms(key: Any) -> tuple[str, ...]:
    """The algorithms a public key verifies, from its type alone (empty: not usable)."""
    if isinstance(key, RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, EllipticCurvePublicKey):
        return EC_ALGORITHMS.get(key.curve.name, ())
    if isinstance(key, Ed25519PublicKey):
        return ("EdDSA",)
    return ()


def load_public_key(text: str) -> PublicKey:
    """``AUTH_PUBLIC_KEY``: a PEM public key or certificate, or the bare base64 body of
    a public key (as Keycloak's realm settings show it). ``\\n`` escapes count as
    line breaks, for environments that take one line. Raises ``ValueError``."""
    text = text.strip().replace("\\n", "\n")
    if "-----BEGIN" not in text:
        body = "".join(text.split())
        text = (
            "-----BEGIN PUBLIC KEY-----\n"
            + "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
            + "\n-----END PUBLIC KEY-----\n"
        )
    data = text.encode()
    try:
        if "-----BEGIN CERTIFICATE-----" in text:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key or certificate ({exc})") from None
    algorithms = pinned_algorithms(key)
    if not algorithms:
        raise ValueError(
            f"a {type(key).__name__} cannot verify tokens; use an RSA, "
            "EC P-256/P-384 or Ed25519 key"
        )
    return PublicKey(key, algorithms)
