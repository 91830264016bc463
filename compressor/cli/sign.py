"""`compress keygen`, `compress sign` and `compress verify`: Ed25519 signatures over an artifact's manifest.

manifest.json holds the SHA-256 of every file in the artifact, so signing its bytes signs the whole folder; devices
check it with `load(path, verify_key="build.pub")` (docs/artifact-trust.md). The `cryptography` package is imported
only when one of these commands runs.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from compressor.cli.show import consoles


def keygen(
    out: Annotated[str, typer.Option("--out", metavar="PREFIX", show_default=False,
                                     help="writes PREFIX.key (private, mode 0600) and PREFIX.pub (public)")],
) -> None:
    """make an Ed25519 key pair for signing artifacts: PREFIX.key stays on the build server, PREFIX.pub goes to
    devices (the same PEM files `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write)"""
    from compressor.artifact.sign import generate_keypair
    from compressor.runtime.signing import fingerprint

    key_path, pub_path = generate_keypair(out)
    consoles()[1].print(f"wrote {key_path} (private, mode 0600: keep it on the build server) and {pub_path} "
                        f"(public: give it to devices, load(path, verify_key='{pub_path}')); key {fingerprint(pub_path)}",
                        markup=False, highlight=False)


def sign(
    artifact: Annotated[str, typer.Argument(help="artifact folder", show_default=False)],
    key: Annotated[str, typer.Option("--key", metavar="PRIVATE_KEY_PEM", show_default=False,
                                     help="Ed25519 private key, PEM (compress keygen, or openssl genpkey -algorithm ed25519)")],
) -> None:
    """sign an artifact: write ARTIFACT/manifest.sig, an Ed25519 signature over manifest.json (whose SHA-256s cover
    every file); the artifact is verified first, so a damaged one is never signed"""
    from compressor.artifact.sign import private_key, sign_artifact
    from compressor.runtime.signing import fingerprint

    path = sign_artifact(artifact, key)
    consoles()[1].print(f"signed {artifact}: wrote {path} with key {fingerprint(private_key(key).public_key())}",
                        markup=False, highlight=False)


def verify(
    artifact: Annotated[str, typer.Argument(help="artifact folder", show_default=False)],
    key: Annotated[Optional[str], typer.Option("--key", metavar="PUBLIC_KEY_PEM", show_default=False,
                                               help="Ed25519 public key, PEM: the artifact must be signed with it")] = None,
) -> None:
    """check an artifact as load() does: its manifest, every file listed and matching its SHA-256, nothing leading
    out of the folder; with --key, its signature too (exit 2 and one line if anything is wrong)"""
    from compressor.runtime.artifact import read_manifest
    from compressor.runtime.signing import fingerprint, is_signed, public_key

    verify_key = public_key(key) if key is not None else None
    manifest = read_manifest(artifact, verify=True, verify_key=verify_key, complete=False)
    if verify_key is not None:
        signed = f"signature verified with key {fingerprint(verify_key)}"
    elif is_signed(artifact):
        signed = "signed, signature not checked (give --key PUBLIC_KEY_PEM)"
    else:
        signed = "unsigned"
    consoles()[1].print(f"ok: {artifact}: {len(manifest['files'])} files match their SHA-256; {signed}",
                        markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add keygen, sign and verify to the `compress` app."""
    app.command(short_help="make an Ed25519 key pair for signing artifacts (PREFIX.key, PREFIX.pub)")(keygen)
    app.command(short_help="sign an artifact with an Ed25519 private key (writes manifest.sig)")(sign)
    app.command(short_help="check an artifact's files, and with --key its signature, as load() does")(verify)
