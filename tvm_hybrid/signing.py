"""Artifact signing: a detached Ed25519 (or ECDSA) signature over manifest.json's exact bytes.

The manifest pins the sha256 and size of every file the artifact holds, and the runtime refuses
unlisted files, so signing the manifest signs the artifact. The signature lives beside it as
``manifest.sig`` (never listed in the manifest it signs):

    {"schema": "tvm-hybrid/signature@1", "algorithm": "ed25519", "key_id": "<sha256 of the public key>",
     "manifest_sha256": "<sha256 of manifest.json>", "signature": "<base64>"}

The signed message is ``b"tvm-hybrid/signature@1\\n" + manifest bytes``, so these signatures can
sign nothing else. The verification algorithm follows the *public key's* type, never the file's
``algorithm`` field. Runtime-safe: standard library only at import; ``cryptography`` is imported
when a key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import manifest as mf
from .errors import ArtifactError, UsageError, one_line

SIG_SCHEMA = "tvm-hybrid/signature@1"
ENV_KEY = "TVM_HYBRID_VERIFY_KEY"
_CONTEXT = SIG_SCHEMA.encode() + b"\n"
_MAX_SIG_BYTES = 64 << 10
_MAX_KEY_BYTES = 1 << 20
_PUB_BEGIN = b"-----BEGIN PUBLIC KEY-----"


def key_from_env() -> str | None:
    """The fleet-wide public key file from ``$TVM_HYBRID_VERIFY_KEY``, or None when unset."""
    return os.environ.get(ENV_KEY) or None


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    except ImportError as e:
        raise UsageError(
            f"signing and verifying artifacts needs the cryptography package ({e}); pip install cryptography"
        ) from e
    return InvalidSignature, hashes, serialization, ec, ed25519


def _read_key_file(key, what: str) -> tuple[bytes, str]:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key), "the given key"
    path = Path(key)
    try:
        if path.stat().st_size > _MAX_KEY_BYTES:
            raise UsageError(f"{what} {path} is over {_MAX_KEY_BYTES >> 10} KiB; it is not a PEM key")
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from e


def load_public_keys(key) -> list[Any]:
    """Public keys from a PEM file (or PEM bytes); a file may hold several (key rotation).

    Raises UsageError (exit 2) when the file is not PEM public keys of a supported type.
    """
    _, _, serialization, ec, ed25519 = _crypto()
    data, where = _read_key_file(key, "verify key")
    if b"PRIVATE KEY" in data:
        raise UsageError(
            f"{where} is a private key; verify with the public key (`tvm-hybrid keygen` writes it as KEY.pub)"
        )
    blocks = [_PUB_BEGIN + b for b in data.split(_PUB_BEGIN)[1:]]
    if not blocks:
        raise UsageError(f"{where} holds no PEM public key (-----BEGIN PUBLIC KEY-----); give the signer's KEY.pub")
    keys = []
    for block in blocks:
        try:
            k = serialization.load_pem_public_key(block)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where} is not a readable PEM public key: {one_line(e)}") from e
        if not isinstance(k, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey)):
            raise UsageError(f"{where}: {type(k).__name__} keys are not supported; use Ed25519 or ECDSA keys")
        keys.append(k)
    return keys


def load_private_key(key) -> Any:
    """An Ed25519 or ECDSA private key from an unencrypted PEM file; UsageError otherwise."""
    _, _, serialization, ec, ed25519 = _crypto()
    data, where = _read_key_file(key, "signing key")
    try:
        k = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted
        raise UsageError(
            f"{where} is encrypted; tvm-hybrid signs with unencrypted PEM keys kept in a secret store: {one_line(e)}"
        ) from e
    except ValueError as e:
        raise UsageError(
            f"{where} is not a readable PEM private key ({one_line(e)}); create one with `tvm-hybrid keygen -o KEY`"
        ) from e
    if not isinstance(k, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise UsageError(f"{where}: {type(k).__name__} keys are not supported; use Ed25519 or ECDSA keys")
    return k


def key_id(public_key) -> str:
    """sha256 of the public key's DER SubjectPublicKeyInfo, hex: names a key in messages and files."""
    _, _, serialization, _, _ = _crypto()
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _hash_for(curve) -> Any:
    _, hashes, _, _, _ = _crypto()
    return {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}.get(curve.key_size, hashes.SHA256)()


def _algorithm(key) -> str:
    _, _, _, ec, ed25519 = _crypto()
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    return f"ecdsa-{key.curve.name}"


