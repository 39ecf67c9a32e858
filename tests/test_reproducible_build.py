"""The enclave image's file tree is reproducible, checked without Docker (issue 14, decision 0021).

`eif/rootfs.py build` runs the Dockerfile's build stage from its own lines (the `pip install`
line and the `COPY` lines) with this interpreter: the locked wheels into `lib/`, the TCB files,
then the normalizer the image runs. Two builds from different checkouts (different file times,
modes, umask) of the same pinned inputs must give byte-identical trees and one digest; a change
to any input must change the digest. The Dockerfile, the lock file and `cloister/tcb.py` are
checked against each other and against what the built tree actually holds and imports.

The wheels come from PyPI (or `CLOISTER_WHEELHOUSE`), hash-checked by pip against the lock; the
tests skip, saying so, only when neither is reachable.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloister.tcb import ENCLAVE_CONFIG, TCB_DISTRIBUTIONS, TCB_PATHS

ROOT = Path(__file__).resolve().parents[1]
ROOTFS = ROOT / "eif" / "rootfs.py"
LOCK = ROOT / "eif" / "requirements-enclave.txt"
EPOCH = 1_700_000_000
# What the build stage copies besides the TCB: the lock (as requirements.txt) and the config.
EXTRA_COPIES = {"eif/requirements-enclave.txt": "requirements.txt", ENCLAVE_CONFIG: "enclave.toml"}


def lock_pins() -> dict[str, list[str]]:
    """name (normalized) -> its sha256 hashes, parsed from the lock file."""
    pins: dict[str, list[str]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)\s*\\?$", line)
        if m:
            current = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            pins[current] = []
            continue
        h = re.match(r"^\s+--hash=sha256:([0-9a-f]{64})\s*\\?$", line)
        assert h and current, f"unexpected line in the lock file: {line!r}"
        pins[current].append(h.group(1))
    return pins


def rootfs(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOTFS), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locked wheels for this platform, downloaded once; pip checks each hash."""
    given = os.environ.get("CLOISTER_WHEELHOUSE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheelhouse")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--require-hashes",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(out),
            "-r",
            str(LOCK),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        pytest.skip(f"the locked wheels could not be downloaded (no PyPI, no CLOISTER_WHEELHOUSE): {r.stderr[-300:]}")
    return out


def checkout(dst: Path, *, mode: int, mtime: int) -> Path:
    """A copy of what the build reads, as another clone would have it: other times and modes."""
    dockerfile = (ROOT / "Dockerfile.enclave").read_text()
    sources = re.findall(r"^COPY (\S+) \S+$", dockerfile, re.M)
    for rel in ["Dockerfile.enclave", "eif/rootfs.py", *sources]:
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, out)
        out.chmod(mode)
        os.utime(out, (mtime, mtime))
    return dst


def build(repo: Path, out: Path, wheelhouse: Path, epoch: int = EPOCH) -> str:
    r = rootfs(
        "build", str(out), "--repo", str(repo), "--wheelhouse", str(wheelhouse), "--source-date-epoch", str(epoch)
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_two_builds_from_different_checkouts_are_byte_identical(tmp_path: Path, wheelhouse: Path) -> None:
    a_repo = checkout(tmp_path / "clone-a", mode=0o644, mtime=1_600_000_000)
    b_repo = checkout(tmp_path / "clone-b", mode=0o600, mtime=1_800_000_000)
    old_umask = os.umask(0o077)  # the second builder has a stricter umask
    try:
        digest_b = build(b_repo, tmp_path / "b", wheelhouse)
    finally:
        os.umask(old_umask)
    digest_a = build(a_repo, tmp_path / "a", wheelhouse)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest_a)
    assert digest_a == digest_b
    # Byte-identical, checked independently of the digest: same names, same contents, same metadata.
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    pending = [cmp]
    while pending:
        d = pending.pop()
        assert not (d.left_only or d.right_only or d.funny_files), (d.left, d.left_only, d.right_only)
        _, mismatch, errors = filecmp.cmpfiles(d.left, d.right, d.common_files, shallow=False)
        assert not mismatch and not errors, (d.left, mismatch, errors)
        pending.extend(d.subdirs.values())
    for path in (tmp_path / "a").rglob("*"):
        other = tmp_path / "b" / path.relative_to(tmp_path / "a")
        sa, sb = path.lstat(), other.lstat()
        assert (sa.st_mode, sa.st_uid, sa.st_gid, int(sa.st_mtime)) == (
            sb.st_mode,
            sb.st_uid,
            sb.st_gid,
            int(sb.st_mtime),
        )
        assert int(sa.st_mtime) == EPOCH, path
    assert not list((tmp_path / "a").rglob("*.pyc")) and not list((tmp_path / "a").rglob("__pycache__"))
    # And `digest` recomputes the same value from the tree alone.
    assert rootfs("digest", str(tmp_path / "a")).stdout.strip() == digest_a


def test_any_changed_input_changes_the_digest(tmp_path: Path, wheelhouse: Path) -> None:
    base = build(checkout(tmp_path / "clone", mode=0o644, mtime=1), tmp_path / "base", wheelhouse)
    # Another SOURCE_DATE_EPOCH (a different release commit's time).
    assert build(tmp_path / "clone", tmp_path / "epoch", wheelhouse, epoch=EPOCH + 1) != base
    # One byte of TCB code.
    policy = tmp_path / "clone" / "cloister" / "enclave" / "policy.py"
    policy.write_text(policy.read_text() + "\n")
    assert build(tmp_path / "clone", tmp_path / "code", wheelhouse) != base


