// An agent on the MCP TypeScript SDK (1.32.2) using its own task API through Cloister (decision 0029):
// `client.experimental.tasks.callToolStream` (a task-augmented tools/call, polled with tasks/get, its
// payload fetched with tasks/result, an elicitation answered on the way), then tasks/list, and
// tasks/get of a task id it was never given; notifications/tasks/status recorded. Prints one JSON
// object: what it saw.
//
// Usage: node tasks_client.mjs <mcp url> <bearer token> <topic> <ambiguous: 0|1> [foreign task id]
import { Client } from "../node/node_modules/@modelcontextprotocol/sdk/dist/esm/client/index.js";
import { StreamableHTTPClientTransport } from "../node/node_modules/@modelcontextprotocol/sdk/dist/esm/client/streamableHttp.js";
import {
  CallToolResultSchema,
  ElicitRequestSchema,
  TaskStatusNotificationSchema,
} from "../node/node_modules/@modelcontextprotocol/sdk/dist/esm/types.js";

const [url, token, topic, ambiguous, foreign] = process.argv.slice(2);
const client = new Client({ name: "tasks-agent", version: "1.0.0" }, { capabilities: { elicitation: {} } });
const out = { messages: [], elicited: [], text: "", taskIds: [], listed: [], foreign: null, capabilities: null, statuses: [] };
client.setNotificationHandler(TaskStatusNotificationSchema, async (n) => {
  out.statuses.push({ taskId: n.params.taskId, status: n.params.status });
});
client.setRequestHandler(ElicitRequestSchema, async (request) => {
  out.elicited.push(request.params._meta ?? {});
  return { action: "accept", content: { interpretation: "comedy" } };
});
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
await client.connect(transport);
out.capabilities = client.getServerCapabilities()?.tasks ?? null;
await client.listTools(); // the SDK learns which tools are tasks (execution.taskSupport)
const stream = client.experimental.tasks.callToolStream(
  { name: "everything___simulate-research-query", arguments: { topic, ambiguous: ambiguous === "1" } },
  CallToolResultSchema,
  { task: { ttl: 60000 } },
);
for await (const message of stream) {
  out.messages.push(message.type);
  if (message.type === "taskCreated" || message.type === "taskStatus") out.taskIds.push(message.task.taskId);
  if (message.type === "result") out.text = message.result.content?.[0]?.text ?? "";
  if (message.type === "error") out.error = String(message.error);
}
out.listed = (await client.experimental.tasks.listTasks()).tasks.map((t) => t.taskId);
await new Promise((resolve) => setTimeout(resolve, 300)); // a last status may trail the result
if (foreign) {
  try {
    await client.experimental.tasks.getTask(foreign);
    out.foreign = "answered";
  } catch (error) {
    out.foreign = { code: error.code, message: String(error.message) };
  }
}
console.log(JSON.stringify(out));
await client.close();
