"""Close codes and the errors that carry them.

Every way a connection can end maps to one :class:`CloseCode` (``docs/protocol.md``, "Close codes"),
and every refusal before the upgrade maps to one HTTP status. Errors carry both,
plus a reason that is safe to show to the client.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by wsgate (the table in ``docs/protocol.md``)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    #: Never sent: the connection dropped without a close frame (logged and counted as such).
    ABNORMAL_CLOSURE = 1006
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    MALFORMED_MESSAGE = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    AUTH_TIMEOUT = 4408
    #: The session was resumed on another connection; this one is no longer its.
    SESSION_MOVED = 4409
    RATE_LIMITED = 4429


class GatewayError(Exception):
    """A refusal with an HTTP status (before the upgrade) and a close code (after).

    ``reason`` is shown to the client; it must never contain a token or a secret.
    """

    status: int = 500
    close_code: CloseCode = CloseCode.INTERNAL_ERROR

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class BadRequest(GatewayError):
    status = 400
    close_code = CloseCode.MALFORMED_MESSAGE


class Unauthorized(GatewayError):
    """Token missing, malformed, badly signed, expired or otherwise invalid."""

    status = 401
    close_code = CloseCode.UNAUTHORIZED


class Forbidden(GatewayError):
    """A valid token that may not be used: revoked, wrong origin, another subject."""

    status = 403
    close_code = CloseCode.FORBIDDEN


class NotFound(GatewayError):
    status = 404
    close_code = CloseCode.POLICY_VIOLATION


class TooManyRequests(GatewayError):
    status = 429
    close_code = CloseCode.RATE_LIMITED


class Unavailable(GatewayError):
    """We cannot decide now (auth service down under ``strict``, draining, overload)."""

    status = 503
    close_code = CloseCode.TRY_AGAIN_LATER


class ConfigError(Exception):
    """One or more settings are invalid; each problem names its setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in ``error``, an exception group flattened (itself, if not a group)."""
    if not isinstance(error, BaseExceptionGroup):
        return [error]
    return [leaf for inner in error.exceptions for leaf in leaves(inner)]


class StartupError(Exception):
    """The gateway cannot start; ``message`` names the cause and the setting, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def bind_error(exc: OSError, settings: str, host: str, port: int) -> StartupError:
    """A bind failure as one line: ``server.port: cannot listen on 127.0.0.1:8765: address in use``."""
    cause = (exc.strerror or str(exc)).lower()
    return StartupError(f"{settings}: cannot listen on {host}:{port}: {cause}")
