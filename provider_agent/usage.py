"""Token usage, read off an engine's stream in any of the four event formats. Pure.

Chat and completions carry ``usage`` in a last chunk (asked for with
``stream_options.include_usage``); Responses in ``response.completed``; Anthropic
streams split it between ``message_start`` (input) and ``message_delta`` (output).
"""

from __future__ import annotations

from typing import Any

import attrs

from coordinator.protocol.messages import MAX_USAGE_TOKENS


def _count(value: Any) -> int | None:
    """A token count, or None for anything that is not one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_USAGE_TOKENS:
        return None
    return value


@attrs.define
class UsageCount:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def see(self, event: dict[str, Any]) -> None:
        """Take in what ``event`` says of the usage, whatever its format."""
        match event.get("type"):
            case "response.completed" | "response.incomplete":
                response = event.get("response")
                usage = response.get("usage") if isinstance(response, dict) else None
                self._take(usage, "input_tokens", "output_tokens")
            case "message_start":
                message = event.get("message")
                usage = message.get("usage") if isinstance(message, dict) else None
                self._take(usage, "input_tokens", "output_tokens")
            case "message_delta":
                self._take(event.get("usage"), "input_tokens", "output_tokens")
            case _:
                self._take(event.get("usage"), "prompt_tokens", "completion_tokens")

    def _take(self, usage: Any, prompt: str, completion: str) -> None:
        if not isinstance(usage, dict):
            return
        if (count := _count(usage.get(prompt))) is not None:
            self.prompt_tokens = count
        if (count := _count(usage.get(completion))) is not None:
            self.completion_tokens = count
