"""wsgate: an authenticating WebSocket gateway for AI-agent products, on Trio.

What a user of the package needs: an agent's interface, settings, the gateway
itself, the close codes and errors it answers with, and the token verifier.
Tests build on :mod:`wsgate.testing`.
"""

from .agent import Agent, DemoAgent, Emit, NoopAgent, RunContext
from .auth.keys import VerificationKey
from .auth.tokens import Identity, TokenRejected, TokenSource, TokenVerifier
from .clock import WallClock
from .config import Settings
from .configfile import load_settings
from .errors import (
    BadRequest,
    CloseCode,
    ConfigError,
    Forbidden,
    GatewayError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from .runner import run
from .server import Gateway, open_gateway, serve

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "BadRequest",
    "CloseCode",
    "ConfigError",
    "DemoAgent",
    "Emit",
    "Forbidden",
    "Gateway",
    "GatewayError",
    "Identity",
    "NoopAgent",
    "RunContext",
    "Settings",
    "TokenRejected",
    "TokenSource",
    "TokenVerifier",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "VerificationKey",
    "WallClock",
    "load_settings",
    "open_gateway",
    "run",
    "serve",
]
