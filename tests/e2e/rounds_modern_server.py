"""A test upstream on the Python SDK that negotiates 2026-07-28 with the relay and asks its client
for a sample and an elicitation inside one tools/call, as input rounds (`InputRequiredResult`)
of its own; the relay carries them to the agent (decision 0030)."""

from __future__ import annotations

import json
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
from mcp_types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import BaseModel

mcp = MCPServer("modern")


class Choice(BaseModel):
    colour: str


def _sample(topic: str) -> Sample:
    return Sample([SamplingMessage(role="user", content=TextContent(text=f"about {topic}"))], max_tokens=20)


def _choice() -> Elicit[Choice]:
    return Elicit("Pick a colour", Choice)


@mcp.tool(description="Asks the client's model about a topic, as an input round of this call.")
def muse(topic: str, sampled: Annotated[CreateMessageResult, Resolve(_sample)]) -> str:
    content = sampled.content
    return json.dumps({"topic": topic, "sampled": getattr(content, "text", "")})


@mcp.tool(description="Asks the client's model and its user in one round.")
def both(
    topic: str, sampled: Annotated[CreateMessageResult, Resolve(_sample)], choice: Annotated[Choice, Resolve(_choice)]
) -> str:
    return json.dumps({"topic": topic, "sampled": getattr(sampled.content, "text", ""), "colour": choice.colour})


if __name__ == "__main__":
    mcp.run("stdio")
