"""A session: its rules (:mod:`.core`, sans-IO), its messages, and the Trio shell that runs it."""

from .core import SessionCore
from .effects import Rules
from .shell import Session, SessionServices

__all__ = ["Rules", "Session", "SessionCore", "SessionServices"]
