#!/usr/bin/env bash
# Pin the enclave's base image: pull BASE_IMAGE (eif/base-image.env) and write the digest the
# registry served into BASE_DIGEST. Run once per base-image update, review, commit.
#
#   eif/pin-base.sh [IMAGE]     (default: the BASE_IMAGE in eif/base-image.env)
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=eif/base-image.env
# shellcheck source=eif/base-image.env
source "$env_file"
image="${1:-$BASE_IMAGE}"
docker pull --quiet "$image" >/dev/null
# RepoDigests holds NAME@sha256:... for the manifest (list) the tag pointed to when pulled.
digest=$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image" | sed -n 's/^.*@//p' | head -n 1)
if ! [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "eif/pin-base.sh: no digest for $image (docker image inspect gave '${digest}')" >&2
  exit 2
fi
sed -i -E "s|^BASE_IMAGE=.*$|BASE_IMAGE=${image}|; s|^BASE_DIGEST=.*$|BASE_DIGEST=${digest}|" "$env_file"
echo "eif/pin-base.sh: $image@$digest written to $env_file; commit it"
