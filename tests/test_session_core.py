"""The session's rules, without sockets or Trio: every event in every state of SessionCore.

Each row of the table is one event; each column one state the core can be in;
each cell what the core answers (its effects, in order) and the state it is in
afterwards. A cell reads ``effects | state``; ``-`` is no effect, ``raises X``
an exception the caller sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from wsgate.auth.tokens import Identity, TokenSource
from wsgate.errors import CloseCode
from wsgate.handshake import Admission
from wsgate.session import effects
from wsgate.session.core import SessionCore
from wsgate.session.effects import (
    RECHECK,
    START_PING,
    CancelRun,
    Close,
    Refresh,
    Resume,
    Rules,
    Send,
    StartRun,
)
from wsgate.session.lifecycle import LifecycleConfig, TokenLifecycle

WALL = 1_000_000.0  # the wall clock when the session opens; its monotonic clock reads 0
RULES = Rules(
    heartbeat_interval=20.0,
    max_runs=2,
    message_rate=1.0,
    message_burst=3,
    refresh_limit=2,
    resume_window=120.0,
)


def identity(subject: str = "alice", ttl: float = 900.0) -> Identity:
    return Identity(subject, WALL + ttl, TokenSource.HEADER, issued_at=WALL)


def new_core(*, degraded: bool = False) -> SessionCore:
    """A session admitted at WALL with a 15-minute token kept for re-checks every 30 s."""
    lifecycle = TokenLifecycle(LifecycleConfig(revalidate_interval=30.0), WALL + 900, WALL, WALL)
    admission = Admission(identity(), None, degraded, token="the-token")
    return SessionCore("s-1", admission, lifecycle, RULES, now=0.0)


def text(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def describe(effect: object) -> str:
    if isinstance(effect, Send):
        effect = effect.text
    if isinstance(effect, str):
        message = json.loads(effect)
        code = f":{message['code']}" if message["type"] == "error" else ""
        return f"send {message['type']}{code}"
    if isinstance(effect, StartRun):
        return f"start {effect.run_id}"
    if isinstance(effect, CancelRun):
        return f"cancel {effect.run_id}"
    if isinstance(effect, Refresh):
        return "refresh"
    if isinstance(effect, Close):
        return (
            f"close {int(effect.code)}"
            + ("" if effect.flush else " noflush")
            + (" detach" if effect.detach else "")
        )
    if isinstance(effect, Resume):
        return "resume"
    return {START_PING: "ping", RECHECK: "recheck"}[effect]  # type: ignore[index]


# -- the states --------------------------------------------------------------------


def open_idle() -> SessionCore:
    return new_core()


def open_running() -> SessionCore:
    core = new_core()
    assert isinstance(core.receive(text("user_message", text="hi", id="m1"), 0.0), StartRun)
    return core


def draining() -> SessionCore:
    core = open_running()
    assert [describe(e) for e in core.drain(2.0)] == ["send session.draining"]
    return core


def closed() -> SessionCore:
    core = open_running()
    assert core.end(CloseCode.FORBIDDEN, "token revoked") is not None
    return core


def detached() -> SessionCore:
    core = open_running()
    assert describe(core.close(effects.DROPPED)) == "close 1006 noflush detach"
    return core


STATES: dict[str, Callable[[], SessionCore]] = {
    "open": open_idle,
    "running": open_running,
    "draining": draining,
    "closed": closed,
    "detached": detached,
}

# -- the events ---------------------------------------------------------------------

Event = Callable[[SessionCore], Any]


def receive(raw: str | bytes, now: float = 1.0) -> Event:
    return lambda core: core.receive(raw, now)


def malformed_past_the_budget(core: SessionCore) -> Any:
    rules = Rules(max_protocol_errors=2, message_burst=100)
    core._rules = rules  # a smaller budget, so the row stays short
    return [core.receive("nope", float(i)) for i in range(3)]


def over_the_message_rate(core: SessionCore) -> Any:
    return [core.receive(text("ping"), 0.0) for _ in range(4)]  # a burst of 3, nothing refilled


def refreshes_over_the_window(core: SessionCore) -> Any:
    return [core.receive(text("auth.refresh", token="t"), 0.0) for _ in range(3)]


def refreshed(subject: str = "alice", at: float = 10.0) -> Event:
    return lambda core: core.refreshed(Admission(identity(subject, 1800.0), None, token="new"), WALL + at)


def timer(now: float, after: float) -> Event:
    return lambda core: core.timer(now, WALL + after)


def pushed_dropped_then_caught_up(core: SessionCore) -> Any:
    return [core.push_dropped(), core.push_dropped(), core.caught_up()]


EVENTS: dict[str, Event] = {
    "ping": receive(text("ping", id="p")),
    "user_message": receive(text("user_message", text="go")),
    "run.cancel of r1": receive(text("run.cancel", run_id="r1")),
    "run.cancel of no run": receive(text("run.cancel", run_id="r9")),
    "auth.refresh": receive(text("auth.refresh", token="t")),
    "auth": receive(text("auth", token="t")),
    "not JSON": receive("nope"),
    "a binary frame": receive(b"\x00"),
    "unknown type": receive(text("shout")),
    "malformed past the budget": malformed_past_the_budget,
    "over the message rate": over_the_message_rate,
    "refreshes over the window": refreshes_over_the_window,
    "refreshed": refreshed(),
    "refreshed as another subject": refreshed("mallory"),
    "refreshed after expiry": refreshed(at=900.0),
    "refresh failed": lambda core: core.refresh_failed("bad signature"),
    "timer, nothing due": timer(1.0, 1.0),
    "timer, ping due": timer(20.0, 20.0),
    "timer, re-check due": timer(1.0, 31.0),
    "timer, warning due": timer(1.0, 841.0),
    "timer, expired": timer(1.0, 900.0),
    "pong": lambda core: core.pong(5.0),
    "agent event of r1": lambda core: core.run_event("r1", "agent_thinking", {"text": "hm"}),
    "r1 ended": lambda core: core.run_ended("r1", "ok"),
    "drain": lambda core: core.drain(1.5),
    "server push": lambda core: core.offer(),
    "pushes dropped, then caught up": pushed_dropped_then_caught_up,
    "restored": lambda core: core.restored(),
    "idle": lambda core: core.close(effects.IDLE),
    "client closed": lambda core: core.close(effects.CLIENT_CLOSED),
    "connection dropped": lambda core: core.close(effects.DROPPED),
    "slow consumer": lambda core: core.close(effects.SLOW_CONSUMER),
    "write stuck": lambda core: core.close(effects.WRITE_STUCK),
    "ping timeout": lambda core: core.close(effects.PING_TIMEOUT),
    "revoked": lambda core: core.close(effects.REVOKED),
    "failed": lambda core: core.close(effects.FAILED),
    "session.resume first": receive(text("session.resume", session_id="s-0", resume_token="t", last_seq=0)),
    "moved to another connection": lambda core: core.close(effects.MOVED),
    "resume window passed": lambda core: core.close(effects.WINDOW_PASSED),
    "resumed by a new connection": lambda core: core.resume(Admission(identity(), None), 2.0, WALL + 2),
}

# Columns: open, running, draining, closed, detached.
TABLE: dict[str, tuple[str, str, str, str, str]] = {
    "ping": (
        "send pong | open",
        "send pong | open",
        "send pong | draining",
        "- | closed",
        "- | detached",
    ),
    "user_message": (
        "start r1 | open",
        "start r2 | open",
        "send error:draining | draining",
        "- | closed",
        "- | detached",
    ),
    "run.cancel of r1": (
        "send error:unknown_run | open",
        "cancel r1 | open",
        "cancel r1 | draining",
        "- | closed",
        "- | detached",
    ),
    "run.cancel of no run": (
        "send error:unknown_run | open",
        "send error:unknown_run | open",
        "send error:unknown_run | draining",
        "- | closed",
        "- | detached",
    ),
    "auth.refresh": (
        "refresh | open",
        "refresh | open",
        "refresh | draining",
        "- | closed",
        "- | detached",
    ),
    "auth": (
        "send error:already_authenticated | open",
        "send error:already_authenticated | open",
        "send error:already_authenticated | draining",
        "- | closed",
        "- | detached",
    ),
    "not JSON": (
        "send error:bad_message | open",
        "send error:bad_message | open",
        "send error:bad_message | draining",
        "- | closed",
        "- | detached",
    ),
    "a binary frame": (
        "send error:bad_message | open",
        "send error:bad_message | open",
        "send error:bad_message | draining",
        "- | closed",
        "- | detached",
    ),
    "unknown type": (
        "send error:unknown_type | open",
        "send error:unknown_type | open",
        "send error:unknown_type | draining",
        "- | closed",
        "- | detached",
    ),
    "malformed past the budget": (
        "send error:bad_message; send error:bad_message; close 4400 | closed",
        "send error:bad_message; send error:bad_message; close 4400 | closed",
        "send error:bad_message; send error:bad_message; close 4400 | closed",
        "- | closed",
        "- | detached",
    ),
    "over the message rate": (
        "send pong; send pong; send pong; close 4429 | closed",
        "send pong; send pong; close 4429 | closed",
        "send pong; send pong; close 4429 | closed",
        "- | closed",
        "- | detached",
    ),
    "refreshes over the window": (
        "refresh; refresh; close 4429 | closed",
        "refresh; refresh; close 4429 | closed",
        "refresh; refresh; close 4429 | closed",
        "- | closed",
        "- | detached",
    ),
    "refreshed": (
        "send auth.refreshed | open",
        "send auth.refreshed | open",
        "send auth.refreshed | draining",
        "- | closed",
        "- | detached",
    ),
    "refreshed as another subject": (
        "close 4403 | closed",
        "close 4403 | closed",
        "close 4403 | closed",
        "- | closed",
        "- | detached",
    ),
    "refreshed after expiry": (
        "close 4401 | closed",
        "close 4401 | closed",
        "close 4401 | closed",
        "- | closed",
        "- | detached",
    ),
    "refresh failed": (
        "send error:refresh_rejected | open",
        "send error:refresh_rejected | open",
        "send error:refresh_rejected | draining",
        "- | closed",
        "- | detached",
    ),
    "timer, nothing due": (
        "- | open",
        "- | open",
        "- | draining",
        "- | closed",
        "- | detached",
    ),
    "timer, ping due": (
        "ping | open",
        "ping | open",
        "ping | draining",
        "- | closed",
        "- | detached",
    ),
    "timer, re-check due": (
        "recheck | open",
        "recheck | open",
        "recheck | draining",
        "- | closed",
        "- | detached",
    ),
    "timer, warning due": (
        "send auth.expiring; recheck | open",
        "send auth.expiring; recheck | open",
        "send auth.expiring; recheck | draining",
        "- | closed",
        "- | detached",
    ),
    "timer, expired": (
        "close 4401 | closed",
        "close 4401 | closed",
        "close 4401 | closed",
        "- | closed",
        "- | detached",
    ),
    "pong": (
        "- | open",
        "- | open",
        "- | draining",
        "- | closed",
        "- | detached",
    ),
    "agent event of r1": (
        "raises KeyError | open",
        "send agent_thinking | open",
        "send agent_thinking | draining",
        "send agent_thinking | closed",
        "send agent_thinking | detached",
    ),
    "r1 ended": (
        "raises KeyError | open",
        "send agent_completed | open",
        "send agent_completed; close 1001 detach | detached",
        "- | closed",
        "send agent_completed | detached",
    ),
    "drain": (
        "send session.draining; close 1001 detach | detached",
        "send session.draining | draining",
        "- | draining",
        "- | closed",
        "- | detached",
    ),
    "server push": ("True | open", "True | open", "True | draining", "False | closed", "False | detached"),
    "pushes dropped, then caught up": (
        "True; False; send error:events_dropped | open",
        "True; False; send error:events_dropped | open",
        "True; False; send error:events_dropped | draining",
        "True; False; send error:events_dropped | closed",
        "True; False; send error:events_dropped | detached",
    ),
    "restored": (
        "- | open",
        "- | open",
        "- | draining",
        "- | closed",
        "- | detached",
    ),
    "idle": (
        "close 1000 | closed",
        "close 1000 | closed",
        "close 1000 | closed",
        "- | closed",
        "close 1000 noflush | closed",
    ),
    "client closed": (
        "close 1000 noflush | closed",
        "close 1000 noflush | closed",
        "close 1000 noflush | closed",
        "- | closed",
        "close 1000 noflush | closed",
    ),
    "connection dropped": (
        "close 1006 noflush detach | detached",
        "close 1006 noflush detach | detached",
        "close 1006 noflush detach | detached",
        "- | closed",
        "- | detached",
    ),
    "slow consumer": (
        "close 1008 detach | detached",
        "close 1008 detach | detached",
        "close 1008 detach | detached",
        "- | closed",
        "- | detached",
    ),
    "write stuck": (
        "close 1008 noflush detach | detached",
        "close 1008 noflush detach | detached",
        "close 1008 noflush detach | detached",
        "- | closed",
        "- | detached",
    ),
    "ping timeout": (
        "close 1001 noflush detach | detached",
        "close 1001 noflush detach | detached",
        "close 1001 noflush detach | detached",
        "- | closed",
        "- | detached",
    ),
    "revoked": (
        "close 4403 | closed",
        "close 4403 | closed",
        "close 4403 | closed",
        "- | closed",
        "close 4403 noflush | closed",
    ),
    "failed": (
        "close 1011 noflush | closed",
        "close 1011 noflush | closed",
        "close 1011 noflush | closed",
        "- | closed",
        "close 1011 noflush | closed",
    ),
    "session.resume first": (
        "resume | open",
        "send error:resume_not_first | open",
        "send error:resume_not_first | draining",
        "- | closed",
        "- | detached",
    ),
    "moved to another connection": (
        "close 4409 noflush detach | detached",
        "close 4409 noflush detach | detached",
        "close 4409 noflush detach | detached",
        "- | closed",
        "- | detached",
    ),
    "resume window passed": (
        "close 1001 | closed",
        "close 1001 | closed",
        "close 1001 | closed",
        "- | closed",
        "close 1001 noflush | closed",
    ),
    "resumed by a new connection": (
        "- | open",
        "- | open",
        "- | open",
        "raises ValueError | closed",
        "- | open",
    ),
}


def answer(core: SessionCore, event: Event) -> str:
    try:
        result = event(core)
    except Exception as exc:
        effects = f"raises {type(exc).__name__}"
    else:
        items = result if isinstance(result, list) else [result]
        described = [
            str(item) if isinstance(item, bool) else describe(item) for item in items if item is not None
        ]
        effects = "; ".join(described) or "-"
    return f"{effects} | {core.state.value}"


def test_the_table_covers_every_event_and_every_state() -> None:
    assert set(TABLE) == set(EVENTS)


@pytest.mark.parametrize("event", list(EVENTS))
@pytest.mark.parametrize("state", list(STATES))
def test_every_event_in_every_state(state: str, event: str) -> None:
    expected = TABLE[event][list(STATES).index(state)]
    assert answer(STATES[state](), EVENTS[event]) == expected


def test_a_degraded_session_is_restored_once() -> None:
    core = new_core(degraded=True)
    assert answer(core, lambda c: c.restored()) == "send session.restored | open"
    assert answer(core, lambda c: c.restored()) == "- | open"
    assert core.degraded is False


def test_the_first_close_wins_and_the_token_is_let_go() -> None:
    core = new_core()
    first = core.end(CloseCode.UNAUTHORIZED, "token expired")
    assert first == Close(CloseCode.UNAUTHORIZED, "token expired")
    assert core.end(CloseCode.NORMAL, "client closed") is None
    assert core.closing == first
    assert core.token is None  # nothing re-checks a closing session


def test_messages_are_numbered_in_the_order_queued_and_logged() -> None:
    core = new_core()
    texts = ['{"type":"pong","id":null}', '{"type":"a"}', '{"type":"b"}']
    assert [core.number(t) for t in texts] == [
        '{"type":"pong","id":null,"seq":1}',
        '{"type":"a","seq":2}',
        '{"type":"b","seq":3}',
    ]
    assert core.seq == 3
    assert core.log.after(1) == ['{"type":"a","seq":2}', '{"type":"b","seq":3}']
    assert core.log.after(3) == []
    assert core.log.after(4) is None  # ahead of the session: not a replay


def test_a_refresh_moves_the_timers() -> None:
    core = new_core()
    assert core.next_wake(lambda wall: wall - WALL) == 20.0  # the first ping
    core.timer(20.0, WALL + 20)  # the ping goes out; the next waits for its pong
    assert core.next_wake(lambda wall: wall - WALL) == 30.0  # the first re-check
    assert isinstance(refreshed(at=25.0)(core), Send)
    core.timer(30.0, WALL + 30)
    assert core.next_wake(lambda wall: wall - WALL) == 60.0
    core.pong(31.0)
    assert core.next_wake(lambda wall: wall - WALL) == 51.0
    assert core.lifecycle.expires_at == WALL + 1800


def test_an_agent_may_not_set_the_gateways_fields_nor_send_after_completing() -> None:
    core = open_running()
    for field in ("type", "run_id", "message_id", "seq"):
        with pytest.raises(ValueError, match=field):
            core.run_event("r1", "agent_thinking", {field: "x"})
    with pytest.raises(ValueError, match="not an agent event"):
        core.run_event("r1", "session.ready", {})
    done = json.loads(core.run_event("r1", "agent_completed", {"status": "ok"}))
    assert done == {"type": "agent_completed", "run_id": "r1", "message_id": "m1", "status": "ok"}
    with pytest.raises(RuntimeError, match="already completed"):
        core.run_event("r1", "agent_thinking", {})
    assert [describe(e) for e in core.run_ended("r1", "ok")] == []  # its own terminal event was sent


def test_the_core_imports_no_trio() -> None:
    """The rules run without Trio: nothing the core imports, however indirectly, imports it."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src"
    seen: set[str] = set()
    todo = ["wsgate.session.core"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = src / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = src / name.replace(".", "/") / "__init__.py"
        package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "trio" for a in node.names), name
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, module] if module else base)
                assert module.split(".")[0] not in ("trio", "trio_websocket"), f"{name} imports {module}"
                if module.startswith("wsgate"):
                    todo.append(module)
    assert "wsgate.session.lifecycle" in seen
