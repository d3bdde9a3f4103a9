"""Generative tests of everything a client can send, and of every validly signed claim set.

Each example runs a gateway in its own Trio run under ``MockClock``. The invariants:
every server message is a documented one (and every ``error`` has a documented
code), a close is a documented code and never 1011, nothing is logged at ERROR
(no unhandled exception), and once the client has gone the registry, the pending
handshakes and the metrics are exactly as they were before it came.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from conftest import gateway_state
from wsgate import CloseCode
from wsgate.testing import (
    TEST_AUDIENCE,
    TEST_EPOCH,
    TEST_ISSUER,
    TEST_SECRET,
    Client,
    ConnectionRejected,
    GatewayHarness,
    open_harness,
    settings_for_tests,
)

SERVER_TYPES = {
    "session.ready",
    "session.draining",
    "auth.expiring",
    "auth.refreshed",
    "pong",
    "event",
    "error",
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
}
ERROR_CODES = {
    "bad_message",
    "unknown_type",
    "unknown_run",
    "too_many_runs",
    "refresh_rejected",
    "already_authenticated",
    "draining",
    "events_dropped",
    "auth_failed",
}
CLOSE_CODES = {int(code) for code in CloseCode} - {int(CloseCode.INTERNAL_ERROR)}
CLIENT_TYPES = ["auth", "auth.refresh", "ping", "user_message", "run.cancel", "session.resume"]
FIELDS = {
    "auth": ["token"],
    "auth.refresh": ["token"],
    "ping": ["id"],
    "user_message": ["text", "id"],
    "run.cancel": ["run_id"],
    "session.resume": ["session_id", "resume_token", "last_seq"],
}

# Text of every class of code point, unpaired surrogates included (sent as JSON escapes),
# and numbers of every size: drawn often, since each hazard must turn up in a few hundred
# examples, not once in a million.
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
any_text = st.one_of(
    st.text(max_size=20),
    surrogates,
    st.tuples(st.text(max_size=4), surrogates, st.text(max_size=4)).map("".join),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=10),
)
numbers = st.one_of(
    st.sampled_from([10**400, -(10**400), float("nan"), float("inf"), float("-inf"), 1e308, 2**1024]),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(any_text, numbers, st.none(), st.booleans())
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=12,
)
field_values = st.one_of(st.text(max_size=30), any_text, numbers, json_values)
# Nesting up to and beyond server.max_json_depth (16).
deep = st.integers(min_value=1, max_value=40).map(lambda n: "[" * n + "]" * n)


@st.composite
def client_messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.one_of(st.sampled_from(CLIENT_TYPES), any_text, json_values))
    message: dict[str, Any] = {"type": kind}
    for name in FIELDS.get(kind, []) if isinstance(kind, str) else []:
        if draw(st.integers(0, 3)):
            message[name] = draw(field_values)
    message.update(draw(st.dictionaries(any_text, json_values, max_size=2)))
    return message


def as_frame(value: Any, ascii_only: bool) -> str:
    """``value`` as the text of one frame: JSON as a client library would write it."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    try:
        text.encode()
    except UnicodeEncodeError:  # an unpaired surrogate: only its escape can be sent
        text = json.dumps(value, allow_nan=True)
    return text


frames = st.one_of(
    st.builds(as_frame, client_messages(), st.booleans()),
    st.builds(as_frame, json_values, st.booleans()),
    st.text(max_size=40),
    st.binary(max_size=20),
    deep.map(lambda d: f'{{"type":"ping","x":{d}}}'),
    st.integers(min_value=4000, max_value=6000).map(lambda n: '{"type":"ping","x":' + "7" * n + "}"),
)


@contextmanager
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    root = logging.getLogger("wsgate")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def check_message(message: dict[str, Any]) -> None:
    assert message.get("type") in SERVER_TYPES, message
    if message["type"] == "error":
        assert message.get("code") in ERROR_CODES, message


async def read_until_probe(client: Client) -> CloseCode | None:
    """Read, checking each message, until the probe's pong (then a little longer, for
    answers that arrive late: refreshes, runs) or the close; returns the close code."""
    try:
        while (message := await client.receive_json()) != {"type": "pong", "id": "probe", **seq(message)}:
            check_message(message)
        with trio.move_on_after(5):
            while True:
                check_message(await client.receive_json())
    except ConnectionClosed as closed:
        assert closed.reason is not None
        return CloseCode(closed.reason.code)
    return None


def seq(message: dict[str, Any]) -> dict[str, Any]:
    return {"seq": message["seq"]} if "seq" in message else {}


async def with_gateway(
    body: Callable[[GatewayHarness], Awaitable[None]], overrides: dict[str, Any]
) -> list[logging.LogRecord]:
    with errors_logged() as errors:
        async with open_harness(settings_for_tests(**overrides)) as h:
            before = gateway_state(h)
            await body(h)
            with trio.fail_after(120):
                await h.gateway.registry.wait_empty()
                await trio.testing.wait_all_tasks_blocked()
            assert gateway_state(h) == before
            assert h.gateway.stats["connection.bug"] == 0
            assert h.gateway.stats["close.1011"] == 0
    return errors


