"""Optional artifact signing: an Ed25519 signature over the exact bytes of manifest.json, stored as manifest.sig.

manifest.json lists the SHA-256 of every file in the artifact (and the loader refuses any file it does not list), so
one signature over its bytes covers the whole folder. manifest.sig holds the raw 64-byte signature, which is what
`openssl pkeyutl -sign -rawin` writes, so either tool can sign and verify:

    openssl genpkey -algorithm ed25519 -out build.key          # or: compress keygen --out build
    openssl pkey -in build.key -pubout -out build.pub
    compress sign out/minilm --key build.key                    # or: openssl pkeyutl -sign -rawin -inkey build.key \\
                                                                #       -in out/minilm/manifest.json -out out/minilm/manifest.sig
    load("out/minilm", verify_key="build.pub")                  # refuses unsigned or wrongly signed artifacts

Keys are PEM files as openssl writes them (PKCS#8 private keys, SubjectPublicKeyInfo public keys, unencrypted).
The `cryptography` package is imported only when signing is used (pip install cryptography).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .files import MANIFEST, SIGNATURE, _inside, read_manifest_bytes
from .errors import FeedTypeError, RuntimeArtifactError, RuntimeUsageError

SIGNATURE_BYTES = 64


def _crypto():
    """(serialization, Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature), or one line naming the install."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    except ImportError:
        raise RuntimeUsageError("artifact signatures need the cryptography package: pip install cryptography "
                                "(or pip install 'compressor[sign]')") from None
    return serialization, Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature


def _read_key_file(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RuntimeUsageError(f"cannot read the {what} '{path}': {e.strerror or e}") from None


def public_key(key):
    """An Ed25519 public key from: a PEM file path (str or pathlib.Path, as `openssl pkey -pubout` writes it), PEM
    bytes, the raw 32 key bytes, or a cryptography Ed25519PublicKey."""
    serialization, _, Ed25519PublicKey, _ = _crypto()
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        data, source = _read_key_file(key, "public key"), f"'{key}'"
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data, source = bytes(key), "the verify_key bytes"
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
    else:
        raise FeedTypeError(f"verify_key must be a public key PEM file path, PEM bytes or the raw 32 key bytes, "
                            f"got {type(key).__name__}")
    if b"PRIVATE KEY" in data:
        raise RuntimeUsageError(f"{source} holds a private key; give the public key (openssl pkey -in KEY -pubout, "
                                "or the .pub file compress keygen wrote): devices never need the private key")
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise RuntimeUsageError(f"{source} is not a PEM public key ({str(e).splitlines()[0] if str(e) else 'unreadable'}); "
                                "give the .pub file of an Ed25519 key pair") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise RuntimeUsageError(f"{source} is not an Ed25519 public key; artifact signatures are Ed25519 "
                                "(openssl genpkey -algorithm ed25519, or compress keygen)")
    return loaded


def fingerprint(key) -> str:
    """'ed25519:' and the first 16 hex digits of the SHA-256 of the raw public key: a short name for a key."""
    serialization = _crypto()[0]
    raw = public_key(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def is_signed(folder) -> bool:
    """Whether the artifact carries a manifest.sig (not whether it verifies: that needs the public key)."""
    return os.path.lexists(Path(folder) / SIGNATURE)


def _read_signature(folder: Path) -> bytes:
    path = folder / SIGNATURE
    if not os.path.lexists(path):
        raise RuntimeArtifactError(f"artifact {folder} is not signed (no {SIGNATURE}) but a verify_key was given; "
                                   f"sign it on the build server: compress sign {folder} --key KEY")
    if not _inside(os.path.realpath(folder), os.path.realpath(path)) or not path.is_file():
        raise RuntimeArtifactError(f"{path} is not a regular file in the artifact folder; sign the artifact again")
    data = path.read_bytes()
    if len(data) != SIGNATURE_BYTES:
        raise RuntimeArtifactError(f"{path} holds {len(data)} bytes, not a {SIGNATURE_BYTES}-byte Ed25519 signature; "
                                   "sign the artifact again")
    return data


def verify_signature(folder, key, manifest_bytes: bytes | None = None) -> str:
    """Check manifest.sig against the exact bytes of manifest.json (`manifest_bytes` if the caller already holds the
    bytes it will parse); returns the key's fingerprint. An unsigned artifact, or one whose signature does not verify
    with `key`, is one RuntimeArtifactError line."""
    _, _, _, InvalidSignature = _crypto()
    folder = Path(folder)
    key = public_key(key)
    raw = read_manifest_bytes(folder) if manifest_bytes is None else manifest_bytes
    signature = _read_signature(folder)
    try:
        key.verify(signature, raw)
    except InvalidSignature:
        raise RuntimeArtifactError(f"the signature of artifact {folder} does not verify with key {fingerprint(key)}: "
                                   f"{MANIFEST} was changed after signing, or another key signed it; do not use it") from None
    return fingerprint(key)


