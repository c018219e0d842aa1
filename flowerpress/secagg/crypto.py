"""Key agreement, key derivation, authenticated encryption and the mask PRG of SecAgg+.

All primitives come from the ``cryptography`` package:

* key agreement: X25519 (RFC 7748); every device draws two fresh key pairs per
  round, one to encrypt Shamir shares, one to derive pairwise masks;
* key derivation: HKDF-SHA256 (RFC 5869) with a label and the round in ``info``,
  so encryption keys, mask seeds and rounds never share key material;
* authenticated encryption: AES-256-GCM with a random 96-bit nonce; the
  associated data binds a ciphertext to its round, sender and receiver, so a
  share replayed from another round or re-addressed by the server fails to
  decrypt;
* PRG: the ChaCha20 keystream under the 32-byte seed, read as little-endian
  ``uint64`` words and reduced modulo ``2**bits`` (a power of two divides
  ``2**64``, so the words stay exactly uniform).

Flower's ``flwr.common.secure_aggregation`` is *not* used for the PRG or the
encryption: its ``pseudo_rand_gen`` folds the seed into 32 bits for NumPy's
``RandomState`` (a 2**32 search recovers any mask) and draws from
``[0, num_range - 1)`` (not uniform modulo the range); its ``encrypt`` is Fernet
(sound, but without associated data and with base64 overhead). See
docs/privacy.md, "Secure aggregation".
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from numpy.typing import NDArray

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_LABEL = b"flowerpress/secagg/v1/"


class DecryptionError(ValueError):
    """A ciphertext failed authentication (tampered, re-addressed, replayed or malformed)."""


def generate_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes) from the OS CSPRNG."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                     NoEncryption())


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of ``private``."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_private(private: bytes) -> X25519PrivateKey:
    """The key object of raw private bytes (load once, agree with many peers)."""
    return X25519PrivateKey.from_private_bytes(private)


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, *, label: bytes,
          round_id: int, pair: tuple[int, int]) -> bytes:
    """A 32-byte key both ends of ``pair`` derive: HKDF(X25519(private, peer_public)).

    ``pair`` is ordered (smaller node id first) so both ends derive the same key.

    Raises
    ------
    ValueError
        ``peer_public`` is not a valid X25519 public key (or a low-order point).
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"public key has {len(peer_public)} bytes, expected {KEY_BYTES}")
    key = private if isinstance(private, X25519PrivateKey) else load_private(private)
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted(pair)
    info = _LABEL + label + struct.pack("<QQQ", round_id, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """``nonce || AES-256-GCM(key, plaintext, associated)`` with a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    """The plaintext of :func:`encrypt`; DecryptionError if anything does not authenticate."""
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(f"ciphertext of {len(ciphertext)} bytes is too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                   associated)
    except InvalidTag:
        raise DecryptionError("ciphertext failed authentication") from None


def commitment(secret: bytes, *, round_id: int, node: int) -> bytes:
    """SHA-256 commitment to a 32-byte uniformly random secret (hiding: the secret is random)."""
    return hashlib.sha256(_LABEL + b"commit" + struct.pack("<QQ", round_id, node)
                          + secret).digest()


def derive_private(root: bytes, *, label: bytes, round_id: int, me: int, peer: int) -> bytes:
    """The X25519 private key ``me`` uses with ``peer`` only, derived from a 32-byte root.

    Per-pair keys let a device reveal the key of one pair (to prove a complaint,
    or to remove the mask it shares with a dropped peer) without revealing any
    other pair's (HKDF is one-way; the root itself is never revealed, only
    Shamir-shared).
    """
    if len(root) != KEY_BYTES:
        raise ValueError(f"root has {len(root)} bytes, expected {KEY_BYTES}")
    info = _LABEL + b"pair-" + label + struct.pack("<QQQ", round_id, me, peer)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(root)


def share_commitment(kind: bytes, share: bytes, *, round_id: int, dealer: int,
                     holder: int) -> bytes:
    """SHA-256 commitment to one Shamir share (hiding: a share is uniform in a 521-bit field)."""
    return hashlib.sha256(_LABEL + b"share-" + kind + struct.pack("<QQQ", round_id, dealer,
                                                                  holder) + share).digest()


def prg(seed: bytes, length: int, bits: int, *, stream: int = 0) -> NDArray[np.uint64]:
    """``length`` words uniform modulo ``2**bits``: the ChaCha20 keystream under ``seed``.

    ``stream`` separates keystreams of one seed (self mask vs. pairwise masks).
    """
    if len(seed) != KEY_BYTES:
        raise ValueError(f"PRG seed has {len(seed)} bytes, expected {KEY_BYTES}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits={bits} must be in [1, 64]")
    nonce = struct.pack("<QQ", 0, stream)  # 64-bit block counter, then the stream id
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    raw = encryptor.update(bytes(8 * length))
    words = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words
