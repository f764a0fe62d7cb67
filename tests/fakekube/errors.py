"""Kubernetes ``Status`` bodies and the exception the fake raises to return one.

The shapes follow k8s.io/apimachinery/pkg/api/errors: every failure is a ``Status``
object (``kind: Status``, ``apiVersion: v1``, ``status: Failure``) with ``reason``,
``code``, ``message`` and, where the real server fills it, ``details``.
"""

from __future__ import annotations

from typing import Any

# HTTP code -> the StatusReason the real API server uses for it.
REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_body(
    code: int,
    reason: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A failure ``Status`` exactly as the API server serialises it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def success_body(code: int | None = None, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A success ``Status`` (what DELETE of most kinds and POST .../binding return)."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
    }
    if details is not None:
        body["details"] = details
    if code is not None:
        body["code"] = code
    return body


class ApiError(Exception):
    """Raised inside the fake; the HTTP layer turns it into a Status response."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["message"])
        self.body = body

    @property
    def code(self) -> int:
        return int(self.body["code"])


def _details(resource: str, name: str, group: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = resource
    return details


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        status_body(
            404,
            "NotFound",
            f'{_qualified(resource, group)} "{name}" not found',
            _details(resource, name, group),
        )
    )


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        status_body(
            409,
            "AlreadyExists",
            f'{_qualified(resource, group)} "{name}" already exists',
            _details(resource, name, group),
        )
    )


def conflict(resource: str, name: str, why: str, group: str = "") -> ApiError:
    return ApiError(
        status_body(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": {why}',
            _details(resource, name, group),
        )
    )


STALE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def stale(resource: str, name: str, group: str = "") -> ApiError:
    return conflict(resource, name, STALE, group)


def bad_request(message: str) -> ApiError:
    return ApiError(status_body(400, "BadRequest", message))


def invalid(kind: str, name: str, field: str, why: str, group: str = "") -> ApiError:
    """422 as returned by validation: ``Pod "x" is invalid: spec.containers: Required value``."""
    details: dict[str, Any] = {"name": name, "group": group} if group else {"name": name}
    details["kind"] = kind
    details["causes"] = [{"reason": "FieldValueInvalid", "message": why, "field": field}]
    return ApiError(
        status_body(422, "Invalid", f'{kind} "{name}" is invalid: {field}: {why}', details)
    )


def patch_rejected(detail: str) -> ApiError:
    """422 for a JSON patch that cannot be applied (failed ``test``, missing path, ...)."""
    return ApiError(
        status_body(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request",
            {"causes": [{"reason": "FieldValueInvalid", "message": detail}]},
        )
    )


def expired(message: str) -> dict[str, Any]:
    """The 410 Status carried by a watch ERROR event."""
    return status_body(410, "Expired", message)


def injected(code: int, resource: str, name: str, message: str | None = None) -> ApiError:
    """The failure that ``fail_next`` injects, shaped like the real one for that code."""
    if code == 409:
        return stale(resource, name)
    if code == 404:
        return not_found(resource, name)
    reason = REASONS.get(code, "Unknown")
    details = _details(resource, name) if name else None
    return ApiError(
        status_body(code, reason, message or f"injected failure ({code} {reason})", details)
    )
