#!/usr/bin/env bash
# Build the enclave image into an EIF and print its measurements (PCR0/1/2).
# Needs Docker and nitro-cli (an EC2 instance with Nitro Enclaves enabled).
set -euo pipefail
cd "$(dirname "$0")/.."
# Placeholders, a trust root other than "aws" (mock roots are for the mock NSM), allow_debug: exit 2.
bash eif/check-config.sh eif/enclave.toml
docker build -f Dockerfile.enclave -t cloister-enclave:latest .
nitro-cli build-enclave --docker-uri cloister-enclave:latest --output-file eif/cloister.eif | tee eif/measurements.json
echo "Pin PCR0 from eif/measurements.json in your auditors' and upstream servers' configuration."
