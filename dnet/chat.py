"""`dnet chat`: a small interactive chat in the terminal, against any node's API."""

from __future__ import annotations

import json
import sys

import httpx
from rich.console import Console

from dnet.status import MeshNotFound, api_headers, find_api

HELP = "Type a message; /reset forgets the conversation, /quit (or Ctrl-D) leaves."


def run_chat(api: str | None, host: str | None, max_tokens: int, temperature: float,
             system: str | None) -> int:
    console = Console(highlight=False)
    try:
        url = find_api(api, host)
    except MeshNotFound as exc:
        print(f"dnet chat: {exc}", file=sys.stderr)
        return 1
    headers = api_headers()
    console.print(f"[dim]dnet chat with {url}. {HELP}[/]")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            del history[1 if system else 0:]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        console.print("[bold green]model>[/] ", end="")
        try:
            answer = _stream_answer(console, url, headers, history, max_tokens, temperature)
        except (httpx.HTTPError, RuntimeError) as exc:
            console.print(f"\n[red]error: {exc}[/]")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def _stream_answer(console: Console, url: str, headers: dict[str, str],
                   history: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
    body = {"messages": history, "stream": True, "max_tokens": max_tokens,
            "temperature": temperature}
    parts: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=httpx.Timeout(10, read=600)) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(response.json().get("error", {}).get("message", response.text))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") or ""
                parts.append(text)
                console.print(text, end="", markup=False, highlight=False)
    console.print()
    return "".join(parts)
