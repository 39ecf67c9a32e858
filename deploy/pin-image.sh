#!/usr/bin/env bash
# Pin an enclave image in the log key's KMS policy: update the stack's ImageSha384 (and the
# predecessors still allowed to unseal) and nothing else. Run by the key administrator
# (KeyAdminArn) from their own workstation, never on the instance: its role cannot, and must
# not be able to, change the policy.
#
#   deploy/pin-image.sh --stack NAME --pcr0 HEX [--predecessors HEX,HEX] [--measurements FILE]
#
# --measurements: a measurements.json from your own rebuild (eif/build.sh); refuses unless its
# PCR0 is the one being pinned. Prints the key policy CloudFormation applied.
set -euo pipefail
stack="" pcr0="" predecessors="" measurements=""
fail() {
  echo "deploy/pin-image.sh: $*" >&2
  exit 2
}
while (($#)); do
  case "$1" in
    --stack) stack="${2:-}"; shift 2 ;;
    --pcr0) pcr0="${2:-}"; shift 2 ;;
    --predecessors) predecessors="${2:-}"; shift 2 ;;
    --measurements) measurements="${2:-}"; shift 2 ;;
    *) fail "unknown argument $1" ;;
  esac
done
[[ -n "$stack" ]] || fail "give --stack NAME"
[[ "$pcr0" =~ ^[0-9a-f]{96}$ ]] || fail "--pcr0 must be 96 lower-case hex characters"
[[ "$pcr0" =~ ^0+$ ]] && fail "--pcr0 is all zeros: that is a debug-mode enclave"
[[ -z "$predecessors" || "$predecessors" =~ ^[0-9a-f]{96}(,[0-9a-f]{96})*$ ]] ||
  fail "--predecessors must be comma-separated 96-hex PCR0s"
if [[ -n "$measurements" ]]; then
  rebuilt=$(grep -oE '"PCR0": *"[0-9a-f]{96}"' "$measurements" | grep -oE '[0-9a-f]{96}') ||
    fail "$measurements has no PCR0"
  [[ "$rebuilt" == "$pcr0" ]] || fail "your rebuild measured PCR0 $rebuilt, not $pcr0: do not pin it"
fi
# JSON, not the CLI's shorthand: the predecessors' value holds commas.
params="[{\"ParameterKey\":\"ImageSha384\",\"ParameterValue\":\"$pcr0\"},"
params+="{\"ParameterKey\":\"PredecessorImageSha384\",\"ParameterValue\":\"$predecessors\"}"
# Every other parameter keeps its value.
for key in $(aws cloudformation describe-stacks --stack-name "$stack" --query 'Stacks[0].Parameters[].ParameterKey' --output text); do
  case "$key" in
    ImageSha384 | PredecessorImageSha384) ;;
    *) params+=",{\"ParameterKey\":\"$key\",\"UsePreviousValue\":true}" ;;
  esac
done
params+="]"
aws cloudformation update-stack --stack-name "$stack" --use-previous-template --capabilities CAPABILITY_IAM \
  --parameters "$params"
aws cloudformation wait stack-update-complete --stack-name "$stack"
key=$(aws cloudformation describe-stacks --stack-name "$stack" --query "Stacks[0].Outputs[?OutputKey=='KeyArn'].OutputValue" --output text)
aws kms get-key-policy --key-id "$key" --policy-name default --output text
