"""The gateway's word to the agent service: a short-lived JWT for each run.

The backend learns who the run is for from a token the gateway signs (HS256
with ``agent.upstream_secret``, or RS256/ES256 with the PEM private key in
``agent.upstream_key_file``), never from the client's own token, which is
forwarded only when ``agent.forward_client_token`` says so: a token passed
through is a token the backend could replay anywhere the client could.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from ..agent import RunContext
from ..config import AgentSettings
from ..errors import StartupError


def _signing_key(settings: AgentSettings) -> Any:
    if settings.upstream_algorithm == "HS256":
        assert settings.upstream_secret is not None  # Settings.problems() requires it
        return settings.upstream_secret.encode()
    assert settings.upstream_key_file is not None
    try:
        pem = Path(settings.upstream_key_file).expanduser().read_bytes()
        return serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise StartupError(f"agent.upstream_key_file: cannot load a private key ({exc})") from None


class RunTokens:
    """Mints the token a run's request carries."""

    def __init__(self, settings: AgentSettings, now: Callable[[], float]) -> None:
        self._settings = settings
        self._key = _signing_key(settings)
        self._now = now

    def mint(self, ctx: RunContext) -> str:
        settings, identity = self._settings, ctx.identity
        now = int(self._now())
        claims: dict[str, Any] = {
            "iss": settings.upstream_issuer,
            "aud": settings.upstream_audience,
            "sub": identity.subject,
            "scope": " ".join(sorted(identity.scopes)),
            "jti": global_run_id(ctx),
            "iat": now,
            "exp": now + int(settings.upstream_token_ttl),
        }
        if identity.tenant is not None:
            claims["tenant"] = identity.tenant
        return jwt.encode(claims, self._key, algorithm=settings.upstream_algorithm)


def global_run_id(ctx: RunContext) -> str:
    """A run's id across the gateway: its session's id and its own (``r1`` is per session)."""
    return f"{ctx.session_id}:{ctx.run_id}"
