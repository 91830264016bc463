"""Signing on the build server: an Ed25519 key pair, and manifest.sig written over a verified artifact's manifest.

Devices only verify (compressor.runtime.signing); the private key and the signing step stay on the compiler's side.
"""

from __future__ import annotations

import os
from pathlib import Path

from compressor.runtime.artifact import MANIFEST, SIGNATURE, read_manifest, read_manifest_bytes
from compressor.runtime.errors import FeedTypeError, RuntimeArtifactError, RuntimeUsageError
from compressor.runtime.signing import _crypto, _read_key_file


def private_key(path):
    """The Ed25519 private key in an unencrypted PEM file (`openssl genpkey -algorithm ed25519`, `compress keygen`)."""
    serialization, Ed25519PrivateKey, _, _ = _crypto()
    if not isinstance(path, (str, os.PathLike)):
        raise FeedTypeError(f"the private key must be a PEM file path, got {type(path).__name__}")
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise RuntimeUsageError(f"'{path}' is an encrypted key; give an unencrypted PEM key (openssl pkey -in "
                                f"{path} -out plain.key) kept where only the build server can read it") from None
    except ValueError as e:
        raise RuntimeUsageError(f"'{path}' is not a PEM private key ({str(e).splitlines()[0] if str(e) else 'unreadable'}); "
                                "make one with: openssl genpkey -algorithm ed25519 -out build.key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RuntimeUsageError(f"'{path}' is not an Ed25519 key; artifact signatures are Ed25519 "
                                "(openssl genpkey -algorithm ed25519, or compress keygen)")
    return key


def sign_artifact(folder, private_key_path) -> Path:
    """Write folder/manifest.sig: the Ed25519 signature over manifest.json's bytes. The artifact is verified first
    (schema, every file listed and matching its hash), so only a sound artifact is ever signed. Returns the path."""
    key = private_key(private_key_path)
    folder = Path(folder)
    raw = read_manifest_bytes(folder)
    read_manifest(folder, verify=True)  # a damaged or tampered artifact is refused, never signed
    if read_manifest_bytes(folder) != raw:
        raise RuntimeArtifactError(f"{folder / MANIFEST} changed while it was being checked; sign again")
    path = folder / SIGNATURE
    tmp = folder / f".{SIGNATURE}.tmp-{os.getpid()}"
    tmp.write_bytes(key.sign(raw))
    os.replace(tmp, path)
    return path


def generate_keypair(prefix) -> tuple[Path, Path]:
    """PREFIX.key (unencrypted PKCS#8 PEM, mode 0600) and PREFIX.pub (SubjectPublicKeyInfo PEM): the files
    `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write. Existing files are never replaced."""
    serialization, Ed25519PrivateKey, _, _ = _crypto()
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise RuntimeUsageError(f"'{p}' already exists; choose another --out prefix (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)  # whatever the umask
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return key_path, pub_path
