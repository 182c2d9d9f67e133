"""Run artifacts built for another CPU architecture (aarch64) on this machine under qemu-user.

An aarch64 artifact is checked on an x86 build machine by running the real runtime code path —
``python -m tvm_hybrid run`` — with an aarch64 Python, numpy and TVM runtime under
``qemu-aarch64-static``. The aarch64 userland is a *sysroot*: Debian's arm64 python3.11 packages
unpacked with ``dpkg -x`` and the project's pinned wheels installed for ``manylinux_2_28_aarch64``.
``tvm-hybrid emulate setup`` (cli/emulate_cmd.py) creates it (cached outside the repository);
outputs come back as .npy files, so the caller compares them on x86. Timings under emulation mean
nothing. Whether an artifact's code runs natively here at all is ``hostcpu.check_native``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import RuntimeFailure, UsageError, one_line
from .hostcpu import EMULATED_ARCHES, emulatable, target_arch

log = logging.getLogger(__name__)

MARKER = "tvm-hybrid-sysroot.json"
#: Debian release whose python3.11 the sysroot takes (the wheels are cp311).
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR_ENV = "TVM_HYBRID_DEBIAN_MIRROR"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Python distributions the emulated runtime needs, at the versions this machine has.
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "click")
#: Debian packages of a minimal Python 3.11 (the optional modules' libraries — readline,
#: sqlite, ncurses, dbm — are left out) plus the C++ runtime TVM's libraries link against.
DEBS = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8",
    "libbz2-1.0", "liblzma5", "libuuid1", "libssl3", "libcrypt1",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Arch:
    """A CPU architecture this machine can emulate: how Debian, pip and qemu name it."""

    name: str  # as in target triples and platform.machine(): "aarch64"
    debian: str  # Debian's architecture name: "arm64"
    wheel_platform: str  # pip --platform tag
    emulator: str  # the qemu-user binary, when the profile names none
    emulator_install: str


ARCHES: dict[str, Arch] = {
    "aarch64": Arch(
        name="aarch64",
        debian="arm64",
        wheel_platform="manylinux_2_28_aarch64",
        emulator="qemu-aarch64-static",
        emulator_install="apt-get install -y qemu-user-static",
    ),
}
assert set(ARCHES) == set(EMULATED_ARCHES), "hostcpu.EMULATED_ARCHES names the architectures emulated here"

# --- the sysroot -------------------------------------------------------------------------------


def sysroot_env(arch: str) -> str:
    """The environment variable that overrides the sysroot directory for ``arch``."""
    return f"TVM_HYBRID_{arch.upper()}_SYSROOT"


def sysroot_dir(arch: str = "aarch64") -> Path:
    """Where the emulation sysroot for ``arch`` lives: $TVM_HYBRID_<ARCH>_SYSROOT, else the user cache."""
    env = os.environ.get(sysroot_env(arch))
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tvm-hybrid" / f"{arch}-sysroot"


def setup_command(arch: str = "aarch64") -> str:
    return "tvm-hybrid emulate setup" + ("" if arch == "aarch64" else f" --arch {arch}")


def wanted_wheels() -> dict[str, str]:
    """The wheels the sysroot holds: the versions installed on this machine (TVM must match exactly)."""
    from importlib import metadata

    out = {}
    for dist in WHEELS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError as e:
            raise UsageError(f"{dist} is not installed here; install tvm-hybrid's dependencies first") from e
    return out


@dataclasses.dataclass(frozen=True)
class Sysroot:
    """A ready emulation sysroot: the Debian userland and the wheels' directory."""

    arch: Arch
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / "python3.11"

    @property
    def site(self) -> Path:
        return self.root / "site-packages"

    def info(self) -> dict[str, Any]:
        return json.loads((self.root / MARKER).read_text())


def find_sysroot(arch: str = "aarch64") -> Sysroot:
    """The ready sysroot for ``arch``; RuntimeFailure, saying how to create it, when there is none."""
    spec = _arch(arch)
    root = sysroot_dir(arch)
    marker = root / MARKER
    if not marker.is_file():
        raise RuntimeFailure(
            f"no {arch} emulation sysroot at {root}; create it with `{setup_command(arch)}` "
            f"(about a minute; Debian/Ubuntu, needs apt-get and pip), or point {sysroot_env(arch)} at one"
        )
    sr = Sysroot(spec, root)
    try:
        have = sr.info().get("wheels", {})
    except (OSError, ValueError) as e:
        raise RuntimeFailure(f"emulation sysroot {root} is damaged ({e}); recreate it with `{setup_command(arch)} --force`") from e
    want = wanted_wheels()
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        if have.get(dist) != want[dist]:
            raise RuntimeFailure(
                f"emulation sysroot {root} has {dist} {have.get(dist) or '?'}, this machine has {want[dist]}; "
                f"recreate it with `{setup_command(arch)} --force`"
            )
    return sr


