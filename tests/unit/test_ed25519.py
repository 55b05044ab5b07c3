import os

import pytest

from bundler.contract import ed25519

ed = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")


def test_rfc8032_test_vector_1():
    pub = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
                        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert ed25519.verify(pub, b"", sig)
    assert not ed25519.verify(pub, b"x", sig)


def test_agrees_with_cryptography_on_random_keys_messages_and_tampering():
    for i in range(40):
        key = ed.Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes_raw()
        msg = os.urandom(i * 7)
        sig = key.sign(msg)
        assert ed25519.verify(pub, msg, sig)
        bad = bytearray(sig)
        bad[i % 64] ^= 1 << (i % 8)
        assert not ed25519.verify(pub, msg, bytes(bad))
        assert not ed25519.verify(pub, msg + b"!", sig)
        other = ed.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not ed25519.verify(other, msg, sig)


def test_the_non_canonical_encodings_rfc_8032_rejects_are_rejected():
    """RFC 8032 5.1.3: x = 0 with the sign bit set is invalid; y = p - 1 gives x = 0 (it was let
    through because x^2 was compared with 0 before being reduced mod p), so does y = 1."""
    P = ed25519.P
    for y in (P - 1, 1):
        assert ed25519._decompress((y | 1 << 255).to_bytes(32, "little")) is None
        assert ed25519._decompress(y.to_bytes(32, "little")) is not None  # the canonical x = 0 point
    for y in (P, P + 1):  # y not reduced
        assert ed25519._decompress(y.to_bytes(32, "little")) is None
    bad_key = ((P - 1) | 1 << 255).to_bytes(32, "little")
    assert ed25519.verify(bad_key, b"m", bytes(64)) is False
