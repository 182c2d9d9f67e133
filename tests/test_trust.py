"""Artifact trust: strict manifests, exact file sets, tar caps, signatures (sign, verify, refuse)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from conftest import cli

from tvm_hybrid import manifest as mf
from tvm_hybrid.errors import ArtifactError, UsageError
from tvm_hybrid.runtime import Session
from tvm_hybrid.runtime.artifact import open_artifact, safe_extract
from tvm_hybrid.signing import ENV_KEY, generate_key, sign_artifact


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory, zoo_files):
    """The zoo MLP compiled once (a 0.1 MiB library: cheap to copy and tamper with)."""
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    z, path = zoo_files("mlp")
    out = tmp_path_factory.mktemp("mlp")
    [s] = compile_model(
        CompileOptions(model=path, targets=("x86-64-avx2",), output=out,
                       inputs=tuple(InputOverride(k, v) for k, v in z.input_shapes.items()))
    )  # fmt: skip
    return z, s.path


@pytest.fixture
def art(mlp_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(mlp_artifact[1], dst)
    return dst


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_key(d / "release.key")
    generate_key(d / "other.key")
    return d


@pytest.fixture(autouse=True)
def _no_fleet_key(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)


def _edit_manifest(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(mf.dumps(m))


# -- manifest and file set ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["files"].append(dict(m["files"][0])), "listed twice"),
        (lambda m: m["files"][0].update(path="segments/./0.so"), "normalized"),
        (lambda m: m["files"][0].update(path="manifest.sig"), "cannot be checksummed"),
        (lambda m: m["files"][0].update(sha256="ABC"), "malformed sha256"),
        (lambda m: m["files"][0].pop("size"), "needs a size"),
        (lambda m: m["files"][0].update(size=m["files"][0]["size"] + 1), "the manifest says"),
        (lambda m: m["inputs"][0].update(dtype="float33"), "dtype 'float33'"),
        (lambda m: m["outputs"].append(dict(m["outputs"][0])), "listed twice"),
        (lambda m: m["segments"][0]["inputs"][0].update(name="nope"), "reads 'nope'"),
        (lambda m: m["outputs"][0].update(name="nope"), "no segment produces"),
        (lambda m: m["segments"].append(dict(m["segments"][0])), "used twice"),
        (lambda m: m["target"].update(tvm_target="llvm"), "tvm_target"),
        (lambda m: m["versions"].update(tvm=27), "must be strings"),
        (lambda m: m["inputs"][0].update(shape=None), "has no shape"),  # was exit 1 (fuzz)
        (lambda m: m.update(schema="tvm-hybrid/artifact@2"), r"tvm-hybrid/artifact@1"),
        (lambda m: m["versions"].update(tvm="0.26.0"), r"loads TVM 0\.27\.x artifacts"),
    ],
)
def test_inconsistent_manifests_are_refused(art, edit, match):
    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=match):
        open_artifact(art)


def test_unlisted_files_links_and_pipes_are_refused(art, tmp_path):
    (art / "segments" / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(ArtifactError, match="'segments/evil.so', which its manifest does not list"):
        open_artifact(art)
    (art / "segments" / "evil.so").unlink()
    # A linked directory: the .so behind it may be byte-identical, it is still refused.
    shutil.move(art / "segments", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", art / "segments")
    with pytest.raises(ArtifactError, match="symbolic link"):
        open_artifact(art)
    os.unlink(art / "segments")
    shutil.move(tmp_path / "elsewhere", art / "segments")
    manifest = (art / "manifest.json").read_bytes()
    (art / "manifest.json").unlink()
    os.mkfifo(art / "manifest.json")  # reading it would block forever
    with pytest.raises(ArtifactError, match="not a regular file"):
        open_artifact(art)
    (art / "manifest.json").unlink()
    (art / "manifest.json").write_bytes(manifest)
    open_artifact(art).close()


def test_oversized_and_deeply_nested_manifests_are_refused(art):
    with open(art / "manifest.json", "wb") as f:
        f.truncate(mf.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ArtifactError, match="over the 32 MiB"):
        open_artifact(art)
    (art / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ArtifactError, match="nested too deeply|must be a JSON object"):
        open_artifact(art)


def test_tar_bombs_are_refused_before_unpacking(art, tmp_path, monkeypatch):
    huge = tmp_path / "huge.tar"
    with tarfile.open(huge, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(art / "manifest.json", arcname="manifest.json")
        info = tarfile.TarInfo("segments/0.so")
        info.size = 1 << 40  # the header claims a terabyte; nothing follows
        tf.addfile(info)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArtifactError, match="refusing to unpack"):
        safe_extract(huge, dest)
    assert list(dest.iterdir()) == [], "members were written before the cap was checked"
    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w") as tf:
        tf.add(art, arcname="art")
        info = tarfile.TarInfo("art/segments/0.so")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ArtifactError, match="appears twice"):
        open_artifact(dup)
    # The cap is an environment setting for artifacts bigger than the default.
    ok = tmp_path / "ok.tar"
    with tarfile.open(ok, "w") as tf:
        tf.add(art, arcname="art")
    monkeypatch.setenv("TVM_HYBRID_MAX_ARTIFACT_BYTES", "1000")
    with pytest.raises(ArtifactError, match="1000 bytes"):
        open_artifact(ok)
    monkeypatch.delenv("TVM_HYBRID_MAX_ARTIFACT_BYTES")
    open_artifact(ok).close()


# -- signing --------------------------------------------------------------------------------------


def test_signed_artifact_runs_and_matches_onnxruntime(mlp_artifact, art, keys):
    from conftest import assert_close, reference

    z, _ = mlp_artifact
    doc = sign_artifact(art, keys / "release.key")
    assert doc["algorithm"] == "ed25519" and (art / "manifest.sig").is_file()
    # The signature is not listed in the manifest it signs, and the artifact still verifies.
    assert all(f["path"] != "manifest.sig" for f in json.loads((art / "manifest.json").read_text())["files"])
    with Session(art, verify_key=keys / "release.key.pub") as s:
        got = s.run(z.feeds)
        assert s._art.signed_by == doc["key_id"]
    assert_close(got, reference(z.model, z.feeds), z.rtol, z.atol)
    # PEM bytes work as well as a path, and so does a key ring holding the key.
    ring = (keys / "other.key.pub").read_bytes() + (keys / "release.key.pub").read_bytes()
    Session(art, verify_key=ring).close()


def test_unsigned_wrong_key_and_tampered_artifacts_are_refused(art, keys):
    pub = keys / "release.key.pub"
    with pytest.raises(ArtifactError, match="not signed"):
        Session(art, verify_key=pub)
    sign_artifact(art, keys / "other.key")
    with pytest.raises(ArtifactError, match="not by the trusted key"):
        Session(art, verify_key=pub)
    sign_artifact(art, keys / "release.key")
    # Re-checksummed tampering: a consistent manifest that differs from the signed one.
    _edit_manifest(art, lambda m: m["model"].update(name="tampered"))
    with pytest.raises(ArtifactError, match="manifest changed after signing"):
        Session(art, verify_key=pub)
    sign_artifact(art, keys / "release.key")
    sig = json.loads((art / "manifest.sig").read_text())
    forged = bytearray(__import__("base64").b64decode(sig["signature"]))
    forged[0] ^= 1
    sig["signature"] = __import__("base64").b64encode(bytes(forged)).decode()
    (art / "manifest.sig").write_text(json.dumps(sig))
    with pytest.raises(ArtifactError, match="signature is invalid"):
        Session(art, verify_key=pub)
    with pytest.raises(UsageError, match="is a private key"):
        Session(art, verify_key=keys / "release.key")
    with pytest.raises(UsageError, match="does not exist"):
        Session(art, verify_key=keys / "missing.pub")


def test_ecdsa_keys_sign_and_verify(art, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert sign_artifact(art, tmp_path / "ec.pem")["algorithm"] == "ecdsa-secp256r1"
    open_artifact(art, pub).close()


def test_signing_refuses_a_damaged_artifact(art, keys):
    lib = art / "segments" / "0.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 3] ^= 0x01
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        sign_artifact(art, keys / "release.key")
    assert not (art / "manifest.sig").exists()


def test_cli_keygen_sign_verify_run_and_fleet_env(mlp_artifact, art, keys, tmp_path):
    z, _ = mlp_artifact
    np.save(tmp_path / "x.npy", z.feeds["x"])
    r = cli("keygen", "-o", str(tmp_path / "k" / "rel.key"), "--json", check=True)
    made = json.loads(r.stdout)
    assert oct(os.stat(made["private_key"]).st_mode & 0o777) == "0o600"
    assert cli("keygen", "-o", str(tmp_path / "k" / "rel.key")).returncode == 2  # no silent overwrite
    cli("sign", str(art), "--key", made["private_key"], check=True)
    r = cli("verify", str(art), "--key", made["public_key"], "--json", check=True)
    assert json.loads(r.stdout)["signed_by"] == made["key_id"]
    r = cli("run", str(art), "--verify-key", made["public_key"], "--input", f"x={tmp_path / 'x.npy'}", "--json")
    assert r.returncode == 0, r.stderr
    # Fleet policy: the environment names the trusted key; another key's artifact is refused.
    env = {**os.environ, ENV_KEY: str(keys / "release.key.pub")}
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tvm_hybrid", "run", str(art), "--input", f"x={tmp_path / 'x.npy'}"],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 4 and r.stderr.startswith("Error: artifact is signed by key"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("sign", str(art), "--key", str(tmp_path / "nope.key"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_null_tvm_target_runs_on_the_cpu(mlp_artifact, art):
    """Found by scripts/fuzz.py: `"tvm_target": null` was an internal error (exit 1)."""
    z, _ = mlp_artifact
    _edit_manifest(art, lambda m: m["target"].update(tvm_target=None))
    with Session(art) as s:
        assert s.run(z.feeds)
