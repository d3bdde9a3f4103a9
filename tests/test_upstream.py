"""The agent service under MockClock, with an in-memory backend behind httpx's MockTransport:
each deadline, retries and the breaker, what the backend is told, and what the client sees.

The same behaviour against a real Starlette backend over sockets: tests/test_e2e_upstream.py.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import httpx
import jwt
import pytest
import trio
import trio.testing

from wsgate.auth.introspection import full_jitter
from wsgate.breaker import BreakerConfig, CircuitBreaker
from wsgate.breaker_actor import BreakerActor
from wsgate.config import Settings
from wsgate.testing import GatewayHarness, open_harness, settings_for_tests
from wsgate.upstream.agent import UpstreamAgent
from wsgate.upstream.events import bounded_text, decode, translate
from wsgate.upstream.tokens import RunTokens

UPSTREAM_SECRET = "u" * 40
URL = "http://agent.test/runs"
SSE = "text/event-stream"
Parts = list[bytes | float]

Script = Callable[[httpx.Request, int], Awaitable[httpx.Response]]


@attrs.define
class FakeBackend:
    """An agent service in memory: ``script(request, call_number)`` answers each call."""

    script: Script
    requests: list[httpx.Request] = attrs.Factory(list)
    closed: list[int] = attrs.Factory(list)  # calls whose response stream the gateway closed early
    finished: list[int] = attrs.Factory(list)  # calls whose stream ran to its end

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.script(request, len(self.requests))

    def stream(self, call: int, parts: list[bytes | float], content_type: str) -> httpx.Response:
        """A response streaming ``parts``: bytes are sent, numbers are pauses (seconds)."""
        return httpx.Response(200, headers={"content-type": content_type}, stream=_Body(self, call, parts))


@attrs.define
class _Body(httpx.AsyncByteStream):
    backend: FakeBackend
    call: int
    parts: list[bytes | float]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, bytes):
                yield part
            else:
                await trio.sleep(part)
        self.backend.finished.append(self.call)

    async def aclose(self) -> None:
        if self.call not in self.backend.finished:
            self.backend.closed.append(self.call)  # hung up on before the end: a disconnect


def sse(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(fields)}\n\n".encode()


def ndjson(kind: str, **fields: Any) -> bytes:
    return (json.dumps({"type": kind, **fields}) + "\n").encode()


GOLDEN: Parts = [
    sse("agent_started"),
    0.1,
    sse("agent_delta", text="Hel"),
    sse("agent_delta", text="lo"),
    sse("tool_executing", tool="search"),
    sse("tool_completed", tool="search", result={"hits": 2}),
    sse("agent_completed", status="ok", output="Hello"),
]


def upstream_settings(**overrides: Any) -> Settings:
    return settings_for_tests(
        **{"agent.upstream_url": URL, "agent.upstream_secret": UPSTREAM_SECRET, **overrides}
    )


def upstream_agent(settings: Settings, backend: FakeBackend, seed: int = 0) -> UpstreamAgent:
    http = httpx.AsyncClient(transport=httpx.MockTransport(backend.handle))
    config = BreakerConfig(**settings.breaker.for_calls(settings.agent.first_event_timeout))
    breaker = BreakerActor(CircuitBreaker(config), name="agent service")
    tokens = RunTokens(settings.agent, time.time)
    return UpstreamAgent(settings.agent, http, breaker, tokens, rng=random.Random(seed))


def answering(
    parts: list[bytes | float], content_type: str = "text/event-stream"
) -> Callable[[], FakeBackend]:
    def make() -> FakeBackend:
        backend = FakeBackend(lambda request, call: _stream(backend, call, parts, content_type))
        return backend

    return make


async def _stream(
    backend: FakeBackend, call: int, parts: list[bytes | float], content_type: str
) -> httpx.Response:
    return backend.stream(call, parts, content_type)


async def run_through(
    backend: FakeBackend, text: str = "hi", settings: Settings | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], GatewayHarness]:
    settings = settings or upstream_settings()
    async with open_harness(settings, agent=upstream_agent(settings, backend, seed)) as h:
        async with h.connect(h.token("alice", tenant="acme", scope="chat")) as client:
            await client.receive_json()
            events = await client.run(text)
        return events, h


def upstream_stats(h: GatewayHarness) -> dict[str, int]:
    assert h.gateway.upstream is not None
    return dict(h.gateway.upstream.stats)


def completed(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert [e["type"] for e in events].count("agent_completed") == 1
    assert events[-1]["type"] == "agent_completed"
    return events[-1]


# -- the golden path ---------------------------------------------------------------


async def test_the_backend_streams_and_the_client_gets_every_event_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = answering(GOLDEN)()
    events, _ = await run_through(backend, "hello")
    assert [(e["type"], e.get("text")) for e in events] == [
        ("agent_started", None),
        ("agent_delta", "Hel"),
        ("agent_delta", "lo"),
        ("tool_executing", None),
        ("tool_completed", None),
        ("agent_completed", None),
    ]
    assert {e["run_id"] for e in events} == {"r1"}
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert completed(events) == {
        "type": "agent_completed",
        "run_id": "r1",
        "status": "ok",
        "output": "Hello",
        "seq": 6,
    }
    assert len(backend.requests) == 1


async def test_the_backend_is_told_who_the_run_is_for_by_a_token_of_the_gateways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = answering(GOLDEN)()
    settings = upstream_settings()
    async with open_harness(settings, agent=upstream_agent(settings, backend)) as h:
        client_token = h.token("alice", tenant="acme", scope="chat files")
        async with h.connect(client_token) as client:
            ready = await client.receive_json()
            await client.send_json({"type": "user_message", "text": "hello", "id": "m-7"})
            await client.receive_until("agent_completed")
    (request,) = backend.requests
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["accept"] == "text/event-stream, application/x-ndjson"
    run = f"{ready['session_id']}:r1"
    assert request.headers["x-request-id"] == run
    version, trace, span, flags = request.headers["traceparent"].split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")
    scheme, token = request.headers["authorization"].split(" ")
    assert scheme == "Bearer" and token != client_token
    assert client_token not in json.dumps(dict(request.headers)) + request.content.decode()
    claims = jwt.decode(token, UPSTREAM_SECRET, algorithms=["HS256"], audience="wsgate-upstream")
    assert claims["iss"] == "wsgate"
    assert (claims["sub"], claims["tenant"], claims["scope"], claims["jti"]) == (
        "alice",
        "acme",
        "chat files",
        run,
    )
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert json.loads(request.content) == {
        "run_id": "r1",
        "session_id": ready["session_id"],
        "message": {"text": "hello", "id": "m-7"},
        "user": {"sub": "alice", "tenant": "acme", "scopes": ["chat", "files"], "degraded": False},
    }


async def test_the_clients_own_token_is_forwarded_only_when_configured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = answering(GOLDEN)()
    settings = upstream_settings(**{"agent.forward_client_token": True})
    async with open_harness(settings, agent=upstream_agent(settings, backend)) as h:
        client_token = h.token("alice")
        async with h.connect(client_token) as client:
            await client.receive_json()
            await client.run("hi")
    assert backend.requests[0].headers["authorization"] == f"Bearer {client_token}"


async def test_ndjson_streams_the_same(autojump_clock: trio.testing.MockClock) -> None:
    parts: list[bytes | float] = [
        ndjson("agent_started"),
        ndjson("agent_delta", text="a") + ndjson("agent_delta", text="b")[:5],
        0.1,
        ndjson("agent_delta", text="b")[5:],
        ndjson("agent_completed", status="ok"),
    ]
    events, _ = await run_through(answering(parts, "application/x-ndjson")())
    assert [(e["type"], e.get("text")) for e in events] == [
        ("agent_started", None),
        ("agent_delta", "a"),
        ("agent_delta", "b"),
        ("agent_completed", None),
    ]


async def test_ag_ui_events_are_mapped(autojump_clock: trio.testing.MockClock) -> None:
    def ag(kind: str, **fields: Any) -> bytes:
        return f"data: {json.dumps({'type': kind, **fields})}\n\n".encode()

    parts: list[bytes | float] = [
        ag("RUN_STARTED", threadId="t", runId="x"),
        ag("TEXT_MESSAGE_START", messageId="m", role="assistant"),
        ag("TEXT_MESSAGE_CONTENT", messageId="m", delta="Hi"),
        ag("TEXT_MESSAGE_END", messageId="m"),
        ag("TOOL_CALL_START", toolCallId="c1", toolCallName="search"),
        ag("TOOL_CALL_ARGS", toolCallId="c1", delta="{}"),
        ag("TOOL_CALL_END", toolCallId="c1"),
        ag("TOOL_CALL_RESULT", messageId="m2", toolCallId="c1", content="2 hits"),
        ag("STATE_SNAPSHOT", snapshot={}),
        ag("RUN_FINISHED", threadId="t", runId="x"),
    ]
    settings = upstream_settings(**{"agent.upstream_events": "ag-ui"})
    events, h = await run_through(answering(parts)(), settings=settings)
    assert [{k: v for k, v in e.items() if k not in ("run_id", "seq")} for e in events] == [
        {"type": "agent_started"},
        {"type": "agent_delta", "text": "Hi"},
        {"type": "tool_executing", "tool": "search", "tool_call_id": "c1"},
        {"type": "tool_completed", "tool_call_id": "c1", "result": "2 hits"},
        {"type": "agent_completed", "status": "ok"},
    ]
    assert upstream_stats(h)["dropped_events"] == 5  # the text's start and end, args, end, state


async def test_a_run_error_from_an_ag_ui_backend_ends_the_run_with_its_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parts: list[bytes | float] = [b'data: {"type":"RUN_ERROR","message":"model overloaded"}\n\n']
    settings = upstream_settings(**{"agent.upstream_events": "ag-ui"})
    events, _ = await run_through(answering(parts)(), settings=settings)
    assert completed(events)["error"] == {"code": "agent_error", "message": "model overloaded"}


async def test_unknown_events_are_dropped_unless_passed_through_and_gateway_fields_are_the_gateways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    parts: list[bytes | float] = [
        sse("agent_started", run_id="r999", seq=1, message_id="spoof"),
        sse("usage", tokens=12),
        sse("progress", percent=50),
        sse("agent_completed", status="ok"),
    ]
    settings = upstream_settings(**{"agent.passthrough_events": ["usage"]})
    events, h = await run_through(answering(parts)(), settings=settings)
    assert [e["type"] for e in events] == ["agent_started", "usage", "agent_completed"]
    assert events[0] == {"type": "agent_started", "run_id": "r1", "seq": 1}
    assert events[1]["tokens"] == 12
    assert upstream_stats(h)["dropped_events"] == 1


# -- deadlines ---------------------------------------------------------------------


async def test_no_first_event_ends_the_run_at_the_first_event_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = answering([math.inf])()
    settings = upstream_settings(**{"agent.first_event_timeout": 7, "agent.retries": 0})
    start = trio.current_time()
    events, h = await run_through(backend, settings=settings)
    error = completed(events)["error"]
    assert error == {"code": "upstream_timeout", "message": "no event within agent.first_event_timeout (7 s)"}
    assert trio.current_time() - start == pytest.approx(7)
    assert backend.closed == [1]  # the gateway hung up: the backend sees the disconnect
    assert upstream_stats(h)["upstream_timeout"] == 1


async def test_silence_after_the_first_event_ends_the_run_at_the_idle_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = answering([sse("agent_started"), 100.0, sse("agent_completed", status="ok")])()
    settings = upstream_settings(**{"agent.idle_timeout": 3})
    start = trio.current_time()
    events, _ = await run_through(backend, settings=settings)
    assert [e["type"] for e in events] == ["agent_started", "agent_completed"]
    assert completed(events)["error"]["message"] == "no event for agent.idle_timeout (3 s)"
    assert trio.current_time() - start == pytest.approx(3)
    assert backend.closed == [1]


async def test_a_run_longer_than_the_run_deadline_is_ended(autojump_clock: trio.testing.MockClock) -> None:
    tick: Parts = [1.0, sse("agent_delta", text=".")]
    parts: Parts = [sse("agent_started"), *tick * 100]
    backend = answering(parts)()
    settings = upstream_settings(**{"agent.run_timeout": 20, "agent.first_event_timeout": 5})
    start = trio.current_time()
    events, _ = await run_through(backend, settings=settings)
    assert completed(events)["error"]["code"] == "upstream_timeout"
    assert "agent.run_timeout (20 s)" in completed(events)["error"]["message"]
    assert trio.current_time() - start == pytest.approx(20)
    assert [e["type"] for e in events].count("agent_delta") == 19


# -- failures, retries and the breaker ------------------------------------------------


def failing_then(statuses: list[int], then: list[bytes | float] = GOLDEN) -> FakeBackend:
    async def script(request: httpx.Request, call: int) -> httpx.Response:
        if call <= len(statuses):
            return httpx.Response(statuses[call - 1], text="busy")
        return backend.stream(call, then, "text/event-stream")

    backend = FakeBackend(script)
    return backend


async def test_a_503_then_a_200_is_retried_after_a_jittered_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = failing_then([503])
    start = trio.current_time()
    events, h = await run_through(backend, seed=5)
    assert completed(events)["status"] == "ok"
    assert len(backend.requests) == 2
    assert upstream_stats(h)["retried"] == 1
    # The backoff is the agent's seeded jitter: the same seed, the same wait.
    rng = random.Random(5)
    rng.getrandbits(128), rng.getrandbits(64)  # the traceparent
    backoff = full_jitter(rng, 1, 0.2, 2.0)
    assert trio.current_time() - start == pytest.approx(backoff + 0.1)


async def test_a_refusal_is_not_retried_and_carries_its_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = failing_then([422])
    events, _ = await run_through(backend)
    assert completed(events)["error"] == {
        "code": "upstream_rejected",
        "message": "the agent service refused the run (422)",
        "status": 422,
    }
    assert len(backend.requests) == 1


async def test_a_backend_down_through_every_retry_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = failing_then([503, 502, 504])
    events, _ = await run_through(backend)
    assert completed(events)["error"] == {
        "code": "upstream_unavailable",
        "message": "the agent service answered 504",
        "status": 504,
    }
    assert len(backend.requests) == 3  # the first call and agent.retries (2)


async def test_a_connection_failure_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    async def script(request: httpx.Request, call: int) -> httpx.Response:
        if call == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return backend.stream(call, GOLDEN, "text/event-stream")

    backend = FakeBackend(script)
    events, _ = await run_through(backend)
    assert completed(events)["status"] == "ok"
    assert len(backend.requests) == 2


@pytest.mark.parametrize(
    ("parts", "content_type", "message"),
    [
        ([b"data: {not json\n\n"], SSE, "an event is not valid JSON"),
        ([b"data: [1, 2]\n\n"], SSE, "an event is not a JSON object"),
        ([b'data: {"text": "no type"}\n\n'], SSE, "an event has no type"),
        ([sse("agent_started")], SSE, "the stream ended before agent_completed"),
        ([b"<html>hello</html>"], "text/html", "neither text/event-stream nor application/x-ndjson"),
        ([b"\xff\xfe\n"], "application/x-ndjson", "an event is not UTF-8"),
        ([b"data: " + b"x" * 2000], SSE, "an event is larger than agent.max_event_bytes (1024)"),
        ([b'{"type":"agent_delta","text":"' + b"x" * 2000], "application/x-ndjson", "larger than"),
    ],
    ids=["bad json", "not an object", "no type", "no completion", "html", "not utf-8", "huge sse", "huge nd"],
)
async def test_garbage_from_the_backend_ends_the_run_with_upstream_protocol(
    autojump_clock: trio.testing.MockClock, parts: list[bytes | float], content_type: str, message: str
) -> None:
    backend = answering(parts, content_type)()
    settings = upstream_settings(**{"agent.max_event_bytes": 1024})
    events, h = await run_through(backend, settings=settings)
    error = completed(events)["error"]
    assert error["code"] == "upstream_protocol"
    assert message in error["message"]
    assert len(backend.requests) == 1  # a backend that answers garbage is not asked again
    assert h.gateway.stats["close.1011"] == 0


async def test_the_breaker_opens_after_repeated_failures_and_no_call_is_made_while_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def down(request: httpx.Request, call: int) -> httpx.Response:
        return httpx.Response(503)

    backend = FakeBackend(down)
    settings = upstream_settings(
        **{"agent.retries": 0, "breaker.window": 4, "breaker.min_calls": 4, "breaker.open_wait": 30}
    )
    async with (
        open_harness(settings, agent=upstream_agent(settings, backend)) as h,
        h.connect(h.token()) as client,
    ):
        await client.receive_json()
        for _ in range(4):
            assert completed(await client.run("x"))["error"]["code"] == "upstream_unavailable"
        assert len(backend.requests) == 4
        await trio.testing.wait_all_tasks_blocked()
        assert h.gateway.upstream is not None
        assert h.gateway.upstream.breaker.state.value == "open"
        error = completed(await client.run("x"))["error"]
        assert error == {"code": "upstream_unavailable", "message": "the agent service's breaker is open"}
        assert len(backend.requests) == 4  # no call while open
        assert b"wsgate_upstream_breaker_state 2.0" in h.gateway.metrics.exposition()
        assert h.gateway.readiness_detail() == {"upstream_breaker": "open"}
        await trio.sleep(31)  # open_wait: half-open lets probes through
        assert completed(await client.run("x"))["error"]["message"] == "the agent service answered 503"
        assert len(backend.requests) == 5


async def test_run_cancel_closes_the_backends_stream(autojump_clock: trio.testing.MockClock) -> None:
    backend = answering([sse("agent_started"), math.inf])()
    settings = upstream_settings()
    async with (
        open_harness(settings, agent=upstream_agent(settings, backend)) as h,
        h.connect(h.token()) as client,
    ):
        await client.receive_json()
        await client.send_json({"type": "user_message", "text": "long"})
        assert (await client.receive_json())["type"] == "agent_started"
        await client.send_json({"type": "run.cancel", "run_id": "r1"})
        done = await client.receive_json()
        assert (done["type"], done["status"]) == ("agent_completed", "cancelled")
        await trio.testing.wait_all_tasks_blocked()
        assert backend.closed == [1]
        # The connection goes on: the next run is served.
        backend.script = lambda request, call: _stream(backend, call, list(GOLDEN), SSE)
        assert completed(await client.run("again"))["status"] == "ok"


@pytest.mark.parametrize("window", [0.0, 120.0])
async def test_a_slow_client_slows_the_backend_and_memory_stays_within_the_queue(
    autojump_clock: trio.testing.MockClock, window: float
) -> None:
    """The backend floods; the client reads nothing. The gateway stops reading the backend
    once the session's queue is full, then closes the slow consumer (1008). Without resuming,
    that ends the run and closes the backend's stream; with it, the session is detached and
    the run goes on into the session's log, which keeps no more than ``resume.max_bytes``."""
    flood: Parts = [sse("agent_started"), *[sse("agent_delta", text="x" * 100)] * 10_000]
    backend = answering(flood)()
    settings = upstream_settings(
        **{
            "server.send_queue_messages": 16,
            "server.slow_consumer_timeout": 2,
            "resume.window": window,
            "resume.max_bytes": 64 * 1024,
        }
    )
    async with (
        open_harness(settings, agent=upstream_agent(settings, backend)) as h,
        h.connect(h.token(), lockstep=True) as client,
    ):
        await client.receive_json()
        await client.send_json({"type": "user_message", "text": "flood"})
        await trio.sleep(10)  # reads nothing meanwhile
        await trio.testing.wait_all_tasks_blocked()
        assert h.gateway.stats["close.1008"] == 1  # a slow consumer (its queue, or a stuck write)
        assert h.gateway.stats["close.1011"] == 0
        if window == 0:
            assert backend.closed == [1] and backend.finished == []
        else:
            assert backend.finished == [1]  # read to its end, into the detached session's log
            (host,) = h.gateway.sessions.detached_hosts()
            assert 0 < host.core.log.bytes <= 64 * 1024
            assert host.core.seq == 10_002  # every event numbered, and the terminal one


