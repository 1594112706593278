// An MCP client for the tests, on the official TypeScript SDK (@modelcontextprotocol/sdk):
// connects over Streamable HTTP, lists the tools, makes the calls it is given, prints JSON.
//   usage: node mcp_client.mjs <url> <token> <calls (JSON)>   (the CA in NODE_EXTRA_CA_CERTS)
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, calls] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "runtimeai-tests", version: "1.0.0" });
await client.connect(transport);
const { tools } = await client.listTools();
const results = [];
for (const call of JSON.parse(calls)) {
  results.push(await client.callTool({ name: call.name, arguments: call.arguments ?? {} }));
}
console.log(JSON.stringify({ server: client.getServerVersion()?.name, tools, results }));
await client.close();
