"""What a handshake decides, and how a refusal is written before the upgrade."""

from __future__ import annotations

import math

import attrs

from .auth.tokens import Identity
from .errors import GatewayError, Unauthorized


@attrs.frozen
class Admission:
    """A request admitted at the handshake."""

    identity: Identity
    subprotocol: str | None
    degraded: bool = False
    #: Kept (in memory only) when the session may have to be re-checked with the auth service.
    token: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Pending:
    """Upgrade without a token: first-message auth decides after the upgrade."""

    subprotocol: str | None


def reject_headers(error: GatewayError) -> list[tuple[bytes, bytes]]:
    """Headers of the HTTP refusal for ``error``."""
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Cache-Control", b"no-store"),
    ]
    if isinstance(error, Unauthorized):
        headers.append((b"WWW-Authenticate", b'Bearer error="invalid_token"'))
    if error.retry_after is not None:
        headers.append((b"Retry-After", str(max(1, math.ceil(error.retry_after))).encode()))
    return headers
