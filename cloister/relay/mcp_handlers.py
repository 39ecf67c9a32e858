"""The relay's MCP server for agents: `tools/list` (only what the enclave lets the agent see), the
enclave's attestation as a resource, and `tools/call` handed to the call path (`CallPath`)."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

from cloister import __version__
from cloister.relay.call_path import CallPath, split_tool_name
from cloister.relay.codes import ENCLAVE_UNAVAILABLE, INVALID_PARAMS, UNAUTHENTICATED
from cloister.relay.enclave_client import EnclaveRefused, EnclaveUnavailable
from cloister.relay.state import RelayState
from cloister.relay.upstreams import Upstreams
from cloister.wire.contract import TOOL_SEPARATOR

ATTESTATION_URI = "cloister://attestation/"


def bearer(ctx: ServerRequestContext[Any, Any]) -> str:
    """The request's bearer token, unverified (only the enclave verifies it); "" when absent."""
    request = ctx.request
    if request is None:
        return ""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class McpHandlers:
    def __init__(self, state: RelayState, upstreams: Upstreams, calls: CallPath) -> None:
        self.state = state
        self.upstreams = upstreams
        self.calls = calls

    def server(self) -> Server[Any]:
        return Server(
            "cloister-relay",
            version=__version__,
            instructions="Tools are named <server>___<tool>. Every call is decided by an attested enclave "
            "and recorded in a verifiable log.",
            # Without this the SDK validates Mcp-Param-* headers on every tools/call by running the
            # whole tools/list handler, i.e. an enclave round trip per call.
            get_tool_input_schema=self.input_schema,
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
        )

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        return await self.calls.call(bearer(ctx), params)

    # ---- tools/list ---------------------------------------------------------------------------

    def input_schema(self, name: str) -> dict[str, Any] | None:
        server, tool = split_tool_name(name)
        upstream = self.upstreams.by_name.get(server)
        for t in upstream.tools if upstream else ():
            if t.name == tool:
                return dict(t.input_schema)
        return None

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        token = bearer(ctx)
        by_key = {(u.name, t.name): t for u in self.upstreams.by_name.values() for t in u.tools}
        try:
            resp = await self.state.enclave.filter_tools(token, list(by_key))
        except EnclaveRefused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise MCPError(UNAUTHENTICATED, f"unauthenticated: {exc}") from exc
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave refused to list tools: {exc}") from exc
        except EnclaveUnavailable as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"no tools are listed while the enclave is unavailable: {exc}") from exc
        tools = []
        for ref in resp.visible:
            t = by_key[(ref.server, ref.tool)]
            tools.append(
                t.model_copy(
                    update={
                        "name": f"{ref.server}{TOOL_SEPARATOR}{ref.tool}",
                        "description": f"[{ref.server}] {t.description or ''}".strip(),
                    }
                )
            )
        return types.ListToolsResult(tools=tools)

    # ---- the enclave's attestation, for agents --------------------------------------------------

    async def list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[])

    async def list_resource_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(
            resource_templates=[
                types.ResourceTemplate(
                    name="enclave-attestation",
                    uri_template=ATTESTATION_URI + "{nonce}",
                    mime_type="application/json",
                    description="The Cloister enclave's NSM attestation document (base64) with your nonce (hex, 8-64 "
                    "bytes); its user_data binds the enclave's grant and log keys. Verify it with "
                    "cloister.verify.enclave_identity.verify_enclave or `cloister attest verify`.",
                )
            ]
        )

    async def read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        if not uri.startswith(ATTESTATION_URI):
            raise MCPError(INVALID_PARAMS, f"unknown resource {uri!r}; try {ATTESTATION_URI}<nonce hex>")
        try:
            nonce = bytes.fromhex(uri.removeprefix(ATTESTATION_URI))
        except ValueError:
            nonce = b""
        if not 8 <= len(nonce) <= 64:
            raise MCPError(INVALID_PARAMS, "the nonce must be 8 to 64 bytes, hex-encoded")
        try:
            resp = await self.state.enclave.attest(nonce)
        except (EnclaveUnavailable, EnclaveRefused) as exc:
            raise MCPError(ENCLAVE_UNAVAILABLE, f"the enclave is unavailable: {exc}") from exc
        body = json.dumps({"document": base64.b64encode(resp.document).decode("ascii"), "nonce": nonce.hex()})
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="application/json", text=body)]
        )
