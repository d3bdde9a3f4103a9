"""wsgate: an authenticating WebSocket gateway for AI-agent products, on Trio."""

from .agent import Agent, DemoAgent, Emit, NoopAgent, RunContext
from .auth.keys import VerificationKey
from .auth.tokens import Identity, TokenRejected, TokenSource, TokenVerifier
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
from .server import Admission, Gateway, WallClock, open_gateway, serve
from .session import Session

__version__ = "0.1.0"

__all__ = [
    "Admission",
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
    "Session",
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
    "serve",
]
