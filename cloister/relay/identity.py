"""Upstream identity: the relay carries each upstream's evidence to the enclave, which verifies it
(the `IdentityReporter` that `Upstreams` report through)."""

from __future__ import annotations

import json
import logging

import mcp_types as types

from cloister.relay.enclave_client import EnclaveRefused
from cloister.relay.state import RelayState
from cloister.wire import enclave_pb2 as pb

log = logging.getLogger("cloister.relay")


class UpstreamIdentity:
    def __init__(self, state: RelayState) -> None:
        self.state = state

    async def challenge(self, server: str, *, reconnect: bool) -> tuple[bytes, str] | None:
        try:
            resp = await self.state.enclave.server_challenge(server, reconnect=reconnect)
        except EnclaveRefused as exc:
            log.warning("no identity challenge for upstream %s: %s", server, exc)
            return None
        return resp.nonce, resp.kind

    async def report(
        self,
        server: str,
        *,
        evidence: bool,
        tools: list[types.Tool] | None,
        attestation: bytes = b"",
        artifact: bytes = b"",
        certificates: list[bytes] | None = None,
        failure: str = "",
    ) -> str:
        tools_json = b""
        if tools is not None:
            tools_json = json.dumps(
                [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]
            ).encode()
        try:
            resp = await self.state.enclave.report_server(
                pb.ServerReport(
                    server=server,
                    evidence=evidence,
                    attestation=attestation,
                    artifact=artifact,
                    certificates=certificates or [],
                    failure=failure,
                    tools_json=tools_json,
                    persisted_size=self.state.writer.persisted_size,
                )
            )
        except EnclaveRefused as exc:
            log.warning("the enclave refused the report for upstream %s: %s", server, exc)
            return "refused"
        await self.state.persist(resp.log)
        if resp.status == "failed":
            log.warning("upstream %s is quarantined by the enclave: %s", server, resp.detail)
        elif resp.hidden_tools:
            log.warning("upstream %s: the enclave hides %s", server, ", ".join(resp.hidden_tools))
        return resp.status
