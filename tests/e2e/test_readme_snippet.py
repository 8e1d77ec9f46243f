"""The README's supabase-js snippet, run as written against a live server.

The snippet is read from README.md (the first ``js`` block under "Connecting
supabase-js"), pointed at the test server with the session's anon key, and
run by node from tests/e2e/js (where supabase-js is installed). On Node 20
the README says to pass ``ws`` as the transport; the test applies exactly that
change, and checks that without it the client stops with the message the
README quotes.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_supabase_js import JS_DIR, _tool, node_modules  # noqa: F401 (fixture)
from tests.fixtures.server import ServerProcess

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
NODE_20_TRANSPORT = "{ realtime: { transport: WebSocket } }"
WAIT_S = 20.0


def readme_snippet() -> str:
    text = README.read_text()
    section = text.split("## Connecting supabase-js", 1)[1]
    match = re.search(r"```js\n(.*?)```", section, re.DOTALL)
    assert match, "README.md has no js block under 'Connecting supabase-js'"
    return match.group(1)


def node_major() -> int:
    version = subprocess.run([_tool("node"), "--version"], capture_output=True, text=True, check=True).stdout
    return int(version.strip().lstrip("v").split(".")[0])


def for_node_20(snippet: str) -> str:
    """The README's Node 20 instruction: ``ws`` as the transport."""
    assert "createClient('http://127.0.0.1:8000', ANON_KEY)" in snippet
    assert NODE_20_TRANSPORT in README.read_text(), "the README no longer documents the Node 20 transport"
    snippet = snippet.replace("ANON_KEY)", f"ANON_KEY, {NODE_20_TRANSPORT})", 1)
    return "import WebSocket from 'ws'\n" + snippet


async def run_snippet(source: str, server: ServerProcess, anon_key: str, expect: str) -> str:
    """Run ``source`` until a line of its output contains ``expect``; return that output."""
    source = source.replace("http://127.0.0.1:8000", server.url)
    lines = source.splitlines()
    imports = [line for line in lines if line.startswith("import ")]
    body = [line for line in lines if not line.startswith("import ")]
    script = JS_DIR / f".readme-snippet-{uuid.uuid4().hex[:8]}.mjs"
    script.write_text("\n".join([*imports, f"const ANON_KEY = {anon_key!r}", *body]) + "\n")
    process = await asyncio.create_subprocess_exec(
        _tool("node"), script.name, cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = ""
    try:
        assert process.stdout is not None
        while expect not in output:
            line = await asyncio.wait_for(process.stdout.readline(), WAIT_S)
            if not line:
                break
            output += line.decode("utf-8", "replace")
        return output
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        script.unlink(missing_ok=True)


async def test_the_readme_snippet_receives_its_own_broadcast(
    realtime_server: ServerProcess, anon_key: str, node_modules: Path  # noqa: F811
) -> None:
    snippet = readme_snippet()
    if node_major() < 22:
        failed = await run_snippet(snippet, realtime_server, anon_key, "native WebSocket not found")
        assert "Node.js detected but native WebSocket not found" in failed, failed
        snippet = for_node_20(snippet)
    output = await run_snippet(snippet, realtime_server, anon_key, "x: 1")
    assert "{ x: 1 }" in output, output
