"""Read deploy/cloudformation/cloister.yaml and resolve its intrinsic functions for given parameters.

Enough of CloudFormation's semantics for the functions the template uses (Ref, Fn::If with
Fn::Not/Fn::Equals conditions, Fn::Sub, Fn::Split, Fn::GetAtt, AWS::NoValue), so tests can
evaluate the policies a stack would get. Resources resolve to placeholders: `arn:<Name>` for
GetAtt Arn, `<Name>` for Ref.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "cloudformation" / "cloister.yaml"
_NO_VALUE = object()


class _Loader(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (!Ref, !Sub, !If, ...) as their long forms."""


def _short_form(loader: Any, suffix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_Loader.add_multi_constructor("!", _short_form)


def load() -> dict[str, Any]:
    # PyYAML, not cfn-lint's decoder: cfn-lint is run as a process (the lint test); importing it
    # would add ~60 MB to the test process, which every later subprocess inherits as its peak RSS.
    out: dict[str, Any] = plain(yaml.load(TEMPLATE.read_text(), Loader=_Loader))
    return out


def plain(node: Any) -> Any:
    """Plain dicts, lists and strings (keys as strings)."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return str(node) if isinstance(node, str) else node


class Resolver:
    def __init__(self, template: dict[str, Any], params: dict[str, str]) -> None:
        self.template = template
        defaults = {k: str(v.get("Default", "")) for k, v in template["Parameters"].items()}
        self.params = {**defaults, **params, "AWS::AccountId": "123456789012", "AWS::Region": "eu-west-1"}
        self.params["AWS::StackName"] = "test"
        self.params["AWS::Partition"] = "aws"

    def condition(self, name: str) -> bool:
        return bool(self.value(self.template["Conditions"][name]))

    def value(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.value(x) for x in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return _NO_VALUE if arg == "AWS::NoValue" else self.params.get(arg, arg)
            if key == "Fn::If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Fn::Equals":
                return self.value(arg[0]) == self.value(arg[1])
            if key == "Fn::Split":
                return str(self.value(arg[1])).split(arg[0])
            if key == "Fn::GetAtt":
                return f"arn:{arg[0]}"
            if key == "Fn::Sub":
                return re.sub(r"\$\{([^}]+)\}", lambda m: self._sub(m.group(1)), arg)
            if key == "Fn::Base64":
                return self.value(arg)
        return {k: v for k, v in ((k, self.value(v)) for k, v in node.items()) if v is not _NO_VALUE}

    def _sub(self, name: str) -> str:
        if name in self.params:
            return self.params[name]
        return f"arn:{name.split('.')[0]}" if "." in name else name

    def resource(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.value(self.template["Resources"][name])
        return out
