#!/usr/bin/env bash
# Build the enclave image into an EIF and print its measurements (PCR0/1/2).
# Needs Docker and nitro-cli (an EC2 instance with Nitro Enclaves enabled).
set -euo pipefail
cd "$(dirname "$0")/.."
if grep -q "REPLACE-ME" eif/enclave.toml; then
  echo "eif/enclave.toml still has placeholders: set origin and admin_keys first" >&2
  exit 2
fi
docker build -f Dockerfile.enclave -t cloister-enclave:latest .
nitro-cli build-enclave --docker-uri cloister-enclave:latest --output-file eif/cloister.eif | tee eif/measurements.json
echo "Pin PCR0 from eif/measurements.json in your auditors' and upstream servers' configuration."
