"""The coordinator's own error hierarchy. Each error carries the HTTP status it becomes.

Errors are mapped to these at the edges (HTTP parsing, registry answers,
provider failures) and rendered into OpenAI- or Anthropic-shaped bodies by
``coordinator.api.errors``.
"""

from __future__ import annotations

import attrs


@attrs.define(eq=False)
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    retry_after: int | None = None
    param: str | None = None  # the request field at fault, when one is (OpenAI's "param")
    headers: dict[str, str] | None = None  # more headers for the answer (x-ratelimit-*)

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


def bad_request(message: str, code: str | None = None, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param=param)


def unauthorized(message: str = "missing or invalid API key") -> ApiError:
    return ApiError(401, message, "authentication_error", "invalid_api_key")


def not_found(message: str, code: str = "model_not_found", param: str | None = "model"
              ) -> ApiError:
    return ApiError(404, message, "invalid_request_error", code, param=param)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds {limit} bytes", "invalid_request_error",
                    "request_too_large")


def rejected_by_provider(status: int, message: str) -> ApiError:
    """A provider's deterministic answer about the request itself, passed on as is."""
    return ApiError(status, message, "invalid_request_error", "provider_rejected_request")


def unavailable(message: str, code: str = "no_provider") -> ApiError:
    return ApiError(503, message, "provider_error", code, retry_after=5)


def shutting_down() -> ApiError:
    return ApiError(503, "the coordinator is shutting down; retry on another instance or "
                    "shortly", "provider_error", "shutting_down", retry_after=5)


def overloaded(message: str, retry_after: int = 10) -> ApiError:
    return ApiError(429, message, "rate_limit_error", "capacity", retry_after=retry_after)
