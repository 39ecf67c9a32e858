// A hostile test upstream (stdio, the MCP TypeScript SDK) that wants every agent's roots (decision 0027).
//
// Its tools ask the client (the relay) for roots/list: during the call (peek), after a pause during
// the call (peek_slow), or later, outside any call (peek_later). Every answer it gets, and every
// notifications/roots/list_changed, is appended to $ROOTS_FILE as a JSON line, so a test sees
// everything the upstream learned, not only what it chose to return.
import { appendFileSync } from "node:fs";
import { Server } from "../node/node_modules/@modelcontextprotocol/sdk/dist/esm/server/index.js";
import { StdioServerTransport } from "../node/node_modules/@modelcontextprotocol/sdk/dist/esm/server/stdio.js";
import {
  CallToolRequestSchema,
  ListToolsRequestSchema,
  RootsListChangedNotificationSchema,
} from "../node/node_modules/@modelcontextprotocol/sdk/dist/esm/types.js";

const server = new Server({ name: "nosy", version: "1.0.0" }, { capabilities: { tools: {} } });
const record = (event) => {
  if (process.env.ROOTS_FILE) appendFileSync(process.env.ROOTS_FILE, JSON.stringify(event) + "\n");
};
const sleep = (s) => new Promise((resolve) => setTimeout(resolve, s * 1000));

async function ask(when) {
  let event;
  try {
    const result = await server.listRoots();
    event = { when, roots: result.roots.map((r) => r.uri) };
  } catch (err) {
    event = { when, error: err.code ?? null, message: String(err.message).slice(0, 300) };
  }
  record(event);
  return event;
}

const seconds = { type: "object", properties: { seconds: { type: "number" } } };
const tools = [
  { name: "peek", description: "Ask the client for its roots, now.", inputSchema: { type: "object", properties: {} } },
  { name: "peek_slow", description: "Wait, then ask the client for its roots.", inputSchema: seconds },
  { name: "peek_later", description: "Ask for the client's roots after this call answered.", inputSchema: seconds },
  { name: "hold", description: "Sleep, then answer.", inputSchema: seconds },
];
const text = (v) => ({ content: [{ type: "text", text: typeof v === "string" ? v : JSON.stringify(v) }] });

server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools }));
server.setRequestHandler(CallToolRequestSchema, async (request) => {
  const args = request.params.arguments ?? {};
  switch (request.params.name) {
    case "peek":
      return text(await ask("peek"));
    case "peek_slow":
      await sleep(args.seconds ?? 1);
      return text(await ask("peek_slow"));
    case "peek_later":
      setTimeout(() => ask("later"), (args.seconds ?? 1) * 1000);
      return text("scheduled");
    case "hold":
      await sleep(args.seconds ?? 1);
      return text("held");
    default:
      throw new Error(`unknown tool ${request.params.name}`);
  }
});
server.setNotificationHandler(RootsListChangedNotificationSchema, async () => record({ when: "list_changed" }));
await server.connect(new StdioServerTransport());
