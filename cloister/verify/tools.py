"""Tool-definition pins: a tool is pinned by the SHA-256 of its definition's canonical JSON.

The definition is the tool's `name`, `description`, `inputSchema` and `annotations` as the
upstream's `tools/list` returns them (absent fields are null), serialised per RFC 8785. A
server that changes any of them after its tools were approved ("rug pull") no longer matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from cloister.verify.canonical import canonical_json

PINNED_FIELDS = ("name", "description", "inputSchema", "annotations")


def tool_definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    return {field: tool.get(field) for field in PINNED_FIELDS}


def tool_definition_hash(tool: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of the pinned fields of one tools/list entry."""
    return hashlib.sha256(canonical_json(tool_definition(tool))).hexdigest()
