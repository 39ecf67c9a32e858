"""The enclave image's own file tree (/opt/cloister), built and measured without Docker.

Dockerfile.enclave's build stage installs the locked wheels and copies the TCB into /opt/cloister,
then runs `rootfs.py normalize` (fixed times, modes and ownership; no bytecode) and
`rootfs.py digest`; the final stage copies that one tree onto the pinned base image. This script
does the same steps from the same Dockerfile lines on any Linux with the same Python, so two
builds can be compared here, byte for byte, and a third party can check a tree without Docker:

    python eif/rootfs.py build OUT [--wheelhouse DIR] [--source-date-epoch N]   # prints the digest
    python eif/rootfs.py normalize TREE --source-date-epoch N
    python eif/rootfs.py digest TREE            # sha256 over the manifest below
    python eif/rootfs.py manifest TREE          # one line per entry: type mode uid:gid mtime size sha256 path

`build` reads the `RUN python -m pip install ...` line and the `COPY` lines of the Dockerfile's
build stage, so this script and the image cannot follow different recipes. The digest covers
what a root filesystem holds (paths, types, modes, owners, times, contents, link targets); the
image's PCR0 also covers the base image, the kernel and the image's command and environment,
which only nitro-cli on the build host measures (eif/build.sh).

Standard library only: it runs inside the base image, before any dependency is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

IMAGE_ROOT = "/opt/cloister"
PIP_PREFIX = "RUN python -m pip install "
NORMALIZE_PREFIX = "RUN python /build/rootfs.py normalize "
# The Dockerfile's build stage ends at the second FROM.
_FROM = re.compile(r"^FROM\s", re.M)
_COPY = re.compile(r"^COPY (\S+) (\S+)$", re.M)


class RecipeError(Exception):
    """Dockerfile.enclave does not have the shape this script (and the reproducibility check) relies on."""


def build_stage(dockerfile: str) -> str:
    starts = [m.start() for m in _FROM.finditer(dockerfile)]
    if len(starts) != 2:
        raise RecipeError(f"Dockerfile.enclave must have two stages (build, image); it has {len(starts)} FROM lines")
    return dockerfile[starts[0] : starts[1]]


def pip_arguments(dockerfile: str) -> list[str]:
    """The build stage's `pip install` arguments, exactly as the image runs them."""
    lines = [line for line in build_stage(dockerfile).splitlines() if line.startswith(PIP_PREFIX)]
    if len(lines) != 1:
        raise RecipeError(f"the build stage must have one '{PIP_PREFIX.strip()} ...' line; it has {len(lines)}")
    args = shlex.split(lines[0].removeprefix(PIP_PREFIX))
    for required in ("--require-hashes", "--no-deps", "--only-binary=:all:", "--no-compile", "--isolated"):
        if required not in args:
            raise RecipeError(f"the image's pip install must pass {required}")
    return args


def copies(dockerfile: str) -> list[tuple[str, str]]:
    """The build stage's `COPY SRC DST` lines whose destination is inside the image tree."""
    return [(s, d) for s, d in _COPY.findall(build_stage(dockerfile)) if d.startswith(IMAGE_ROOT + "/")]


def _local(path: str, out: Path) -> str:
    return str(out / path.removeprefix(IMAGE_ROOT).lstrip("/")) if path.startswith(IMAGE_ROOT) else path


def build(repo: Path, out: Path, wheelhouse: Path | None, epoch: int) -> str:
    """Lay out the image tree under `out` as the Dockerfile's build stage does; its digest."""
    dockerfile = (repo / "Dockerfile.enclave").read_text("utf-8")
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    # COPY lines first (the requirements file must be in place before pip reads it); the order
    # of COPY and RUN does not matter to the result: they write disjoint paths.
    for src, dst in copies(dockerfile):
        target = Path(_local(dst, out))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / src, target)
    args = [_local(a, out) for a in pip_arguments(dockerfile)]
    if wheelhouse is not None:
        # Offline: the same files (pip still checks every hash), from a local directory.
        if "--index-url" in args:
            i = args.index("--index-url")
            del args[i : i + 2]
        args += ["--no-index", "--find-links", str(wheelhouse)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True, env=env)
    normalize(out, epoch)
    return digest(out)


def normalize(tree: Path, epoch: int) -> None:
    """Fixed metadata: no bytecode, owner 0:0, modes 0755 (dirs, executables) or 0644, mtime `epoch`."""
    for cache in sorted(tree.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    for pyc in tree.rglob("*.pyc"):
        pyc.unlink()
    paths = [tree, *sorted(tree.rglob("*"))]
    can_chown = os.geteuid() == 0
    for path in reversed(paths):  # children before their directory: setting a time does not touch the parent
        st = path.lstat()
        if can_chown:
            os.lchown(path, 0, 0)
        if stat.S_ISDIR(st.st_mode):
            path.chmod(0o755)
        elif stat.S_ISREG(st.st_mode):
            path.chmod(0o755 if st.st_mode & 0o111 else 0o644)
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def manifest(tree: Path) -> list[str]:
    lines = []
    for path in sorted(tree.rglob("*"), key=lambda p: p.relative_to(tree).as_posix().encode()):
        st = path.lstat()
        rel = path.relative_to(tree).as_posix()
        if stat.S_ISLNK(st.st_mode):
            kind, size, content = "l", 0, hashlib.sha256(Path(path).readlink().encode()).hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            kind, size, content = "d", 0, "-"
        elif stat.S_ISREG(st.st_mode):
            kind, size, content = "f", st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            raise RecipeError(f"{rel}: not a file, directory or symbolic link")
        mode = stat.S_IMODE(st.st_mode)
        lines.append(f"{kind} {mode:04o} {st.st_uid}:{st.st_gid} {int(st.st_mtime)} {size} {content} {rel}")
    return lines


def digest(tree: Path) -> str:
    return "sha256:" + hashlib.sha256("".join(line + "\n" for line in manifest(tree)).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eif/rootfs.py", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    b = verbs.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    b.add_argument("--wheelhouse", type=Path, help="install from this directory instead of PyPI (hashes still checked)")
    b.add_argument("--source-date-epoch", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    n = verbs.add_parser("normalize")
    n.add_argument("tree", type=Path)
    n.add_argument("--source-date-epoch", type=int, required=True)
    for verb in ("digest", "manifest"):
        verbs.add_parser(verb).add_argument("tree", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.verb == "build":
            print(build(args.repo, args.out, args.wheelhouse, args.source_date_epoch))
        elif args.verb == "normalize":
            normalize(args.tree, args.source_date_epoch)
        elif args.verb == "digest":
            print(digest(args.tree))
        else:
            print("\n".join(manifest(args.tree)))
    except (RecipeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"eif/rootfs.py {args.verb}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