def run(body: Callable[[GatewayHarness], Awaitable[None]], **overrides: Any) -> None:
    errors = trio.run(with_gateway, body, overrides, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not errors, [record.getMessage() for record in errors]


GENERATIVE = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@GENERATIVE
@given(st.lists(frames, min_size=1, max_size=6))
def test_whatever_a_client_sends_gets_a_documented_answer(sent: list[str | bytes]) -> None:
    async def body(h: GatewayHarness) -> None:
        async with h.connect(h.token("alice")) as client:
            check_message(await client.receive_json())
            try:
                for frame in sent:
                    await client.send_text(frame)
                await client.send_json({"type": "ping", "id": "probe"})
            except ConnectionClosed:
                pass
            code = await read_until_probe(client)
            assert code is None or int(code) in CLOSE_CODES

    run(body)


def signed(claims: dict[str, Any]) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims, allow_nan=True).encode())
    signature = hmac.new(TEST_SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


HAZARDS = st.sampled_from([10**400, -(10**400), float("nan"), float("inf"), "\ud800", "a\udfffb", [], {}])


CLAIMS = ["sub", "exp", "iss", "aud", "iat", "nbf", "jti", "tenant", "scope", "scp", "typ"]


@st.composite
def claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    """A valid claim set with up to three claims replaced by anything (or removed), and
    maybe a few more: a hazard in one claim only matters when the others pass."""
    claims: dict[str, Any] = {
        "sub": draw(st.sampled_from(["alice", "bob"])),
        "exp": draw(st.floats(min_value=TEST_EPOCH, max_value=TEST_EPOCH + 10**6)),
        "iss": TEST_ISSUER,
        "aud": TEST_AUDIENCE,
        "iat": draw(st.integers(min_value=int(TEST_EPOCH) - 1000, max_value=int(TEST_EPOCH))),
    }
    for name in draw(st.lists(st.sampled_from(CLAIMS), max_size=3, unique=True)):
        if draw(st.integers(0, 5)):
            claims[name] = draw(st.one_of(HAZARDS, any_text, numbers, json_values))
        else:
            claims.pop(name, None)
    claims.update(draw(st.dictionaries(any_text, json_values, max_size=2)))
    return claims


@GENERATIVE
@given(claim_sets(), st.sampled_from(["header", "subprotocol"]))
def test_any_signed_claim_set_at_the_handshake_is_admitted_or_refused_401(
    claims: dict[str, Any], via: str
) -> None:
    async def body(h: GatewayHarness) -> None:
        try:
            async with h.connect(signed(claims), via=via) as client:
                ready = await client.receive_json()
                assert ready["type"] == "session.ready" and ready["subject"] == claims["sub"]
        except ConnectionRejected as refused:
            assert refused.status_code == 401, refused.body

    run(body)


@GENERATIVE
@given(claim_sets())
def test_any_signed_claim_set_as_a_refresh_is_accepted_rejected_or_4403(claims: dict[str, Any]) -> None:
    async def body(h: GatewayHarness) -> None:
        async with h.connect(h.token("alice")) as client:
            await client.receive_json()
            await client.send_json({"type": "auth.refresh", "token": signed(claims)})
            try:
                answer = await client.receive_json()
            except ConnectionClosed as closed:
                assert closed.reason is not None and closed.reason.code == CloseCode.FORBIDDEN
                assert (claims.get("sub"), claims.get("tenant")) != ("alice", None)  # another user
                return
            assert (answer["type"], answer.get("code")) in {
                ("auth.refreshed", None),
                ("error", "refresh_rejected"),
            }
            await client.send_json({"type": "ping", "id": "after"})
            try:
                while (message := await client.receive_json())["type"] != "pong":
                    assert message["type"] == "auth.expiring"  # the new token is close to expiry
                assert message["id"] == "after"
            except ConnectionClosed as closed:  # refreshed with a token that expires now
                assert answer["type"] == "auth.refreshed" and answer["expires_at"] <= h.now()
                assert closed.reason is not None and closed.reason.code == CloseCode.UNAUTHORIZED

    run(body)


@GENERATIVE
@given(claim_sets())
def test_any_signed_claim_set_as_first_message_auth_is_admitted_or_closed(claims: dict[str, Any]) -> None:
    async def body(h: GatewayHarness) -> None:
        async with h.connect() as client:
            await client.send_json({"type": "auth", "token": signed(claims)})
            try:
                ready = await client.receive_json()
            except ConnectionClosed as closed:  # pragma: no cover - the error comes first
                assert closed.reason is not None and closed.reason.code in CLOSE_CODES
                return
            if ready["type"] == "session.ready":
                assert ready["subject"] == claims["sub"]
                return
            assert (ready["type"], ready["code"]) == ("error", "auth_failed")
            _, reason = await client.wait_closed()
            assert reason.code == CloseCode.UNAUTHORIZED

    run(body, **{"auth.first_message": True})
