"""What a simulated model says, in each endpoint's native streaming format.

A transcript is three lists of JSON payloads: the preamble (boilerplate a real
backend emits before any token), the content events, and the closing events.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from coordinator.protocol.endpoints import Endpoint

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def _dump(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def words_for(model: str, provider_id: str, count: int) -> list[str]:
    base = f"Hello from {model} on {provider_id}. This is a simulated answer".split()
    out = []
    for i in range(count):
        word = base[i % len(base)]
        out.append(word if i == 0 else " " + word)
    return out


def _tool_name(body: dict[str, Any]) -> str | None:
    """Call a tool only when the request insists, so plain tool-bearing chats get text."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice in (None, "auto", "none"):
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    fn = first.get("function") if isinstance(first.get("function"), dict) else first
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else "tool"


@attrs.frozen
class Transcript:
    preamble: list[str]
    content: list[str]
    closing: list[str]


def transcript(endpoint: str, body: dict[str, Any], words: list[str], rid: str) -> Transcript:
    model = str(body.get("model", ""))
    tool = _tool_name(body)
    match endpoint:
        case "/v1/completions":
            return _completions(model, words, rid)
        case "/v1/responses":
            return _responses(model, words, rid)
        case "/v1/messages":
            return _messages(model, words, rid, tool)
        case _:
            usage = isinstance(body.get("stream_options"), dict) and bool(
                body["stream_options"].get("include_usage"))
            return _chat(model, words, rid, tool, usage)


