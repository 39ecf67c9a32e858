#!/usr/bin/env bash
# Run the EIF on this Nitro-enabled EC2 instance. The relay then uses enclave = "vsock:16:5005".
set -euo pipefail
cd "$(dirname "$0")/.."
nitro-cli run-enclave --eif-path eif/cloister.eif --cpu-count "${CPUS:-2}" --memory "${MEMORY_MIB:-2048}" \
  --enclave-cid "${CID:-16}"
nitro-cli describe-enclaves
