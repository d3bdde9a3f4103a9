"""Token extraction and message parsing are total: defined answers, never a crash."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from wsgate.agent import Emit, RunContext
from wsgate.auth.sources import extract_credentials
from wsgate.auth.tokens import TokenSource
from wsgate.errors import BadRequest
from wsgate.protocol import ProtocolError, UserMessage, encode, parse_client_message
from wsgate.testing import open_harness


def test_header_and_subprotocol_sources() -> None:
    header = extract_credentials([(b"Authorization", b"Bearer abc")], [])
    assert (header.token, header.source, header.subprotocol) == ("abc", TokenSource.HEADER, None)
    proto = extract_credentials([], ["wsgate.v1", "bearer.abc"])
    assert (proto.token, proto.source, proto.subprotocol) == ("abc", TokenSource.SUBPROTOCOL, "wsgate.v1")
    both_same = extract_credentials([(b"authorization", b"bearer abc")], ["wsgate.v1", "bearer.abc"])
    assert both_same.token == "abc"


@pytest.mark.parametrize(
    ("headers", "protocols", "reason"),
    [
        ([(b"Authorization", b"Bearer a")], ["wsgate.v1", "bearer.b"], "more than one token"),
        ([(b"Authorization", b"Bearer a"), (b"Authorization", b"Bearer b")], [], "more than one token"),
        ([(b"Authorization", b"Basic a")], [], "must be 'Bearer <token>'"),
        ([(b"Authorization", b"Bearer")], [], "must be 'Bearer <token>'"),
        ([], ["bearer.a"], "must come with wsgate.v1"),
        ([], ["wsgate.v1", "bearer."], "empty token"),
    ],
)
def test_bad_requests(headers: list[tuple[bytes, bytes]], protocols: list[str], reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        extract_credentials(headers, protocols)


@given(
    st.lists(st.tuples(st.sampled_from([b"authorization", b"Authorization", b"x"]), st.binary(max_size=40))),
    st.lists(st.one_of(st.just("wsgate.v1"), st.text(max_size=20).map(lambda t: "bearer." + t), st.text())),
)
def test_extraction_is_total(headers: list[tuple[bytes, bytes]], protocols: list[str]) -> None:
    try:
        creds = extract_credentials(headers, protocols)
    except BadRequest as exc:
        assert exc.status == 400
    else:
        assert creds.token is None or creds.token


def test_parse_user_message() -> None:
    assert parse_client_message('{"type":"user_message","text":"hi","id":"m1"}') == UserMessage("hi", "m1")


@given(
    st.one_of(
        st.text(),
        st.binary(),
        st.recursive(
            st.none() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
        ).map(str),
    )
)
def test_parsing_is_total(text: str | bytes) -> None:
    try:
        parse_client_message(text)
    except ProtocolError as exc:
        assert exc.reason


def test_deep_json_is_refused_without_recursion_error() -> None:
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse_client_message("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse_client_message('{"type":"ping","x":' + "[" * 20 + "]" * 20 + "}")


async def test_text_with_no_utf8_form_is_sent_escaped_never_as_1011(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An operator's in-process push holding an unpaired surrogate reaches the client as the
    JSON escape it came from; the connection lives on."""
    async with open_harness() as h, h.connect(h.token("alice")) as client:
        await client.receive_json()
        assert h.gateway.publish("alice", {"text": "a\ud800b"}) == (1, 1)
        raw = await client.ws.get_message()
        assert isinstance(raw, str) and "\\ud800" in raw and raw.isascii()
        assert json.loads(raw)["event"] == {"text": "a\ud800b"}
        assert (await client.run("still here"))[-1]["status"] == "ok"


def test_encode_is_valid_utf8_and_refuses_what_json_has_no_form_for() -> None:
    assert encode({"t": "\U0001f600"}) == '{"t":"\U0001f600"}'  # valid text stays as it is
    assert encode({"t": "\udfff"}).encode() == b'{"t":"\\udfff"}'
    with pytest.raises(ValueError):
        encode({"n": float("nan")})


class NanAgent:
    async def run(self, ctx: RunContext, message: str, emit: Emit) -> None:
        await emit("agent_started")
        await emit("agent_thinking", score=float("nan"))


async def test_an_agent_event_json_has_no_form_for_ends_the_run_not_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_harness(agent=NanAgent()) as h, h.connect(h.token("alice")) as client:
        await client.receive_json()
        events = await client.run("x")
        assert [e["type"] for e in events] == ["agent_started", "agent_completed"]
        assert events[-1]["status"] == "error"
        await client.send_json({"type": "ping", "id": "alive"})
        assert (await client.receive_json())["id"] == "alive"
