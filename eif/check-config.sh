#!/usr/bin/env bash
# Refuse an enclave config that must not be baked into an enclave image: placeholders left, a
# trust root other than AWS's (whoever holds a mock root's key can attest any PCRs), no witnesses
# or unsafe_unwitnessed = true (rollback goes undetected), or allow_debug = true. One line on stderr and exit 2; silent exit 0 when the config may ship.
#
#   eif/check-config.sh [CONFIG]      (default: eif/enclave.toml; eif/build.sh runs it first)
#
# The image's enclave refuses a mock root on /dev/nsm as well (cloister/enclave/config.py); this
# check stops such an image from being built and measured at all. It reads TOML with grep, so it
# is strict: trust_root is set exactly once, at the top level, to "aws".
set -euo pipefail
config="${1:-$(dirname "$0")/enclave.toml}"
fail() {
  echo "$config: $*" >&2
  exit 2
}
[[ -r "$config" ]] || fail "cannot read it"
if grep -q "REPLACE-ME" "$config"; then
  fail "still has placeholders: set origin and admin_keys first"
fi
key="^[[:space:]]*(\"trust_root\"|'trust_root'|trust_root)[[:space:]]*="
count=$(grep -cE "$key" "$config" || true)
if [[ "$count" -eq 0 ]]; then
  fail 'does not set trust_root: set trust_root = "aws"'
elif [[ "$count" -gt 1 ]]; then
  fail "sets trust_root $count times; set it once, to \"aws\""
fi
line=$(grep -nE "$key" "$config" | cut -d: -f1)
table=$(grep -nE '^[[:space:]]*\[' "$config" | head -n 1 | cut -d: -f1 || true)
if [[ -n "$table" && "$table" -lt "$line" ]]; then
  fail "trust_root is set inside a [table] (line $line); set trust_root = \"aws\" before any [table]"
fi
value=$(grep -E "$key" "$config" | sed -E "s/${key}[[:space:]]*//")
if ! [[ "$value" =~ ^(\"aws\"|\'aws\')[[:space:]]*(#.*)?$ ]]; then
  shown="${value%%#*}"
  fail "trust_root must be \"aws\" in an enclave image, not ${shown%"${shown##*[![:space:]]}"} (mock roots are for the mock NSM only)"
fi
if grep -qE '^[[:space:]]*("unsafe_unwitnessed"|unsafe_unwitnessed)[[:space:]]*=[[:space:]]*true' "$config"; then
  fail "unsafe_unwitnessed = true leaves rollback and shadow enclaves undetected: not in an enclave image"
fi
if ! grep -qE '^[[:space:]]*("witnesses"|witnesses)[[:space:]]*=[[:space:]]*\[[[:space:]]*["'"'"']' "$config"; then
  fail 'names no witnesses: set witnesses = ["<C2SP vkey>", ...] (docs/decisions/0015)'
fi
if grep -qE '^[[:space:]]*("allow_debug"|allow_debug)[[:space:]]*=[[:space:]]*true' "$config"; then
  fail "allow_debug = true accepts debug-mode documents (PCR0 all zero): not in an enclave image"
fi
