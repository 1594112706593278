"""An MCP client for the tests, on the official Python SDK (`mcp`): connects to RuntimeAI's MCP
server, lists its tools, makes the calls it is given, and prints what it saw as JSON.

    usage: mcp_client.py http <url> <token> <ca file> <calls (JSON)>
           mcp_client.py stdio <token> <ca file> <calls (JSON)> <command> [args...]

Calls are `[{"name": ..., "arguments": {...}}, ...]`; each result is printed as the wire shows
it (`isError`, `structuredContent`, `content`), with the progress notifications it brought.
"""
import asyncio
import json
import os
import sys

import httpx
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client


async def session_run(read, write, calls):
    async with ClientSession(read, write) as session:
        init = await session.initialize()
        tools = await session.list_tools()
        seen = {
            "server": init.serverInfo.name,
            "protocol": init.protocolVersion,
            "tools": [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.tools],
            "results": [],
        }
        for call in calls:
            progress = []

            async def on_progress(done, total, message, progress=progress):
                progress.append({"progress": done, "total": total, "message": message})

            try:
                result = await session.call_tool(call["name"], call.get("arguments") or {},
                                                 progress_callback=on_progress)
                answer = result.model_dump(mode="json", by_alias=True, exclude_none=True)
            except Exception as e:  # a protocol error, not a tool error
                answer = {"protocolError": str(e)}
            answer["progress"] = progress
            seen["results"].append(answer)
        return seen


async def main():
    mode = sys.argv[1]
    if mode == "http":
        url, token, ca, calls = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(headers=headers, verify=ca, timeout=httpx.Timeout(30, read=330)) as http:
            async with streamable_http_client(url, http_client=http) as (read, write, _):
                seen = await session_run(read, write, calls)
    else:
        token, ca, calls, command = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
        env = dict(os.environ, RUNTIMEAI_TOKEN=token)
        server = StdioServerParameters(command=command[0], args=command[1:] + ["--ca", ca], env=env)
        async with stdio_client(server) as (read, write):
            seen = await session_run(read, write, calls)
    print(json.dumps(seen))


asyncio.run(main())
