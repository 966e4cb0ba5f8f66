"""Non-streaming responses: assemble the winner's streamed events into one body.

Providers always stream; for ``stream: false`` the coordinator keeps the
deferred-commit and failover machinery and builds the single response here.
"""

from __future__ import annotations

import json
from typing import Any

from coordinator.dispatch.chunks import Endpoint
from coordinator.protocol import Usage


def _events(chunks: list[str]) -> list[dict[str, Any]]:
    out = []
    for chunk in chunks:
        try:
            event = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def assemble(endpoint: Endpoint, chunks: list[str], usage: Usage, request_id: str) -> dict[str, Any]:
    events = _events(chunks)
    match endpoint:
        case Endpoint.CHAT:
            return _chat(events, usage, request_id)
        case Endpoint.COMPLETIONS:
            return _completions(events, usage, request_id)
        case Endpoint.RESPONSES:
            return _responses(events, usage, request_id)
        case Endpoint.MESSAGES:
            return _messages(events, usage, request_id)


def _openai_usage(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _chat(events: list[dict[str, Any]], usage: Usage, request_id: str) -> dict[str, Any]:
    text: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    first = events[0] if events else {}
    for event in events:
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = tool_calls.setdefault(int(call.get("index", 0)), {
                    "id": call.get("id"), "type": "function",
                    "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if tool_calls:
        message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": first.get("id", f"chatcmpl-{request_id}"),
        "object": "chat.completion",
        "created": first.get("created", 0),
        "model": first.get("model", ""),
        "choices": [{"index": 0, "message": message, "finish_reason": finish or "stop",
                     "logprobs": None}],
        "usage": _openai_usage(usage),
    }


def _completions(events: list[dict[str, Any]], usage: Usage, request_id: str) -> dict[str, Any]:
    first = events[0] if events else {}
    text, finish = [], None
    for event in events:
        for choice in event.get("choices") or ():
            if isinstance(choice.get("text"), str):
                text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
    return {
        "id": first.get("id", f"cmpl-{request_id}"),
        "object": "text_completion",
        "created": first.get("created", 0),
        "model": first.get("model", ""),
        "choices": [{"index": 0, "text": "".join(text), "finish_reason": finish or "stop",
                     "logprobs": None}],
        "usage": _openai_usage(usage),
    }


def _responses(events: list[dict[str, Any]], usage: Usage, request_id: str) -> dict[str, Any]:
    for event in reversed(events):
        if event.get("type") == "response.completed" and isinstance(event.get("response"), dict):
            response: dict[str, Any] = event["response"]
            return response
    text = "".join(e.get("delta", "") for e in events
                   if e.get("type") == "response.output_text.delta")
    return {
        "id": f"resp_{request_id}", "object": "response", "created_at": 0,
        "status": "completed", "model": "",
        "output": [{"type": "message", "id": f"msg_{request_id}", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens},
    }


def _messages(events: list[dict[str, Any]], usage: Usage, request_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": f"msg_{request_id}", "type": "message", "role": "assistant", "model": "",
        "content": [], "stop_reason": None, "stop_sequence": None,
    }
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, list[str]] = {}
    for event in events:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message.update({k: v for k, v in event["message"].items() if k != "content"})
        elif kind == "content_block_start":
            index = int(event.get("index", len(blocks)))
            blocks[index] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta":
            index = int(event.get("index", 0))
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                partial_json.setdefault(index, []).append(delta.get("partial_json", ""))
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            message["stop_reason"] = delta.get("stop_reason", message["stop_reason"])
            message["stop_sequence"] = delta.get("stop_sequence")
    for index, parts in partial_json.items():
        try:
            blocks[index]["input"] = json.loads("".join(parts) or "{}")
        except ValueError:
            blocks[index]["input"] = {}
    message["content"] = [blocks[i] for i in sorted(blocks)]
    message["usage"] = {"input_tokens": usage.prompt_tokens,
                        "output_tokens": usage.completion_tokens}
    return message