def _chat(model: str, words: list[str], rid: str, tool: str | None, usage: bool) -> Transcript:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _dump({"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": 0,
                      "model": model, "choices": [{"index": 0, "delta": delta,
                                                   "finish_reason": finish}]})

    if tool is not None:
        content = [
            chunk({"tool_calls": [{"index": 0, "id": f"call_{rid}", "type": "function",
                                   "function": {"name": tool, "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]}),
        ]
        finish = "tool_calls"
    else:
        content = [chunk({"content": w}) for w in words]
        finish = "stop"
    closing = [chunk({}, finish)]
    if usage:
        closing.append(_dump({"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk",
                              "created": 0, "model": model, "choices": [],
                              "usage": {"prompt_tokens": 10, "completion_tokens": len(words),
                                        "total_tokens": 10 + len(words)}}))
    return Transcript([chunk({"role": "assistant", "content": ""})], content, closing)


def _completions(model: str, words: list[str], rid: str) -> Transcript:
    def chunk(text: str, finish: str | None = None) -> str:
        return _dump({"id": f"cmpl-{rid}", "object": "text_completion", "created": 0,
                      "model": model, "choices": [{"index": 0, "text": text,
                                                   "finish_reason": finish, "logprobs": None}]})

    return Transcript([chunk("")], [chunk(w) for w in words], [chunk("", "stop")])


def _responses(model: str, words: list[str], rid: str) -> Transcript:
    seq = iter(range(10_000))
    rid_ = f"resp_{rid}"
    item = f"msg_{rid}"

    def response(status: str, text: str | None) -> dict[str, Any]:
        output = [] if text is None else [{
            "type": "message", "id": item, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        return {"id": rid_, "object": "response", "created_at": 0, "status": status,
                "model": model, "output": output, "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": [],
                "usage": None if text is None else {
                    "input_tokens": 10, "output_tokens": len(words), "total_tokens": 10 + len(words),
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}}}

    def event(kind: str, **fields: Any) -> str:
        return _dump({"type": kind, "sequence_number": next(seq), **fields})

    text = "".join(words)
    part = {"type": "output_text", "text": "", "annotations": []}
    preamble = [event("response.created", response=response("in_progress", None)),
                event("response.in_progress", response=response("in_progress", None))]
    content = [
        event("response.output_item.added", output_index=0, item={
            "type": "message", "id": item, "status": "in_progress", "role": "assistant",
            "content": []}),
        event("response.content_part.added", item_id=item, output_index=0, content_index=0,
              part=part),
        *(event("response.output_text.delta", item_id=item, output_index=0, content_index=0,
                delta=w, logprobs=[]) for w in words),
    ]
    closing = [
        event("response.output_text.done", item_id=item, output_index=0, content_index=0,
              text=text, logprobs=[]),
        event("response.content_part.done", item_id=item, output_index=0, content_index=0,
              part={**part, "text": text}),
        event("response.output_item.done", output_index=0, item={
            "type": "message", "id": item, "status": "completed", "role": "assistant",
            "content": [{**part, "text": text}]}),
        event("response.completed", response=response("completed", text)),
    ]
    return Transcript(preamble, content, closing)


def _messages(model: str, words: list[str], rid: str, tool: str | None) -> Transcript:
    preamble = [
        _dump({"type": "message_start", "message": {
            "id": f"msg_{rid}", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        _dump({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}),
        _dump({"type": "ping"}),
    ]
    content = [_dump({"type": "content_block_delta", "index": 0,
                      "delta": {"type": "text_delta", "text": w}}) for w in words]
    closing = [_dump({"type": "content_block_stop", "index": 0})]
    stop = "end_turn"
    if tool is not None:
        stop = "tool_use"
        closing += [
            _dump({"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": f"toolu_{rid}", "name": tool, "input": {}}}),
            _dump({"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": '{"x": 1}'}}),
            _dump({"type": "content_block_stop", "index": 1}),
        ]
    closing += [
        _dump({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
               "usage": {"output_tokens": len(words)}}),
        _dump({"type": "message_stop"}),
    ]
    return Transcript(preamble, content, closing)


def final_body(endpoint: Endpoint, body: dict[str, Any], done: Any, rid: str) -> dict[str, Any]:
    """The whole (non-streaming) answer in ``endpoint``'s shape; ``done`` is a script Complete."""
    model = str(body.get("model", ""))
    tokens = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
              "total_tokens": done.prompt_tokens + done.completion_tokens}
    tool = _tool_name(body)
    match endpoint:
        case Endpoint.COMPLETIONS:
            return {"id": f"cmpl-{rid}", "object": "text_completion", "created": 0,
                    "model": model, "usage": tokens, "choices": [
                        {"index": 0, "text": done.text, "finish_reason": "stop",
                         "logprobs": None}]}
        case Endpoint.RESPONSES:
            return {"id": f"resp_{rid}", "object": "response", "created_at": 0,
                    "status": "completed", "model": model, "output": [{
                        "type": "message", "id": f"msg_{rid}", "status": "completed",
                        "role": "assistant", "content": [
                            {"type": "output_text", "text": done.text, "annotations": []}]}],
                    "usage": {"input_tokens": done.prompt_tokens,
                              "output_tokens": done.completion_tokens,
                              "total_tokens": tokens["total_tokens"]}}
        case Endpoint.MESSAGES:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": done.text}]
            if tool is not None:
                blocks.append({"type": "tool_use", "id": f"toolu_{rid}", "name": tool,
                               "input": {"x": 1}})
            return {"id": f"msg_{rid}", "type": "message", "role": "assistant", "model": model,
                    "content": blocks, "stop_reason": "tool_use" if tool else "end_turn",
                    "stop_sequence": None, "usage": {"input_tokens": done.prompt_tokens,
                                                     "output_tokens": done.completion_tokens}}
        case _:
            message: dict[str, Any] = {"role": "assistant", "content": done.text or None}
            if tool is not None:
                message["tool_calls"] = [{"id": f"call_{rid}", "type": "function",
                                          "function": {"name": tool, "arguments": '{"x": 1}'}}]
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 0,
                    "model": model, "usage": tokens, "choices": [{
                        "index": 0, "message": message, "logprobs": None,
                        "finish_reason": "tool_calls" if tool else "stop"}]}