# -- pure pieces --------------------------------------------------------------------


def test_decoding_takes_the_sse_event_name_else_the_objects_type() -> None:
    assert decode("agent_delta", '{"text": "a"}') == ("agent_delta", {"text": "a"})
    assert decode("message", '{"type": "agent_started"}') == ("agent_started", {})
    assert decode(None, '{"type": "x", "y": 1}') == ("x", {"y": 1})


def test_a_completion_with_a_status_of_no_meaning_is_an_error() -> None:
    assert translate("agent_completed", {}, "wsgate", ()) == ("agent_completed", {"status": "ok"})
    assert translate("agent_completed", {"status": "weird"}, "wsgate", ()) == (
        "agent_completed",
        {"status": "error"},
    )


async def test_an_event_split_across_chunks_is_measured_whole() -> None:
    async def chunks(*parts: str) -> AsyncIterator[str]:
        for part in parts:
            yield part

    ok = [
        c async for c in bounded_text(chunks("data: " + "x" * 50, "x" * 40 + "\n", "\n", "data: y\n\n"), 100)
    ]
    assert "".join(ok).endswith("data: y\n\n")
    with pytest.raises(Exception, match="larger than"):
        async for _ in bounded_text(chunks("data: " + "x" * 60, "x" * 60), 100):
            pass


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_run_tokens_can_be_signed_with_a_private_key(tmp_path: Any, algorithm: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from wsgate.agent import RunContext
    from wsgate.auth.tokens import Identity, TokenSource

    key = (
        rsa.generate_private_key(65537, 2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "run.pem").write_bytes(pem)
    settings = settings_for_tests(
        **{
            "agent.upstream_url": URL,
            "agent.upstream_algorithm": algorithm,
            "agent.upstream_key_file": str(tmp_path / "run.pem"),
        }
    )
    tokens = RunTokens(settings.agent, lambda: 1_000.0)
    ctx = RunContext("r3", "s-1", Identity("bob", 2_000.0, TokenSource.HEADER, scopes=frozenset({"a"})))
    claims = jwt.decode(
        tokens.mint(ctx),
        key.public_key(),
        algorithms=[algorithm],
        audience="wsgate-upstream",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert (claims["sub"], claims["jti"], claims["scope"], claims["exp"] - claims["iat"]) == (
        "bob",
        "s-1:r3",
        "a",
        300,
    )
    assert "tenant" not in claims


def test_a_key_file_that_is_not_a_private_key_is_refused_naming_the_setting(tmp_path: Any) -> None:
    from wsgate.errors import StartupError

    (tmp_path / "bad.pem").write_text("not a key")
    settings = settings_for_tests(
        **{
            "agent.upstream_url": URL,
            "agent.upstream_algorithm": "ES256",
            "agent.upstream_key_file": str(tmp_path / "bad.pem"),
        }
    )
    with pytest.raises(StartupError, match=r"^agent.upstream_key_file: cannot load a private key"):
        RunTokens(settings.agent, time.time)
