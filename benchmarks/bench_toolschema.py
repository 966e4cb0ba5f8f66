"""Tool-schema normalization: the no-op path and the repair path, in microseconds.

Run: ``python -m benchmarks.bench_toolschema`` (or ``nox -s bench``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from coordinator.toolschema import normalize_tool_schemas


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples), min(samples)


def _ten_tool_body() -> bytes:
    tools = []
    for i in range(10):
        tools.append({"type": "function", "function": {
            "name": f"tool_{i}", "description": "A typical Pydantic-generated tool.",
            "parameters": {"type": "object", "title": f"Tool{i}", "required": ["query"],
                           "properties": {
                               "query": {"type": "string", "description": "what to look up"},
                               "limit": {"type": ["integer", "null"], "default": None},
                               "mode": {"anyOf": [{"enum": ["a", "b"]}, {"type": "null"}]},
                               "filters": {"type": ["array", "null"],
                                           "items": {"type": "object", "properties": {
                                               "field": {"type": "string"},
                                               "value": {"description": "any"}}}}}}}})
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "tools": tools}).encode()


def main() -> dict[str, float]:
    big = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "x" * (1024 * 1024 - 100)}]}).encode()
    typical = _ten_tool_body()
    assert normalize_tool_schemas(big) is big
    assert normalize_tool_schemas(typical) != typical
    noop_med, noop_min = _time(lambda: normalize_tool_schemas(big), 200)
    fix_med, fix_min = _time(lambda: normalize_tool_schemas(typical), 500)
    results = {"noop_1mib_median_us": noop_med, "noop_1mib_min_us": noop_min,
               "repair_10_tools_median_us": fix_med, "repair_10_tools_min_us": fix_min,
               "repair_body_bytes": len(typical)}
    print("tool-schema normalization")
    print(f"  no-op, 1 MiB body without tools : median {noop_med:8.1f} us  (min {noop_min:.1f})")
    print(f"  repair, 10-tool body ({len(typical)} B): median {fix_med:8.1f} us  (min {fix_min:.1f})")
    return results


if __name__ == "__main__":
    main()
