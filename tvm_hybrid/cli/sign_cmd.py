"""`tvm-hybrid keygen`, `sign` and `verify`: artifact signatures for release pipelines and fleets."""

from __future__ import annotations

import click

from .output import emit_json


@click.command("keygen")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Private key file to write (PEM, mode 0600); the public key goes to OUTPUT.pub.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def keygen_command(output: str, force: bool, as_json: bool) -> None:
    """Create an Ed25519 signing key pair: KEY (keep it secret) and KEY.pub (ship it to devices).

    \b
    tvm-hybrid keygen -o release.key
    """
    from ..signing import generate_key

    priv, pub, kid = generate_key(output, overwrite=force)
    if as_json:
        emit_json({"private_key": str(priv), "public_key": str(pub), "key_id": kid})
        return
    click.echo(f"private key  {priv}  (keep it secret)")
    click.echo(f"public key   {pub}  (give it to `run --verify-key` or $TVM_HYBRID_VERIFY_KEY)")
    click.echo(f"key id       {kid}")


@click.command("sign")
@click.argument("artifact", type=click.Path())
@click.option("--key", "-k", required=True, type=click.Path(dir_okay=False),
              help="PEM private key (Ed25519 or ECDSA), e.g. from `tvm-hybrid keygen`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def sign_command(artifact: str, key: str, as_json: bool) -> None:
    """Check an artifact directory's files, then sign its manifest (writes ARTIFACT/manifest.sig).

    \b
    tvm-hybrid sign dist/x86-64-avx2 --key release.key
    tvm-hybrid run dist/x86-64-avx2 --verify-key release.key.pub --input x=image.npy
    """
    from ..manifest import SIGNATURE
    from ..signing import sign_artifact

    doc = sign_artifact(artifact, key)
    if as_json:
        emit_json({"artifact": artifact, "signature": f"{artifact.rstrip('/')}/{SIGNATURE}", **doc})
        return
    click.echo(f"{artifact.rstrip('/')}/{SIGNATURE}  {doc['algorithm']}, key {doc['key_id'][:16]}…")


@click.command("verify")
@click.argument("artifact", type=click.Path())
@click.option("--key", "-k", "verify_key", type=click.Path(dir_okay=False), envvar="TVM_HYBRID_VERIFY_KEY",
              show_envvar=True, help="PEM public key the artifact must be signed by.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def verify_command(artifact: str, verify_key: str | None, as_json: bool) -> None:
    """Check an artifact without running it: manifest, versions, every file's sha256, and the signature.

    \b
    tvm-hybrid verify dist/x86-64-avx2 --key release.key.pub
    """
    from ..runtime.artifact import open_artifact

    art = open_artifact(artifact, verify_key, use_env=False)
    try:
        doc = {
            "artifact": artifact,
            "files": len(art.manifest.files),
            "bytes": sum(f.size for f in art.manifest.files),
            "signed_by": art.signed_by,
        }
    finally:
        art.close()
    if as_json:
        emit_json(doc)
        return
    signed = f", signed by key {doc['signed_by'][:16]}…" if doc["signed_by"] else " (signature not checked: no --key)"
    click.echo(f"{artifact}  ok: {doc['files']} file(s), {doc['bytes']} bytes verified{signed}")


commands = (keygen_command, sign_command, verify_command)
