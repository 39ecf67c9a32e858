#!/usr/bin/env bash
# Bootstrap Cloister on an Amazon Linux 2023 instance created by deploy/cloudformation/cloister.yaml
# (enclaves enabled, its role, /etc/cloister-stack.env). Run as root from the checkout
# (/opt/cloister/src), one step at a time; each step can be re-run.
#
#   deploy/bootstrap.sh install      packages (nitro-cli, Docker, nginx, Python 3.11), users, the
#                                    allocator sized from enclave.env, the host venv, the units
#   deploy/bootstrap.sh build        eif/build.sh: two builds, PCRs compared, measurements
#                                    written; prints the PCRs and the command that pins PCR0 in
#                                    the KMS key policy (run by the key administrator, NOT here:
#                                    this instance's role cannot change the policy)
#   deploy/bootstrap.sh configure    /etc/cloister/relay.toml and the nginx site from the stack's
#                                    outputs; checks the secrets, certificate and bundle are there
#   deploy/bootstrap.sh start        refuses unless `cloister doctor` finds the KMS policy pins
#                                    this image, then enables and starts the enclave and relay
#
# CLOISTER_ROOT prefixes every path it writes (tests install into a scratch directory).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
root="${CLOISTER_ROOT:-}"
etc="$root/etc/cloister"
venv="$root/opt/cloister/venv"
eif_dir="$root/var/lib/cloister/eif"
fail() {
  echo "deploy/bootstrap.sh $step: $*" >&2
  exit 2
}
step="${1:-}"

load_env() {
  # shellcheck source=/dev/null # /etc/cloister/enclave.env, from deploy/enclave.env
  source "$etc/enclave.env"
}

install_step() {
  dnf install -y aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel docker git nginx python3.11 python3.11-pip
  getent group ne >/dev/null || groupadd --system ne
  id cloister >/dev/null 2>&1 || useradd --system --home-dir /var/lib/cloister --shell /sbin/nologin cloister
  usermod -aG ne cloister
  install -d -m 0755 "$etc" "$root/etc/nitro_enclaves" "$root/etc/systemd/system" "$root/opt/cloister"
  install -d -m 0700 "$etc/secrets" "$etc/tls"
  [[ -e "$etc/enclave.env" ]] || install -m 0644 "$src/deploy/enclave.env" "$etc/enclave.env"
  load_env
  # The allocator reserves the enclave's memory and CPUs at boot; it must cover enclave.env.
  sed -e "s/@MEMORY_MIB@/$MEMORY_MIB/" -e "s/@CPU_COUNT@/$CPU_COUNT/" "$src/deploy/allocator.yaml" \
    >"$root/etc/nitro_enclaves/allocator.yaml"
  # The host side (relay, CLI) is outside the TCB: versions pinned by constraints.txt.
  [[ -x "$venv/bin/python" ]] || python3.11 -m venv "$venv"
  "$venv/bin/pip" install --quiet -c "$src/constraints.txt" "$src"
  for unit in cloister-enclave.service cloister-relay.service cloister-witness.service; do
    install -m 0644 "$src/deploy/systemd/$unit" "$root/etc/systemd/system/$unit"
  done
  systemctl daemon-reload
  systemctl enable --now nitro-enclaves-allocator.service docker.service
  echo "install: done. Next: fill eif/enclave.toml and eif/base-image.env, commit, then: deploy/bootstrap.sh build"
}

build_step() {
  load_env
  OUT="$eif_dir" bash "$src/eif/build.sh"
  pcr0=$(grep -oE '"PCR0": *"[0-9a-f]{96}"' "$eif_dir/measurements.json" | grep -oE '[0-9a-f]{96}')
  echo
  echo "PCRs of this image: $eif_dir/measurements.json"
  echo "Check PCR0 against your own rebuild of this commit (docs/runbooks/rebuild.md), then, as the"
  echo "key administrator and from your workstation, pin it in the KMS key policy:"
  echo "  deploy/pin-image.sh --stack <stack-name> --pcr0 $pcr0"
  echo "and copy the measurements you checked to $etc/measurements.json. Then: deploy/bootstrap.sh configure"
}

configure_step() {
  [[ -r "$root/etc/cloister-stack.env" ]] || fail "no $root/etc/cloister-stack.env (written by the stack's user data)"
  # shellcheck source=/dev/null
  source "$root/etc/cloister-stack.env"
  [[ -n "${PUBLIC_HOST:-}" ]] || fail "set PUBLIC_HOST (the name agents use, on the TLS certificate)"
  local relay="$etc/relay.toml"
  if [[ ! -e "$relay" ]]; then
    sed -e "s|@PUBLIC_HOST@|$PUBLIC_HOST|" -e "s|@BUCKET@|$CLOISTER_BUCKET|" -e "s|@PREFIX@|$CLOISTER_PREFIX|" \
      -e "s|@KMS_KEY@|$CLOISTER_KMS_KEY|" -e "s|@REGION@|$CLOISTER_REGION|" "$src/deploy/relay.toml" >"$relay"
    echo "configure: wrote $relay; fill its [[witnesses]] (the same as eif/enclave.toml's)"
  fi
  install -d -m 0755 "$root/etc/nginx/conf.d"
  sed -e "s|@PUBLIC_HOST@|$PUBLIC_HOST|" "$src/deploy/nginx/cloister.conf" >"$root/etc/nginx/conf.d/cloister.conf"
  local missing=()
  for f in "$etc/secrets/admin.token" "$etc/secrets/auditor.token" "$etc/body.pub" "$etc/bundle.signed" \
    "$etc/tls/fullchain.pem" "$etc/tls/privkey.pem" "$etc/measurements.json"; do
    [[ -s "$f" ]] || missing+=("$f")
  done
  if grep -v "^[[:space:]]*#" "$relay" | grep -q REPLACE-ME; then missing+=("the [[witnesses]] of $relay"); fi
  ((${#missing[@]} == 0)) || fail "still missing: ${missing[*]}"
  chmod 0600 "$etc/secrets/"*.token "$etc/tls/privkey.pem"
  echo "configure: done. Next: deploy/bootstrap.sh start"
}

start_step() {
  systemctl enable --now nginx.service
  systemctl enable cloister-enclave.service cloister-relay.service
  # The KMS key must pin this image before the enclave can unseal its log key: check first.
  "$venv/bin/cloister" doctor --only kms --config "$etc/relay.toml" --pinned "$etc/measurements.json" ||
    fail "the KMS key policy does not pin this image yet (see above); run deploy/pin-image.sh as the key administrator"
  systemctl start cloister-enclave.service
  # The relay starts with the enclave (Upholds=) and is up once /readyz answers.
  systemctl start cloister-relay.service
  "$venv/bin/cloister" doctor --config "$etc/relay.toml" --pinned "$etc/measurements.json"
}

case "$step" in
  install) install_step ;;
  build) build_step ;;
  configure) configure_step ;;
  start) start_step ;;
  *)
    echo "usage: deploy/bootstrap.sh install|build|configure|start" >&2
    exit 2
    ;;
esac
