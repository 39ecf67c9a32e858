"""FilterTools through the enclave's servicer: each distinct candidate is judged once and answered
once, in the order first given, however often a relay repeats it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloister.enclave.core import EnclaveCore
from cloister.enclave.service import EnclaveService
from cloister.wire import enclave_pb2 as pb
from tests.world import make_world


class _Context:
    def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def test_repeated_candidates_are_judged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(tmp_path)
    seen: list[int] = []
    real = EnclaveCore.visible_items

    def counting(self: EnclaveCore, token: str, candidates: list[Any]) -> Any:
        seen.append(len(candidates))
        return real(self, token, candidates)

    monkeypatch.setattr(EnclaveCore, "visible_items", counting)
    lookup = pb.ToolRef(server="refunds", tool="customer_lookup")
    search = pb.ToolRef(server="research", tool="web_search")
    request = pb.FilterToolsRequest(
        token=w.token("refund-bot", ["refund-agent"]), candidates=[lookup, search] * 4999 + [lookup]
    )
    answer = EnclaveService(w.core).FilterTools(request, _Context())  # type: ignore[arg-type]
    assert seen == [2]
    assert [(t.server, t.tool) for t in answer.visible] == [("refunds", "customer_lookup")]
