"""Request traits, read once from the parsed body: what routing must honour.

The breaker *shape* is derived from the traits so that a failure only tool
calls trigger quarantines only tool-call traffic on that (provider, model).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from coordinator.capabilities import TRAIT_NAMES

# Content-part / block types that carry media, across chat, Responses and
# Anthropic shapes.
MEDIA_PART_TYPES: Final = frozenset(
    {"image_url", "image", "input_image", "video", "video_url", "input_video"}
)
_MAX_SCAN_DEPTH: Final = 12


@attrs.frozen
class Traits:
    has_tools: bool = False
    requires_vision: bool = False
    # Derived once, not per call: the gate asks for both for every provider it looks at.
    names: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    """Trait names, as used by the capability-floor table."""
    shape: str = attrs.field(init=False, eq=False, repr=False)
    """``base``, ``tools``, ``vision`` or ``tools+vision``."""

    @names.default
    def _names(self) -> tuple[str, ...]:
        tools, vision = TRAIT_NAMES
        return tuple(n for n, on in ((tools, self.has_tools), (vision, self.requires_vision)) if on)

    @shape.default
    def _shape(self) -> str:
        return "+".join(self.names) or "base"


def _is_media_part(node: dict[str, Any]) -> bool:
    kind = node.get("type")  # any JSON value: a list or an object is not hashable
    return isinstance(kind, str) and kind in MEDIA_PART_TYPES


def _has_media(node: Any, depth: int = 0) -> bool:
    if depth > _MAX_SCAN_DEPTH:
        return False
    if isinstance(node, dict):
        if _is_media_part(node):
            return True
        return any(_has_media(v, depth + 1) for v in node.values())
    if isinstance(node, list):
        return any(_has_media(v, depth + 1) for v in node)
    return False


def traits_of(body: dict[str, Any]) -> Traits:
    """Traits of a parsed request body of any supported endpoint."""
    tools = body.get("tools")
    conversation = [body.get(k) for k in ("messages", "input", "prompt", "system")]
    return Traits(
        has_tools=isinstance(tools, list) and len(tools) > 0,
        requires_vision=_has_media(conversation),
    )


LOW_DETAIL_IMAGE_TOKENS: Final = 85
_TOKEN_SCAN_DEPTH: Final = 32


def estimate_prompt_tokens(body: dict[str, Any], image_tokens: int = 765) -> int:
    """A cheap prompt-size estimate for the TTFT budget and the scheduler.

    Text counts about four characters per token; each image or video part
    counts ``image_tokens`` (``LOW_DETAIL_IMAGE_TOKENS`` at ``"detail": "low"``),
    never its bytes: a 300 KB data URL is one image, not 75,000 tokens of text,
    and an image given by URL is not free.
    """
    chars, media = 0, 0
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            chars += len(node)
        elif depth >= _TOKEN_SCAN_DEPTH:
            continue
        elif isinstance(node, dict):
            if _is_media_part(node):
                media += _media_tokens(node, image_tokens)
                continue
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return max(1, chars // 4 + media)


def _media_tokens(part: dict[str, Any], image_tokens: int) -> int:
    details = [part.get("detail")]
    for key in ("image_url", "video_url"):
        inner = part.get(key)
        if isinstance(inner, dict):
            details.append(inner.get("detail"))
    return LOW_DETAIL_IMAGE_TOKENS if "low" in details else image_tokens