def create_sysroot(arch: str = "aarch64", dest: Path | None = None, force: bool = False) -> Sysroot:
    """Build the emulation sysroot for ``arch`` (Debian packages + wheels) and return it.

    Written into a temporary sibling and renamed into place, so an interrupted setup leaves
    nothing that looks ready. Needs apt-get and dpkg (Debian/Ubuntu) and network access to a
    Debian mirror ($TVM_HYBRID_DEBIAN_MIRROR) and to the Python package index.
    """
    spec = _arch(arch)
    dest = Path(dest) if dest is not None else sysroot_dir(arch)
    if (dest / MARKER).is_file() and not force:
        sr = Sysroot(spec, dest)
        if sr.info().get("wheels") == wanted_wheels():
            log.info("%s sysroot at %s is ready", arch, dest)
            return sr
        log.info("%s sysroot at %s is out of date; recreating it", arch, dest)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UsageError(
                f"creating the {arch} sysroot needs {tool} (Debian/Ubuntu); on another system, build one "
                f"there and point {sysroot_env(arch)} at it"
            )
    if not Path(DEBIAN_KEYRING).is_file():
        raise UsageError(f"{DEBIAN_KEYRING} is missing; install it: apt-get install -y debian-archive-keyring")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    t0 = time.perf_counter()
    try:
        debs = _fetch_debs(spec, stage / "apt")
        root = stage / "root"
        root.mkdir()
        versions = {}
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
            name, version = deb.name.split("_")[:2]
            versions[name] = version.replace("%3a", ":")
        wheels = wanted_wheels()
        _install_wheels(spec, root / "site-packages", wheels)
        info = {
            "arch": arch,
            "debian": {"suite": DEBIAN_SUITE, "packages": versions},
            "wheels": wheels,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (root / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        sr = Sysroot(spec, root)
        _smoke_test(sr)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(root, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("%s sysroot ready at %s (%.0f s)", arch, dest, time.perf_counter() - t0)
    return Sysroot(spec, dest)


def _fetch_debs(spec: Arch, apt_dir: Path) -> list[Path]:
    """Download the Debian packages with apt-get, using a private configuration and index.

    The host's apt configuration is left alone (no ``dpkg --add-architecture``): apt reads a
    sources list, state and cache of its own, and verifies the Debian archive's signatures.
    """
    mirror = os.environ.get(DEBIAN_MIRROR_ENV, "http://deb.debian.org/debian").rstrip("/")
    etc, state, cache, out = (apt_dir / d for d in ("etc", "state", "cache", "debs"))
    for d in (etc / "apt.conf.d", etc / "preferences.d", etc / "sources.list.d", etc / "trusted.gpg.d",
              state / "lists" / "partial", cache / "archives" / "partial", out):  # fmt: skip
        d.mkdir(parents=True, exist_ok=True)
    opts = f"[arch={spec.debian} signed-by={DEBIAN_KEYRING}]"
    (etc / "sources.list").write_text(
        f"deb {opts} {mirror} {DEBIAN_SUITE} main\n"
        f"deb {opts} {mirror} {DEBIAN_SUITE}-updates main\n"
    )
    (state / "status").write_text("")
    apt = [
        "apt-get", "-q",
        "-o", f"Dir::Etc={etc}", "-o", f"Dir::State={state}", "-o", f"Dir::State::status={state / 'status'}",
        "-o", f"Dir::Cache={cache}", "-o", f"APT::Architecture={spec.debian}",
        "-o", f"APT::Architectures={spec.debian}", "-o", "Debug::NoLocking=1",
    ]  # fmt: skip
    if os.geteuid() == 0:
        # apt drops to the _apt user for downloads, which cannot write into a private directory.
        apt += ["-o", "APT::Sandbox::User=root"]
    log.info("fetching the %s package index from %s", spec.debian, mirror)
    _run([*apt, "update"], f"apt-get update for {spec.debian} from {mirror}")
    log.info("downloading %d %s packages", len(DEBS), spec.debian)
    _run([*apt, "download", *DEBS], f"apt-get download of {spec.debian} packages", cwd=out)
    debs = sorted(out.glob("*.deb"))
    if len(debs) != len(DEBS):
        raise RuntimeFailure(f"apt-get downloaded {len(debs)} of {len(DEBS)} {spec.debian} packages into {out}")
    return debs


def _install_wheels(spec: Arch, site: Path, wheels: dict[str, str]) -> None:
    log.info("installing %s wheels: %s", spec.wheel_platform, ", ".join(f"{k}=={v}" for k, v in wheels.items()))
    _run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-warn-script-location",
            "--target", str(site), "--platform", spec.wheel_platform, "--only-binary=:all:",
            "--python-version", "3.11", "--implementation", "cp",
            *(f"{k}=={v}" for k, v in wheels.items()),
        ],
        f"pip install of the {spec.wheel_platform} wheels",
    )  # fmt: skip


def _smoke_test(sr: Sysroot) -> None:
    """The emulated Python starts and loads numpy and the TVM runtime."""
    probe = "import platform, numpy, tvm; print(platform.machine(), numpy.__version__, tvm.__version__)"
    proc = subprocess.run(
        emulator_argv(sr, _emulator_for(sr.arch, {})) + ["-c", probe],
        env=_child_env(sr, None), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        why = one_line(proc.stderr, last=True, empty="no output")
        raise RuntimeFailure(f"the new {sr.arch.name} sysroot does not start: {why}")
    log.info("emulated python: %s", proc.stdout.strip())


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        why = one_line(proc.stderr or proc.stdout, last=True, empty="no output")
        raise RuntimeFailure(f"{what} failed (exit {proc.returncode}): {why}")


def _arch(arch: str) -> Arch:
    if arch not in ARCHES:
        raise UsageError(f"no emulation for {arch}; this version emulates {', '.join(ARCHES)}")
    return ARCHES[arch]


# --- running under emulation -------------------------------------------------------------------


def _emulator_for(spec: Arch, target: dict[str, Any]) -> str:
    """The qemu-user binary: the profile's ``[toolchain] emulator``, else the architecture's default."""
    tc = target.get("toolchain") or {}
    name = tc.get("emulator") or spec.emulator
    if shutil.which(name) is None:
        install = tc.get("emulator_install") or spec.emulator_install
        raise RuntimeFailure(f"the emulator {name} is not on PATH; install it: {install}")
    return name


def emulator_argv(sr: Sysroot, emulator: str) -> list[str]:
    """The command line that starts the sysroot's Python under qemu-user."""
    # -L makes qemu load the aarch64 dynamic loader and libraries from the sysroot.
    return [emulator, "-L", str(sr.root), str(sr.python)]


def _child_env(sr: Sysroot, pkg_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "VIRTUAL_ENV", "QEMU_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(sr.site)] + ([str(pkg_dir)] if pkg_dir else []))
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # The device loads TVM's runtime library only, as an edge app does.
    env["TVM_USE_RUNTIME_LIB"] = "1"
    return env


def artifact_target(artifact: str | Path) -> dict[str, Any]:
    """The resolved target profile an artifact (directory or .tar) records, read from its manifest alone."""
    import tarfile

    from .errors import ArtifactError
    from .manifest import MANIFEST, read

    path = Path(artifact)
    if path.is_dir():
        return read(path).target
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist; compile one with `tvm-hybrid compile MODEL -o DIR`")
    try:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.isfile() and Path(m.name).name == MANIFEST:
                    return json.loads(tf.extractfile(m).read())["target"]
    except (tarfile.TarError, OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path} is not a readable artifact tar: {e}") from e
    raise ArtifactError(f"{path} holds no {MANIFEST}")


@dataclasses.dataclass
class EmulatedRun:
    """What an emulated `tvm-hybrid run` did: its exit code, its stdout when captured, and how it ran."""

    returncode: int
    stdout: str | None
    arch: str
    emulator: str
    sysroot: Path

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "emulator": self.emulator, "sysroot": str(self.sysroot), "timings_meaningful": False}


def run_emulated(
    artifact: str | Path, run_args: Sequence[str], capture: bool = False, verbose: bool = False
) -> EmulatedRun:
    """Run ``tvm-hybrid run ARTIFACT *run_args`` under emulation for the artifact's architecture.

    The child is this package's own CLI on the emulated Python, so the artifact goes through the
    same runtime code (manifest, checksums, Session) as on the device. stderr passes through;
    stdout is captured when ``capture``. Raises RuntimeFailure when emulation is not set up.
    """
    target = artifact_target(artifact)
    arch = target_arch(target)
    spec = _arch(arch)
    if not emulatable(target):
        kind = (target.get("tvm_target") or {}).get("kind")
        raise UsageError(f"--emulate runs CPU artifacts only; {target.get('name', '?')} is a {kind} target: run it on its device")
    emulator = _emulator_for(spec, target)
    sr = find_sysroot(arch)
    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-emu-") as tmp:
        # Only this package goes on the emulated Python's path, not the host's site-packages.
        pkg_dir = Path(tmp)
        (pkg_dir / "tvm_hybrid").symlink_to(Path(__file__).resolve().parent, target_is_directory=True)
        cmd = emulator_argv(sr, emulator) + ["-m", "tvm_hybrid", *(["--verbose"] if verbose else [])]
        cmd += ["run", str(artifact), *run_args]
        log.info("running under %s with the %s sysroot %s", emulator, arch, sr.root)
        log.debug("emulated command: %s", " ".join(cmd))
        proc = subprocess.run(cmd, env=_child_env(sr, pkg_dir), stdout=subprocess.PIPE if capture else None, text=True)
    return EmulatedRun(proc.returncode, proc.stdout, arch, emulator, sr.root)
