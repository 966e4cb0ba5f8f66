"""Non-streaming responses: assemble the winner's streamed events into one body.

Providers always stream; for ``stream: false`` the coordinator keeps the
deferred-commit and failover machinery and builds the single response here.
"""

from __future__ import annotations

from typing import Any

from coordinator.protocol import Usage, boundedjson
from coordinator.protocol.endpoints import Endpoint


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _index(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def assemble(endpoint: Endpoint, events: list[dict[str, Any]], usage: Usage,
             request_id: str) -> dict[str, Any]:
    """One response body from a stream's events. Total: odd fields are skipped, not fatal."""
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
        for choice in _dicts(event.get("choices")):
            delta = _dict(choice.get("delta"))
            text.append(_str(delta.get("content")))
            for call in _dicts(delta.get("tool_calls")):
                slot = tool_calls.setdefault(_index(call.get("index"), 0), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if _str(call.get("id")):
                    slot["id"] = call["id"]
                fn = _dict(call.get("function"))
                slot["function"]["name"] += _str(fn.get("name"))
                slot["function"]["arguments"] += _str(fn.get("arguments"))
            finish = _str(choice.get("finish_reason")) or finish
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
        for choice in _dicts(event.get("choices")):
            text.append(_str(choice.get("text")))
            finish = _str(choice.get("finish_reason")) or finish
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
    text = "".join(_str(e.get("delta")) for e in events
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
            index = _index(event.get("index"), len(blocks))
            blocks[index] = dict(_dict(event.get("content_block")))
        elif kind == "content_block_delta":
            index = _index(event.get("index"), 0)
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            delta = _dict(event.get("delta"))
            if delta.get("type") == "text_delta":
                block["text"] = _str(block.get("text")) + _str(delta.get("text"))
            elif delta.get("type") == "input_json_delta":
                partial_json.setdefault(index, []).append(_str(delta.get("partial_json")))
        elif kind == "message_delta":
            delta = _dict(event.get("delta"))
            message["stop_reason"] = delta.get("stop_reason", message["stop_reason"])
            message["stop_sequence"] = delta.get("stop_sequence")
    for index, parts in partial_json.items():
        try:
            blocks[index]["input"] = boundedjson.loads("".join(parts) or "{}", max_depth=64)
        except boundedjson.JsonLimitError:
            blocks[index]["input"] = {}
    message["content"] = [blocks[i] for i in sorted(blocks)]
    message["usage"] = {"input_tokens": usage.prompt_tokens,
                        "output_tokens": usage.completion_tokens}
    return message
