"""Template-render self-check: can this model's chat template render what we will send?

At scan time a provider renders every chat template a model snapshot ships
against canonical fixtures and advertises the verdict as ``template_render_ok``:
``None`` when the snapshot ships no template, ``False`` when any template fails
to compile or render any fixture, ``True`` otherwise. ``False`` fences the model
off this provider in the coordinator before it serves a single request.

Templates come from ``chat_template.jinja``, ``chat_template.json`` and
``tokenizer_config.json`` (``chat_template`` as a string or as a list of
``{name, template}``). They compile in Jinja2's sandbox with trim/lstrip
blocks and the provider runtime's strict semantics: undefined is an error and
``upper``/``lower`` on a non-string are errors (the incident's crash).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from coordinator.untrusted import printable

log = logging.getLogger(__name__)


class TemplateRenderError(Exception):
    pass


def _strict_string_filter(name: str) -> Any:
    def apply(value: Any) -> str:
        if not isinstance(value, str):
            raise TemplateRenderError(f"{name} filter requires string")
        return value.upper() if name == "upper" else value.lower()

    return apply


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(message)


def make_environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.StrictUndefined)
    env.filters["upper"] = _strict_string_filter("upper")
    env.filters["lower"] = _strict_string_filter("lower")
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    return env


def collect_templates(snapshot: Path) -> dict[str, str]:
    """Every chat template the snapshot ships, by a name saying where it came from."""
    found: dict[str, str] = {}
    jinja_file = snapshot / "chat_template.jinja"
    if jinja_file.is_file():
        found["chat_template.jinja"] = jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = snapshot / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, str):
            found[name] = template
        elif isinstance(template, list):
            for entry in template:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    found[f"{name}:{entry.get('name', 'default')}"] = entry["template"]
    return found


def _special_tokens(snapshot: Path) -> dict[str, str]:
    tokens = {"bos_token": "", "eos_token": ""}
    path = snapshot / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        data = {}
    for key, value in data.items() if isinstance(data, dict) else ():
        if key.endswith("_token"):
            if isinstance(value, dict):
                value = value.get("content", "")
            if isinstance(value, str):
                tokens[key] = value
    return tokens


def is_vision_snapshot(snapshot: Path) -> bool:
    try:
        config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "vision_config" in config


# Tools in post-normalization shape: every parameter has a string type.
_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["c", "f"], "nullable": True},
        "days": {"type": "integer", "nullable": True}}}}}]


def fixtures(vision: bool) -> dict[str, dict[str, Any]]:
    """Canonical render inputs; media parts only for vision models."""
    out: dict[str, dict[str, Any]] = {
        "plain": {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hello"}],
                  "add_generation_prompt": True},
        "tool_flow": {"tools": _TOOLS, "add_generation_prompt": True, "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
             "content": "18C, sunny"}]},
        "empty_assistant_tail": {"add_generation_prompt": False, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
    }
    if vision:
        out["image"] = {"add_generation_prompt": True, "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is this?"}]}]}
        out["video"] = {"add_generation_prompt": True, "messages": [{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": "What happens?"}]}]}
    return out


def render(template: str, context: Mapping[str, Any], tokens: Mapping[str, str]) -> str:
    """Render one template with the runtime's strict semantics (raises on failure)."""
    compiled = make_environment().from_string(template)
    # Like the runtime's apply_chat_template: these are always defined.
    defaults = {"tools": None, "add_generation_prompt": False, "documents": None,
                "bos_token": "", "eos_token": ""}
    return compiled.render(**{**defaults, **tokens, **context})


def check_snapshot(snapshot: Path | str) -> bool | None:
    """Tri-state verdict for a model snapshot directory. Never raises."""
    try:
        path = Path(snapshot)
        return check_templates(collect_templates(path), _special_tokens(path),
                               is_vision_snapshot(path), where=path.name)
    except Exception as exc:  # unreadable snapshot: a failed check, not a crash
        log.warning("template check of %s failed: %s", printable(str(snapshot)),
                    printable(str(exc)))
        return False


def check_templates(templates: Mapping[str, str], tokens: Mapping[str, str], vision: bool,
                    *, where: str = "the model") -> bool | None:
    """Tri-state verdict for chat templates (by name): None when there are none, False
    when any fails to compile or to render any fixture, True otherwise. Never raises."""
    if not templates:
        return None
    cases = fixtures(vision)
    for name, source in templates.items():
        for case, context in cases.items():
            try:
                render(source, context, tokens)
            except Exception as exc:  # any compile or render failure fences the model
                # Templates are outside text: one may quote anything.
                log.warning("template %s of %s fails fixture %s: %s", printable(name),
                            printable(where), case, printable(str(exc)))
                return False
    return True
