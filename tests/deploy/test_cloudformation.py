"""deploy/cloudformation/cloister.yaml: valid for cfn-lint, and its policies say what 0014/0021 say.

The key policy is resolved for given parameters and evaluated: its unseal statement by the KMS
stand-in's own evaluator (cloister.dev.kms, the conditions mock mode enforces), its explicit
Deny by IAM's rule for negated operators, and the whole policy by `cloister doctor`'s check.
Real KMS and IAM could not be used here: what they would do is taken from AWS's documentation.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloister.cli.doctor import key_policy_problems
from cloister.dev.kms import KeyPolicy, log_key_policy
from tests.deploy.cfn import TEMPLATE, Resolver, load

A, B, C, D = ("a1" * 48, "b2" * 48, "c3" * 48, "d4" * 48)
UNSEAL = ("kms:Decrypt", "kms:GenerateDataKey")
ATTESTED = "kms:recipientattestation:imagesha384"


def cfn_lint() -> str:
    exe = Path(sys.executable).parent / "cfn-lint"
    if not exe.exists():
        pytest.skip("cfn-lint is not installed in this environment")
    return str(exe)


def key_policy(**params: str) -> dict[str, Any]:
    policy: dict[str, Any] = Resolver(load(), params).resource("LogKey")["Properties"]["KeyPolicy"]
    return policy


def statement(policy: dict[str, Any], sid: str) -> dict[str, Any] | None:
    return next((s for s in policy["Statement"] if s.get("Sid") == sid), None)


def context(pcr0: str | None) -> dict[str, str]:
    return {} if pcr0 is None else {ATTESTED: pcr0}


def denied(policy: dict[str, Any], action: str, ctx: dict[str, str]) -> bool:
    """Whether DenyUnattested applies, by IAM's rules: a negated operator holds on a missing key."""
    deny = statement(policy, "DenyUnattested")
    assert deny is not None and deny["Effect"] == "Deny"
    if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in deny["Action"]):
        return False
    condition = deny.get("Condition")
    if condition is None:
        return True
    ((operator, keys),) = condition.items()
    assert operator == "StringNotEqualsIgnoreCase"
    ((key, values),) = keys.items()
    value = ctx.get(key.lower())
    return value is None or value.lower() not in {v.lower() for v in values}