def test_the_tree_holds_the_tcb_and_the_lock_and_nothing_else(tmp_path: Path, wheelhouse: Path) -> None:
    tree = tmp_path / "tree"
    build(ROOT, tree, wheelhouse)
    top = {p.name for p in tree.iterdir()}
    assert top == {"cloister", "lib", *EXTRA_COPIES.values()}, top
    code = {p.relative_to(tree).as_posix() for p in (tree / "cloister").rglob("*") if p.is_file()}
    assert code == set(TCB_PATHS), code ^ set(TCB_PATHS)
    for src, dst in EXTRA_COPIES.items():
        assert (tree / dst).read_bytes() == (ROOT / src).read_bytes()
    # lib/ holds exactly the locked distributions, at the locked versions.
    installed = {
        re.sub(r"[-_.]+", "-", d.name.split("-")[0]).lower(): d.name.removesuffix(".dist-info").split("-")[1]
        for d in (tree / "lib").glob("*.dist-info")
    }
    pins = lock_pins()
    assert set(installed) == set(pins), set(installed) ^ set(pins)
    versions = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", LOCK.read_text(), re.M))
    for name, version in versions.items():
        assert installed[re.sub(r"[-_.]+", "-", name).lower()] == version


def test_the_enclave_runs_from_the_tree_alone(tmp_path: Path, wheelhouse: Path) -> None:
    # The lock is sufficient: the enclave's entry point and every module of its package import
    # with sys.path = the image's PYTHONPATH (lib, then the code) and the standard library only.
    tree = tmp_path / "tree"
    build(ROOT, tree, wheelhouse)
    stdlib = [p for p in sys.path if p and "site-packages" not in p and not p.startswith(str(ROOT))]
    probe = f"""
import sys, importlib, pkgutil
sys.path = [{str(tree / "lib")!r}, {str(tree)!r}, *{stdlib!r}]
import cloister.enclave
for m in pkgutil.walk_packages(cloister.enclave.__path__, "cloister.enclave."):
    importlib.import_module(m.name)
importlib.import_module("cloister.enclave.__main__")
outside = sorted({{m.__file__ for m in list(sys.modules.values())
                  if getattr(m, "__file__", None) and "site-packages" in m.__file__}})
print("\\n".join(outside))
"""
    out = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported from outside the image: {out.stdout}"


def test_lock_pins_every_image_dependency_with_hashes() -> None:
    pins = lock_pins()
    assert {d.lower() for d in TCB_DISTRIBUTIONS} <= set(pins), set(TCB_DISTRIBUTIONS) - set(pins)
    for name, hashes in pins.items():
        # One wheel per architecture the image is built for (x86_64, aarch64), or one pure wheel.
        assert 1 <= len(hashes) <= 2 and len(set(hashes)) == len(hashes), (name, hashes)


def test_dockerfile_recipe_is_pinned_and_offline_but_for_hashed_wheels() -> None:
    dockerfile = (ROOT / "Dockerfile.enclave").read_text()
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert froms == ["${BASE_IMAGE}@${BASE_DIGEST}"] * 2, froms
    assert re.search(r"^ARG BASE_DIGEST$", dockerfile, re.M), "BASE_DIGEST must be a required build argument"
    # Network: the one pip line (hash-locked); no apt, curl, wget, ADD of URLs, unhashed pip.
    for forbidden in ("apt-get", "apk ", "curl", "wget", "\nADD ", "git clone"):
        assert forbidden not in dockerfile, forbidden
    runs = re.findall(r"^RUN (.*)$", dockerfile, re.M)
    assert [r for r in runs if "pip" in r] == [runs[0]] and "--require-hashes" in runs[0]
    # The final stage holds only the normalized tree: one COPY --from, no RUN.
    final = dockerfile[[m.start() for m in re.finditer(r"^FROM ", dockerfile, re.M)][1] :]
    assert re.findall(r"^(RUN|COPY|ADD)\b.*$", final, re.M) == ["COPY"]
    assert "COPY --from=build /opt/cloister /opt/cloister" in final
    assert "PYTHONPATH=/opt/cloister/lib:/opt/cloister" in final


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace(" --require-hashes", ""), "must pass --require-hashes"),
        (lambda t: t.replace(" --no-compile", ""), "must pass --no-compile"),
        (lambda t: t.replace("RUN python -m pip install", "RUN pip install"), "one 'RUN python -m pip install"),
        (lambda t: t.replace("\nFROM ${BASE_IMAGE}@${BASE_DIGEST}\n", "\n"), "must have two stages"),
    ],
)
def test_rootfs_refuses_a_recipe_it_cannot_reproduce(tmp_path: Path, edit: object, message: str) -> None:
    repo = checkout(tmp_path / "clone", mode=0o644, mtime=1)
    dockerfile = repo / "Dockerfile.enclave"
    assert callable(edit)
    dockerfile.write_text(edit(dockerfile.read_text()))
    r = rootfs("build", str(tmp_path / "out"), "--repo", str(repo), "--source-date-epoch", "1")
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_swapped_wheel_is_refused(tmp_path: Path, wheelhouse: Path) -> None:
    # A hostile index or mirror serves a different file under a locked name and version: pip's
    # hash check refuses it, and no tree (so no image) is produced from it.
    hostile = tmp_path / "hostile"
    shutil.copytree(wheelhouse, hostile)
    wheel = next(hostile.glob("typing_extensions-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[-100] ^= 0x01  # one bit in the zip's central directory
    wheel.write_bytes(bytes(data))
    r = rootfs("build", str(tmp_path / "out"), "--wheelhouse", str(hostile), "--source-date-epoch", str(EPOCH))
    assert r.returncode == 2, r.stderr
    assert "DO NOT MATCH THE HASHES" in r.stderr and "typing_extensions" in r.stderr.replace("-", "_"), r.stderr
    assert not (tmp_path / "out" / "lib" / "typing_extensions.py").exists()
