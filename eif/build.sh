#!/usr/bin/env bash
# Build the enclave image into an EIF, twice, and refuse to go on unless both builds measure the
# same: then write the measurements (PCR0/1/2, and PCR8 when signed) that auditors, witness
# operators and upstream servers pin. Needs Docker and nitro-cli (aws-nitro-enclaves-cli; the
# build itself needs no Nitro hardware, so a third party can rebuild anywhere to check PCR0).
#
#   eif/build.sh
#
# Environment (all optional):
#   SOURCE_DATE_EPOCH   file times in the image (default: the checked-out commit's time, so a
#                       rebuild from a release tag gets the same value)
#   SIGNING_CERT, SIGNING_KEY
#                       sign the EIF (nitro-cli --signing-certificate/--private-key): the
#                       image then has PCR8, the certificate's measurement; give both or neither
#   OUT                 where to write the EIF and measurements (default: eif/)
#   PUBLISH             also copy the measurements to this s3://bucket/prefix/ (aws s3 cp), as
#                       measurements/<PCR0>.json: where the release's auditors, witness operators
#                       and upstreams fetch them (a release bucket, from the release builder's
#                       machine; the instance's role cannot write outside the log prefix)
#
# Exit 2: a refused input (config, base digest, signing options); exit 3: the builds differ.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() {
  echo "eif/build.sh: $*" >&2
  exit "${code:-2}"
}

# 1. Inputs. Placeholders, a trust root other than "aws", no witnesses, allow_debug: exit 2.
bash eif/check-config.sh eif/enclave.toml
# shellcheck source=eif/base-image.env
source eif/base-image.env
if ! [[ "${BASE_DIGEST:-}" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  fail "eif/base-image.env: BASE_DIGEST '${BASE_DIGEST:-}' is not sha256:<64 hex>; pin the base image first (eif/pin-base.sh)"
fi
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) || fail "no git commit to take SOURCE_DATE_EPOCH from; set it"
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || fail "SOURCE_DATE_EPOCH '$SOURCE_DATE_EPOCH' is not a number of seconds"
sign=()
if [[ -n "${SIGNING_CERT:-}" || -n "${SIGNING_KEY:-}" ]]; then
  [[ -n "${SIGNING_CERT:-}" && -n "${SIGNING_KEY:-}" ]] || fail "give both SIGNING_CERT and SIGNING_KEY, or neither"
  [[ -r "$SIGNING_CERT" ]] || fail "cannot read SIGNING_CERT $SIGNING_CERT"
  sign=(--signing-certificate "$SIGNING_CERT" --private-key "$SIGNING_KEY")
fi
out="${OUT:-eif}"
mkdir -p "$out"
export DOCKER_BUILDKIT=1 SOURCE_DATE_EPOCH

# 2. Two builds from scratch (no layer cache, so the second really rebuilds), one EIF each.
pcrs() { grep -oE '"PCR[0-9]+": *"[0-9a-f]+"' "$1" | tr -d ' "' | sort -t: -k1,1V; }
for n in 1 2; do
  docker build --no-cache -f Dockerfile.enclave --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "BASE_DIGEST=$BASE_DIGEST" --build-arg "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH" \
    -t "cloister-enclave:build$n" . >&2
  nitro-cli build-enclave --docker-uri "cloister-enclave:build$n" --output-file "$out/cloister-build$n.eif" \
    "${sign[@]}" >"$out/build$n.json"
  pcrs "$out/build$n.json" | grep -q '^PCR0:[0-9a-f]\{96\}$' || fail "nitro-cli printed no PCR0 for build $n ($out/build$n.json)"
done

# 3. Refuse unless they agree: a PCR0 nobody can rebuild is a PCR0 nobody can tie to the source.
if [[ "$(pcrs "$out/build1.json")" != "$(pcrs "$out/build2.json")" ]]; then
  diff <(pcrs "$out/build1.json") <(pcrs "$out/build2.json") >&2 || true
  rm -f "$out/cloister-build1.eif" "$out/cloister-build2.eif"
  code=3 fail "the two builds measure differently: the image is not reproducible; not writing measurements (see docs/decisions/0021 to diagnose)"
fi
mv "$out/cloister-build1.eif" "$out/cloister.eif"
rm -f "$out/cloister-build2.eif" "$out/build2.json"
mv "$out/build1.json" "$out/nitro-cli.json"

# 4. The measurements, with the inputs that produced them.
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
lock=$(sha256sum eif/requirements-enclave.txt | cut -d' ' -f1)
{
  echo "{"
  pcrs "$out/nitro-cli.json" | sed -E 's/^(PCR[0-9]+):(.*)$/  "\1": "\2",/'
  echo "  \"base_image\": \"$BASE_IMAGE@$BASE_DIGEST\","
  echo "  \"source_date_epoch\": $SOURCE_DATE_EPOCH,"
  echo "  \"requirements_sha256\": \"$lock\","
  echo "  \"commit\": \"$commit\""
  echo "}"
} >"$out/measurements.json"
pcr0=$(pcrs "$out/nitro-cli.json" | sed -n 's/^PCR0://p')
if [[ -n "${PUBLISH:-}" ]]; then
  aws s3 cp "$out/measurements.json" "${PUBLISH%/}/measurements/$pcr0.json"
fi
cat "$out/measurements.json"
echo "eif/build.sh: both builds agree; PCR0 $pcr0. Pin it (auditors: --expect-pcr 0=$pcr0; the KMS key policy: deploy/README.md)." >&2
