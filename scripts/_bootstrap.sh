# Sourced by scripts/demo, scripts/test and scripts/bench.
# Creates .venv with python3 (>= 3.11) and installs the project and its dev tools into it,
# pinned by constraints.txt. Re-installs only when pyproject.toml or constraints.txt change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "cloister needs Python >= 3.11; '$PY' is $("$PY" --version 2>&1 || echo missing)" >&2
  exit 2
fi
VENV="$ROOT/.venv"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "==> creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.cloister-install-stamp"
WANT="$("$VENV/bin/python" -c 'import hashlib,pathlib; print(hashlib.sha256(b"".join(pathlib.Path(f).read_bytes() for f in ("pyproject.toml","constraints.txt") if pathlib.Path(f).exists())).hexdigest())')"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "==> installing cloister and its dependencies into .venv (first run takes a minute)" >&2
  LOG="$VENV/install.log"
  CONSTRAINTS=()
  [[ -f constraints.txt ]] && CONSTRAINTS=(-c constraints.txt)
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check "${CONSTRAINTS[@]}" -e ".[dev]"; } >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "installation failed; the whole log is in $LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