def test_template_passes_cfn_lint() -> None:
    r = subprocess.run([cfn_lint(), str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    # The lint is a real check: a wrong property name fails it.
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace("EnclaveOptions:", "EnclaveOption:"))
    r = subprocess.run([cfn_lint(), str(broken)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "EnclaveOption" in r.stdout


@pytest.mark.parametrize(
    ("image", "predecessors", "allowed"),
    [(A, "", [A]), (A, f"{B},{C}", [A, B, C])],
)
def test_unseal_statement_is_the_one_the_stand_in_enforces(image: str, predecessors: str, allowed: list[str]) -> None:
    policy = key_policy(ImageSha384=image, PredecessorImageSha384=predecessors)
    unseal = statement(policy, "CloisterEnclaveUnseal")
    assert unseal is not None
    expected = log_key_policy([bytes.fromhex(p) for p in allowed])["Statement"][0]
    assert (unseal["Action"], unseal["Condition"]) == (expected["Action"], expected["Condition"])
    evaluator = KeyPolicy.parse({"Version": "2012-10-17", "Statement": [unseal]})
    for action in UNSEAL:
        for pcr0 in allowed:
            assert evaluator.allows(action, context(pcr0)) and not denied(policy, action, context(pcr0))
            assert evaluator.allows(action, context(pcr0.upper()))
        assert not evaluator.allows(action, context(D)) and denied(policy, action, context(D))
        assert not evaluator.allows(action, context(None)) and denied(policy, action, context(None))
    # Nothing else in the policy allows unsealing, and doctor finds nothing wrong with it.
    others = [s for s in policy["Statement"] if s is not unseal and s["Effect"] == "Allow"]
    for s in others:
        for action in (*UNSEAL, "kms:Encrypt", "kms:ReEncryptFrom", "kms:GenerateDataKeyWithoutPlaintext"):
            assert not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in s["Action"]), (s["Sid"], action)
    assert key_policy_problems(policy, image) == []
    assert key_policy_problems(policy, D) == [
        f"the key policy does not pin PCR0 {D} (deploy/pin-image.sh); it pins {sorted(allowed)}"
    ]


def test_before_an_image_is_pinned_nobody_can_unseal() -> None:
    policy = key_policy(ImageSha384="", PredecessorImageSha384="")
    assert statement(policy, "CloisterEnclaveUnseal") is None
    deny = statement(policy, "DenyUnattested")
    assert deny is not None and "Condition" not in deny
    for action in UNSEAL:
        assert denied(policy, action, context(A)) and denied(policy, action, context(None))


def test_key_administrator_and_parent_cannot_unseal_or_rewrite() -> None:
    policy = key_policy(ImageSha384=A)
    admin = statement(policy, "KeyAdministration")
    parent = statement(policy, "ParentReadsThePolicy")
    assert admin is not None and parent is not None
    assert admin["Principal"] == {"AWS": Resolver(load(), {}).params["KeyAdminArn"]}
    assert parent["Action"] == ["kms:DescribeKey", "kms:GetKeyPolicy"]
    # The instance's role: its IAM policies name the key, and grant no way to change any policy.
    r = Resolver(load(), {"ImageSha384": A})
    role_policies = [p["PolicyDocument"] for p in r.resource("InstanceRole")["Properties"]["Policies"]]
    role_policies.append(r.resource("InstanceKeyPolicy")["Properties"]["PolicyDocument"])
    actions = [a for doc in role_policies for s in doc["Statement"] for a in s["Action"]]
    for forbidden in (
        "kms:PutKeyPolicy",
        "kms:CreateGrant",
        "iam:PutRolePolicy",
        "s3:PutBucketPolicy",
        "s3:DeleteObjectVersion",
    ):
        assert not any(fnmatch.fnmatchcase(forbidden.lower(), a.lower()) for a in actions), forbidden
    key_statement = r.resource("InstanceKeyPolicy")["Properties"]["PolicyDocument"]["Statement"][0]
    assert key_statement["Resource"] == "arn:LogKey"


def test_storage_is_least_privilege_and_history_is_kept() -> None:
    r = Resolver(load(), {"ImageSha384": A, "LogPrefix": "log"})
    statements = r.resource("InstanceRole")["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in statements}
    assert set(by_sid) == {"ListTheLogPrefix", "ReadWriteTheLog"}
    assert by_sid["ListTheLogPrefix"]["Action"] == "s3:ListBucket"
    assert by_sid["ListTheLogPrefix"]["Condition"] == {"StringLike": {"s3:prefix": ["log/*"]}}
    assert by_sid["ReadWriteTheLog"]["Action"] == ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    assert by_sid["ReadWriteTheLog"]["Resource"] == "arn:LogBucket/log/*"
    bucket = r.resource("LogBucket")
    assert bucket["DeletionPolicy"] == "Retain"
    assert bucket["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}
    assert all(bucket["Properties"]["PublicAccessBlockConfiguration"].values())
    bucket_policy = {s["Sid"]: s for s in r.resource("LogBucketPolicy")["Properties"]["PolicyDocument"]["Statement"]}
    erase = bucket_policy["HostCannotEraseHistory"]
    assert erase["Effect"] == "Deny" and erase["Principal"] == {"AWS": "arn:InstanceRole"}
    assert {"s3:DeleteObjectVersion", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration"} <= set(erase["Action"])
    assert bucket_policy["TlsOnly"]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_instance_has_enclaves_and_only_https_in() -> None:
    r = Resolver(load(), {"ImageSha384": A, "AgentCidr": "10.1.0.0/16"})
    props = r.resource("Instance")["Properties"]
    assert props["EnclaveOptions"] == {"Enabled": True}
    assert props["MetadataOptions"]["HttpTokens"] == "required"
    ingress = r.resource("SecurityGroup")["Properties"]["SecurityGroupIngress"]
    assert [(i["FromPort"], i["ToPort"], i["CidrIp"]) for i in ingress] == [(443, 443, "10.1.0.0/16")]
    assert "deploy/bootstrap.sh install" in props["UserData"]


def test_template_refuses_a_debug_mode_pcr0() -> None:
    template = load()
    zeros = "0" * 96
    assertions = template["Rules"]["NoDebugImage"]["Assertions"]
    assert {"Fn::Not": [{"Fn::Equals": [{"Ref": "ImageSha384"}, zeros]}]} == assertions[0]["Assert"]
    assert zeros in str(assertions[1]["Assert"]) and "PredecessorImageSha384" in str(assertions[1]["Assert"])
    # And doctor flags a policy that pins one (a hand-edited policy, say).
    policy = key_policy(ImageSha384=zeros)
    assert any("all-zero PCR0" in p for p in key_policy_problems(policy, zeros))
