#!/usr/bin/env bash
# Regenerate eif/requirements-enclave.txt's hashes: for every pinned `name==version` in it, the
# sha256 of the CPython 3.11 wheels for manylinux x86_64 and aarch64 (Graviton) from PyPI, and of
# pure-Python wheels. The image installs with `pip install --require-hashes --only-binary=:all:`,
# so it can only ever install one of these files: a changed upload on PyPI fails the build.
#
#   eif/lock.sh [PYTHON]        (default: python3; needs pip and network access to PyPI)
#
# To change a version: edit the `name==version` line (and constraints.txt; tests/test_tcb.py
# checks they agree), then run this. Review the diff: every changed hash is a changed input to PCR0.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
lock=eif/requirements-enclave.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pins=$(grep -oE '^[A-Za-z0-9_.-]+==[^ \\]+' "$lock")
for arch in x86_64 aarch64; do
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${tag}_${arch}")
  done
  # shellcheck disable=SC2086 # one argument per pin
  "$python" -m pip download --isolated --index-url https://pypi.org/simple --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --abi cp311 --abi abi3 --abi none "${platforms[@]}" --platform any -d "$work/$arch" $pins
done
{
  sed -n '/^#/p' "$lock" | sed '/^# --- pins/,$d'
  echo "# --- pins (eif/lock.sh writes everything below) ---"
  for pin in $pins; do
    name="${pin%%==*}"
    version="${pin#*==}"
    # Wheel file names normalise the project name: lower case, runs of -_. become _.
    stem=$(echo "$name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g')
    printf '%s \\\n' "$pin"
    hashes=$(find "$work" -iname "${stem}-${version}-*.whl" -exec "$python" -m pip hash {} \; | grep -oE 'sha256:[0-9a-f]{64}' | sort -u)
    [[ -n "$hashes" ]] || { echo "eif/lock.sh: no wheel of $pin for CPython 3.11 manylinux" >&2; exit 2; }
    last=$(echo "$hashes" | tail -n 1)
    for h in $hashes; do
      if [[ "$h" == "$last" ]]; then printf '    --hash=%s\n' "$h"; else printf '    --hash=%s \\\n' "$h"; fi
    done
  done
} > "$work/lock"
mv "$work/lock" "$lock"
echo "eif/lock.sh: wrote $(grep -c -- '--hash=' "$lock") hashes for $(echo "$pins" | wc -w) pins to $lock"