def sign_bytes(manifest_bytes: bytes, private_key) -> dict[str, Any]:
    """The signature document for these manifest bytes."""
    _, _, _, ec, ed25519 = _crypto()
    msg = _CONTEXT + manifest_bytes
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        sig = private_key.sign(msg)
    else:
        sig = private_key.sign(msg, ec.ECDSA(_hash_for(private_key.curve)))
    return {
        "schema": SIG_SCHEMA,
        "algorithm": _algorithm(private_key),
        "key_id": key_id(private_key.public_key()),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(sig).decode("ascii"),
    }


def sign_artifact(artifact_dir: str | Path, private_key_path) -> dict[str, Any]:
    """Check an artifact directory's integrity, then write its ``manifest.sig``; returns the document.

    Signing a damaged artifact would vouch for it, so the manifest is validated and every file
    checked against it first, as the runtime checks them (whether this TVM can load it is the
    runtime's question, not the signer's).
    """
    root = Path(artifact_dir)
    if not root.is_dir():
        raise UsageError(
            f"{root} is not an artifact directory; sign the directory `tvm-hybrid compile` wrote, then pack it"
        )
    key = load_private_key(private_key_path)
    data = mf.read_bytes(root)
    mf.verify_files(root, mf.loads(data, str(root / mf.MANIFEST)))
    doc = sign_bytes(data, key)
    tmp = root / f".{mf.SIGNATURE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, root / mf.SIGNATURE)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {root / mf.SIGNATURE}: {e.strerror or e}") from e
    return doc


def verify_artifact_signature(root: Path, manifest_bytes: bytes, public_key) -> str:
    """Check ``root/manifest.sig`` against these manifest bytes; returns the signer's key id.

    Raises ArtifactError (exit 4) when the signature is missing, malformed, by another key, or
    does not match; UsageError (exit 2) when the key file itself is unusable.
    """
    keys = load_public_keys(public_key)
    InvalidSignature, _, _, ec, ed25519 = _crypto()
    doc = _read_signature(Path(root))
    ids = {key_id(k): k for k in keys}
    key = ids.get(doc["key_id"])
    if key is None:
        raise ArtifactError(
            f"artifact is signed by key {doc['key_id'][:16]}…, not by the trusted key "
            f"{', '.join(i[:16] + '…' for i in ids)}; get an artifact signed by your release key"
        )
    if doc["manifest_sha256"] != hashlib.sha256(manifest_bytes).hexdigest():
        raise ArtifactError("artifact signature does not match its manifest: the manifest changed after signing")
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
    except ValueError as e:
        raise ArtifactError(f"artifact signature is not valid base64: {one_line(e)}") from e
    msg = _CONTEXT + manifest_bytes
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, msg)
        else:
            key.verify(sig, msg, ec.ECDSA(_hash_for(key.curve)))
    except InvalidSignature:
        raise ArtifactError(
            "artifact signature is invalid for its manifest: the artifact was modified or the signature forged; "
            "do not run it"
        ) from None
    return doc["key_id"]


def _read_signature(root: Path) -> dict[str, Any]:
    import stat

    path = root / mf.SIGNATURE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(
            f"artifact {root} is not signed (no {mf.SIGNATURE}) and a verify key is required; "
            "sign it with `tvm-hybrid sign ARTIFACT --key KEY`"
        ) from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SIG_BYTES:
        raise ArtifactError(f"{path} is not a signature file (not a plain file, or too big)")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{path} is not a valid signature file: {one_line(e)}") from e
    if not isinstance(doc, dict) or doc.get("schema") != SIG_SCHEMA:
        raise ArtifactError(f"{path} is not a {SIG_SCHEMA} signature; re-sign with this tvm-hybrid")
    for k in ("key_id", "manifest_sha256", "signature"):
        if not isinstance(doc.get(k), str):
            raise ArtifactError(f"{path}: missing or malformed {k!r}")
    return doc


def generate_key(path: str | Path, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (PEM, mode 0600) and ``PATH.pub``; returns both and the key id."""
    _, _, serialization, _, ed25519 = _crypto()
    priv_path = Path(path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise UsageError(f"{p} exists; pick another name, or pass --force to replace it")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        if priv_path.parent:
            priv_path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(priv_path, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv)
        os.chmod(priv_path, 0o600)
        pub_path.write_bytes(pub)
    except OSError as e:
        raise UsageError(f"cannot write the key to {priv_path}: {e.strerror or e}") from e
    return priv_path, pub_path, key_id(key.public_key())
