"""A table of attacks over real loopback sockets, each with its exact answer.

Every case runs against a real ``wsgate serve`` process while a well-behaved
bystander connection on the same server keeps pinging; after each attack the
bystander must still get its pongs and a complete agent run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import trio
import wsproto
import wsproto.events as ev
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import Server, start_server, stop

SECRET = "hostile-tests-hs256-secret-0123456789"
ISS, AUD = "https://issuer.test", "wsgate"
ORIGIN = "https://app.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)
RSA_JWK = json.dumps(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)).encode()


#: Every token-shaped string any test of this module put on the wire, to either server.
SENT_TOKENS: set[str] = set()
_TOKEN_SHAPE = re.compile(rb"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def record_tokens(data: bytes) -> None:
    SENT_TOKENS.update(m.group().decode() for m in _TOKEN_SHAPE.finditer(data))


def leaked_tokens(logs: str, tokens: set[str]) -> set[str]:
    """The tokens of ``tokens`` that appear in ``logs``, whole or by their signature."""
    return {
        token
        for token in tokens
        if token in logs or (len(signature := token.rsplit(".", 1)[-1]) >= 16 and signature in logs)
    }


def b64(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "mallory", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def good(sub: str = "bystander") -> str:
    return jwt.encode(claims(sub=sub), SECRET, algorithm="HS256")


def signed(header: dict[str, Any], payload: dict[str, Any], key: bytes, digest: Any = hashlib.sha256) -> str:
    signing_input = b64(header) + "." + b64(payload)
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), digest).digest())


def hs(payload: dict[str, Any] | None = None, **header: Any) -> str:
    return signed({"alg": "HS256", "typ": "JWT", **header}, payload or claims(), SECRET.encode())


def unsigned(alg: str) -> str:
    return b64({"alg": alg, "typ": "JWT"}) + "." + b64(claims()) + "."


@attrs.frozen
class Servers:
    main: Server
    first_message: Server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "rsa.pem").write_bytes(RSA_PEM)
    (root / "ec.pem").write_bytes(EC_PEM)
    config = root / "wsgate.toml"
    config.write_text(
        f"""
[server]
handshake_timeout = 2
message_rate = 20
message_burst = 40
[auth]
hmac_secret = "{SECRET}"
issuer = "{ISS}"
audience = "{AUD}"
leeway = 0
allowed_origins = ["{ORIGIN}"]
cookie = true
[[auth.keys]]
kind = "public"
pem_file = "{root / "rsa.pem"}"
algorithms = ["RS256"]
[[auth.keys]]
kind = "public"
pem_file = "{root / "ec.pem"}"
algorithms = ["ES256"]
"""
    )
    env = {"WSGATE_AGENT__STEP_DELAY": "0.01"}
    main = start_server(root, "--config", str(config), env=env)
    first = start_server(
        root,
        "--config",
        str(config),
        env={**env, "WSGATE_AUTH__FIRST_MESSAGE": "true", "WSGATE_AUTH__FIRST_MESSAGE_TIMEOUT": "1"},
    )
    yield Servers(main, first)
    logs = stop(main) + stop(first)
    (root / "server.log").write_text(logs)
    # Checked here, after every test of the module has run and both servers have exited
    # (so every line they would log is in): exactly the tokens the tests sent.
    assert "handshake refused" in logs
    assert SECRET not in logs
    leaked = leaked_tokens(logs, SENT_TOKENS)
    assert not leaked, f"{len(leaked)} of the {len(SENT_TOKENS)} tokens sent reached the logs"


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])


class RawClient:
    """A WebSocket client over a raw socket: wsproto for what is valid, bytes for what is not."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.events: list[ev.Event] = []

    async def send(self, event: ev.Event) -> None:
        await self.send_raw(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        record_tokens(data)
        await self.stream.send_all(data)

    async def next_event(self) -> ev.Event | None:
        while not self.events:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, ev.Ping):
                    await self.send(event.response())
                else:
                    self.events.append(event)
        return self.events.pop(0)

    async def message(self) -> dict[str, Any]:
        while True:
            event = await self.next_event()
            assert isinstance(event, ev.TextMessage), event
            parsed: dict[str, Any] = json.loads(event.data)
            return parsed

    async def close_code(self) -> int | None:
        while True:
            event = await self.next_event()
            if event is None:
                return None
            if isinstance(event, ev.CloseConnection):
                return event.code


@attrs.frozen
class Answer:
    status: int  # 101 when upgraded
    client: RawClient | None
    body: bytes = b""


async def connect(
    port: int,
    *,
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
    target: str = "/ws",
    raw_request: bytes | None = None,
) -> Answer:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = RawClient(stream)
    extra = list(headers or [])
    if token is not None:
        extra.append((b"authorization", b"Bearer " + token.encode()))
    if raw_request is not None:
        await client.send_raw(raw_request)
    else:
        await client.send(
            ev.Request(host="127.0.0.1", target=target, extra_headers=extra, subprotocols=subprotocols or [])
        )
    body = b""
    while True:
        event = await client.next_event()
        if event is None:
            return Answer(0, None)
        if isinstance(event, ev.AcceptConnection):
            return Answer(101, client)
        if isinstance(event, ev.RejectConnection):
            status = event.status_code
            if not event.has_body:
                return Answer(status, None)
        if isinstance(event, ev.RejectData):
            body += event.data
            if event.body_finished:
                return Answer(status, None, body)


def upgrade_request(
    token: str | None = None,
    *,
    version: bytes = b"HTTP/1.1",
    key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==",
    newline: bytes = b"\r\n",
    extra: tuple[bytes, ...] = (),
) -> bytes:
    """An upgrade request written by hand, for requests wsproto will not make."""
    lines = [
        b"GET /ws " + version,
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
        *extra,
    ]
    if token is not None:
        lines.append(b"Authorization: Bearer " + token.encode())
    return newline.join(lines) + newline + newline


async def raw_status(port: int, request: bytes) -> int:
    """The status code the server answers a hand-written request with (0: none)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await RawClient(stream).send_raw(request)
        head = b""
        while b"\r\n" not in head:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return 0
            if not data:
                return 0
            head += data
        return int(head.split(b" ", 2)[1])


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame, built by hand (for frames no library will send)."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# -- the table ------------------------------------------------------------------------

Attack = Callable[[Servers], Awaitable[None]]
CASES: dict[str, Attack] = {}


def case(name: str) -> Callable[[Attack], Attack]:
    def register(attack: Attack) -> Attack:
        CASES[name] = attack
        return attack

    return register


def refused_with(status: int, token_or: Callable[[], str | None], **kw: Any) -> Attack:
    async def attack(s: Servers) -> None:
        answer = await connect(port_of(s.main), token=token_or(), **kw)
        assert answer.status == status, answer.body

    return attack


JWT_ATTACKS: dict[str, Callable[[], str | None]] = {
    "alg none": lambda: unsigned("none"),
    "alg None": lambda: unsigned("None"),
    "alg NONE": lambda: unsigned("NONE"),
    "alg nOnE": lambda: unsigned("nOnE"),
    "HS256 keyed with the RSA public key PEM": lambda: signed({"alg": "HS256"}, claims(), RSA_PEM),
    "HS256 keyed with the EC public key PEM": lambda: signed({"alg": "HS256"}, claims(), EC_PEM),
    "HS256 keyed with the RSA public key as JWK": lambda: signed({"alg": "HS256"}, claims(), RSA_JWK),
    "HS512 not on the list": lambda: signed({"alg": "HS512"}, claims(), SECRET.encode(), hashlib.sha512),
    "RS512 not on the list": lambda: jwt.encode(claims(), RSA_KEY, algorithm="RS512"),
    "unknown crit": lambda: hs(crit=["exp"]),
    # The classic kid attacks make the server look a key up by kid; we only ever match our own keys.
    "kid path injection": lambda: signed({"alg": "HS256", "kid": "../../../../dev/null"}, claims(), b""),
    "kid sql injection": lambda: signed({"alg": "HS256", "kid": "x' UNION SELECT 'k"}, claims(), b"k"),
    "jku header": lambda: hs(jku="https://evil.example/jwks.json"),
    "x5u header": lambda: hs(x5u="https://evil.example/cert.pem"),
    "embedded jwk header": lambda: hs(jwk=json.loads(RSA_JWK)),
    "issuer with a suffix": lambda: hs(claims(iss=ISS + ".evil")),
    "issuer prefix only": lambda: hs(claims(iss=ISS[:-1])),
    "issuer substring": lambda: hs(claims(iss="issuer.test")),
    "audience list without ours": lambda: hs(claims(aud=["other", "another"])),
    "typ of a refresh token": lambda: hs(typ="refresh+jwt"),
    "exp as a string": lambda: hs(claims(exp=str(int(time.time()) + 300))),
    "nbf as a string": lambda: hs(claims(nbf="0")),
    "iat as a list": lambda: hs(claims(iat=[1])),
    "missing sub": lambda: hs(claims(sub=None)),
    "missing exp": lambda: hs(claims(exp=None)),
    "expired": lambda: hs(claims(exp=int(time.time()) - 5)),
    "two segments": lambda: "abc.def",
    "four segments": lambda: hs() + ".extra",
    "empty segments": lambda: "..",
    "garbage": lambda: "this is not a token",
    "deeply nested header": lambda: b64(b"[" * 3000) + "." + b64(claims()) + ".sig",
    "oversized token": lambda: hs(claims(pad="x" * 9000)),
    "exp of 10**400": lambda: hs(claims(exp=10**400)),
    "iat of 10**400": lambda: hs(claims(iat=10**400)),
    "nbf of -10**400": lambda: hs(claims(nbf=-(10**400))),
    "exp as Infinity": lambda: hs(claims(exp=float("inf"))),
    "exp as NaN": lambda: hs(claims(exp=float("nan"))),
    "sub with an unpaired surrogate": lambda: hs(claims(sub="mallory\ud800")),
    "tenant with an unpaired surrogate": lambda: hs(claims(tenant="\udfff")),
    "jti with an unpaired surrogate": lambda: hs(claims(jti="\ud800x")),
}
for _name, _token in JWT_ATTACKS.items():
    case(f"jwt: {_name}")(refused_with(401, _token))

case("handshake: no token")(refused_with(401, lambda: None))
case("handshake: unknown path")(refused_with(404, good, target="/admin"))
case("handshake: two different tokens")(
    refused_with(400, lambda: good("a"), subprotocols=["wsgate.v1", "bearer." + good("b")])
)
case("handshake: token-only subprotocol")(refused_with(400, lambda: None, subprotocols=["bearer." + good()]))
case("handshake: Basic instead of Bearer")(
    refused_with(400, lambda: None, headers=[(b"authorization", b"Basic YTpi")])
)
case("handshake: bad Origin")(refused_with(403, good, headers=[(b"origin", b"https://evil.example")]))
case("handshake: Origin prefix of an allowed one")(
    refused_with(403, good, headers=[(b"origin", ORIGIN[:-1].encode())])
)
case("handshake: oversized headers")(refused_with(431, good, headers=[(b"x-padding", b"p" * 20000)]))
case("handshake: too many headers")(
    refused_with(431, good, headers=[(f"x-h{i}".encode(), b"1") for i in range(100)])
)


case("handshake: two Origin headers")(
    refused_with(400, good, headers=[(b"origin", ORIGIN.encode()), (b"origin", ORIGIN.encode())])
)
case("handshake: two token cookies in one header")(
    refused_with(
        400,
        lambda: None,
        headers=[
            (b"origin", ORIGIN.encode()),
            (b"cookie", f"wsgate_token={good('a')}; wsgate_token={good('b')}".encode()),
        ],
    )
)
case("handshake: the same token cookie in two headers")(
    refused_with(
        400,
        lambda: None,
        headers=[
            (b"origin", ORIGIN.encode()),
            (b"cookie", f"wsgate_token={good('a')}".encode()),
            (b"cookie", f"theme=dark; wsgate_token={good('a')}".encode()),
        ],
    )
)
case("handshake: one token cookie is admitted (control)")(
    refused_with(
        101,
        lambda: None,
        headers=[(b"origin", ORIGIN.encode()), (b"cookie", f"theme=dark; wsgate_token={good('c')}".encode())],
    )
)


def answers_raw(status: int, request: Callable[[], bytes]) -> Attack:
    async def attack(s: Servers) -> None:
        assert await raw_status(port_of(s.main), request()) == status

    return attack


case("handshake: a well-formed request written by hand is admitted (control)")(
    answers_raw(101, lambda: upgrade_request(good()))
)
case("handshake: HTTP/1.0 upgrade")(answers_raw(400, lambda: upgrade_request(good(), version=b"HTTP/1.0")))
case("handshake: Sec-WebSocket-Key of 8 bytes")(
    answers_raw(400, lambda: upgrade_request(good(), key=base64.b64encode(b"8 bytes!")))
)
case("handshake: Sec-WebSocket-Key that is not base64")(
    answers_raw(400, lambda: upgrade_request(good(), key=b"not base64 at all!!!!!!="))
)
case("handshake: lines ended by a bare LF")(answers_raw(400, lambda: upgrade_request(good(), newline=b"\n")))
case("handshake: one line ended by a bare LF among many headers")(
    answers_raw(400, lambda: upgrade_request(good(), extra=(b"X-A: 1\nX-B: 2",)))
)


@case("handshake: slowloris headers are dropped at the deadline")
async def _slowloris(s: Servers) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(s.main))
    start = trio.current_time()
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    with trio.fail_after(5):
        while True:
            try:
                await stream.send_all(b"X-Slow: 1\r\n")
            except trio.BrokenResourceError:
                break
            with trio.move_on_after(0.3):
                if await stream.receive_some() == b"":
                    break
    assert trio.current_time() - start < 3.5  # server.handshake_timeout = 2 s


@case("handshake: no auth message in first-message mode")
async def _first_message_silent(s: Servers) -> None:
    answer = await connect(port_of(s.first_message))
    assert answer.status == 101 and answer.client is not None
    assert await answer.client.close_code() == 4408


@case("handshake: application message before auth")
async def _first_message_app(s: Servers) -> None:
    answer = await connect(port_of(s.first_message))
    assert answer.client is not None
    await answer.client.send(ev.TextMessage(data=json.dumps({"type": "user_message", "text": "hi"})))
    assert await answer.client.close_code() == 4401


async def upgraded(s: Servers) -> RawClient:
    answer = await connect(port_of(s.main), token=good("mallory"))
    assert answer.client is not None
    assert (await answer.client.message())["type"] == "session.ready"
    return answer.client


def closes_with(code: int, payload: Callable[[RawClient], Awaitable[None]]) -> Attack:
    async def attack(s: Servers) -> None:
        client = await upgraded(s)
        await payload(client)
        assert await client.close_code() == code

    return attack


def answers_error(code: str, data: str | bytes) -> Attack:
    async def attack(s: Servers) -> None:
        client = await upgraded(s)
        event: ev.Event = ev.BytesMessage(data=data) if isinstance(data, bytes) else ev.TextMessage(data=data)
        await client.send(event)
        reply = await client.message()
        assert (reply["type"], reply["code"]) == ("error", code)
        await client.send(ev.TextMessage(data='{"type":"ping","id":"still"}'))
        assert (await client.message())["id"] == "still"

    return attack


case("message: invalid UTF-8")(closes_with(1007, lambda c: c.send_raw(frame(0x1, b"\xff\xfe\xfd"))))
case("message: unmasked frame")(closes_with(1002, lambda c: c.send_raw(frame(0x1, b"{}", masked=False))))
case("message: reserved bits")(closes_with(1002, lambda c: c.send_raw(frame(0x1, b"{}", rsv=0x40))))
case("message: unknown opcode")(closes_with(1002, lambda c: c.send_raw(frame(0x3, b"x"))))
case("message: too big")(closes_with(1009, lambda c: c.send(ev.TextMessage(data="x" * 70000))))


async def _tiny_fragments(client: RawClient) -> None:
    with trio.move_on_after(5):
        await client.send_raw(frame(0x1, b"[", fin=False))
        chunk = b"".join(frame(0x0, b"0," * 50, fin=False) for _ in range(100))
        for _ in range(100):  # 1 MB in 100-byte fragments
            try:
                await client.send_raw(chunk)
            except trio.BrokenResourceError:
                return


case("message: 1 MB in tiny fragments")(closes_with(1009, _tiny_fragments))


async def _many_small_fragments(client: RawClient) -> None:
    await client.send_raw(frame(0x1, b"[", fin=False))
    with trio.move_on_after(5):
        for _ in range(40):  # 2,000 one-byte fragments: far under the size limit, over the count
            try:
                await client.send_raw(frame(0x0, b" ", fin=False) * 50)
            except trio.BrokenResourceError:
                return


case("message: more fragments than allowed")(closes_with(1009, _many_small_fragments))


async def _flood(client: RawClient) -> None:
    with trio.move_on_after(5):
        for _ in range(200):
            try:
                await client.send(ev.TextMessage(data='{"type":"ping"}'))
            except trio.BrokenResourceError:
                return


case("message: flood over the rate")(closes_with(4429, _flood))
case("message: not JSON")(answers_error("bad_message", "not json at all"))
case("message: JSON but not an object")(answers_error("bad_message", "[1,2,3]"))
case("message: type of the wrong type")(answers_error("bad_message", '{"type": 7}'))
case("message: text of the wrong type")(answers_error("bad_message", '{"type": "user_message", "text": {}}'))
case("message: unknown type")(answers_error("unknown_type", '{"type": "admin.shutdown"}'))
case("message: deep JSON")(answers_error("bad_message", '{"type":"ping","x":' + "[" * 500 + "]" * 500 + "}"))
case("message: binary frame")(answers_error("bad_message", b"\x00\x01"))
case("message: ping id with an unpaired surrogate")(
    answers_error("bad_message", '{"type":"ping","id":"\\ud800"}')
)
case("message: text with an unpaired surrogate")(
    answers_error("bad_message", '{"type":"user_message","text":"a\\udfffb"}')
)
case("message: unknown type with an unpaired surrogate")(answers_error("bad_message", '{"type":"\\ud800"}'))
case("message: run id with an unpaired surrogate")(
    answers_error("bad_message", '{"type":"run.cancel","run_id":"\\udbff"}')
)
case("message: a surrogate in a key")(answers_error("bad_message", '{"type":"ping","\\ud800":1}'))
case("message: NaN literal")(answers_error("bad_message", '{"type":"ping","x":NaN}'))
case("message: Infinity literal")(answers_error("bad_message", '{"type":"ping","x":-Infinity}'))
case("message: a number beyond a float")(answers_error("bad_message", '{"type":"ping","x":1e400}'))
case("message: an integer of 5000 digits")(
    answers_error("bad_message", '{"type":"ping","x":' + "9" * 5000 + "}")
)


@case("message: a paired surrogate escape is text, echoed back")
async def _paired_surrogate(s: Servers) -> None:
    client = await upgraded(s)
    await client.send(ev.TextMessage(data='{"type":"ping","id":"\\ud83d\\ude00"}'))
    assert (await client.message()) | {"seq": 0} == {"type": "pong", "id": "\U0001f600", "seq": 0}


@case("message: a frame declaring 100 MB closes 1009 at once")
async def _declared_huge(s: Servers) -> None:
    client = await upgraded(s)
    await client.send_raw(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 100_000_000) + os.urandom(4))
    with trio.fail_after(3):  # the heartbeat would end it only after 20 s
        assert await client.close_code() == 1009


@case("refresh: a token with exp of 10**400 is refused, the connection lives")
async def _refresh_huge(s: Servers) -> None:
    client = await upgraded(s)
    await client.send(
        ev.TextMessage(data=json.dumps({"type": "auth.refresh", "token": hs(claims(exp=10**400))}))
    )
    reply = await client.message()
    assert (reply["type"], reply["code"]) == ("error", "refresh_rejected")
    await client.send(ev.TextMessage(data='{"type":"ping","id":"after"}'))
    assert (await client.message())["id"] == "after"


@case("first message: a token with iat of 10**400 closes 4401")
async def _first_message_huge(s: Servers) -> None:
    answer = await connect(port_of(s.first_message))
    assert answer.client is not None
    await answer.client.send(
        ev.TextMessage(data=json.dumps({"type": "auth", "token": hs(claims(iat=10**400))}))
    )
    assert await answer.client.close_code() == 4401


@case("connection: a user's dropped connections give their slots back")
async def _dropped_slots(s: Servers) -> None:
    clients = [await upgraded(s) for _ in range(10)]  # mallory's limit
    refused = await connect(port_of(s.main), token=good("mallory"))
    assert refused.status == 429
    for client in clients:
        await trio.aclose_forcefully(client.stream)  # TCP gone, no close frame
    # The server sees each drop as it happens, not at once for us: a bounded number of tries.
    for _ in range(50):
        answer = await connect(port_of(s.main), token=good("mallory"))
        if answer.status != 429:
            break
        await trio.sleep(0.05)
    assert answer.status == 101


case("message: auth after auth")(
    answers_error("already_authenticated", json.dumps({"type": "auth", "token": good()}))
)


async def bystander(
    port: int,
    stop: trio.Event,
    failures: list[str],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A well-behaved client: started once its session is ready, then pinging until ``stop``."""
    answer = await connect(port, token=good("bystander"))
    if answer.client is None:
        failures.append(f"bystander refused: {answer.status}")
        task_status.started()
        return
    client = answer.client
    await client.message()
    task_status.started()
    n = 0
    while not stop.is_set():
        n += 1
        await client.send(ev.TextMessage(data=json.dumps({"type": "ping", "id": str(n)})))
        with trio.move_on_after(2) as waited:
            reply = await client.message()
        if waited.cancelled_caught or reply.get("id") != str(n):
            failures.append(
                f"bystander ping {n} failed: {reply if not waited.cancelled_caught else 'timeout'}"
            )
            return
        await trio.sleep(0.05)  # pace the pings under the server's message rate
    await client.send(ev.TextMessage(data='{"type":"user_message","text":"still served"}'))
    with trio.move_on_after(5):
        while (reply := await client.message())["type"] != "agent_completed":
            pass
        if reply.get("status") == "ok":
            return
    failures.append("bystander's agent run did not complete")


@pytest.mark.parametrize("name", list(CASES))
async def test_attack(servers: Servers, name: str) -> None:
    stop_event = trio.Event()
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bystander, port_of(servers.main), stop_event, failures)
        with trio.fail_after(15):
            await CASES[name](servers)
        stop_event.set()
    assert not failures, failures


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read resident memory")
async def test_a_10_mb_fragmented_message_is_refused_in_bounded_memory(servers: Servers) -> None:
    pid = servers.main.proc.pid
    client = await upgraded(servers)
    before = rss_kib(pid)
    fragment = frame(0x0, b"a" * 1024, fin=False)
    await client.send_raw(frame(0x1, b"a" * 1024, fin=False))
    sent = 1024
    with trio.move_on_after(20):
        while sent < 10 * 1024 * 1024:
            try:
                await client.send_raw(fragment * 64)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            sent += 64 * 1024
    assert await client.close_code() == 1009
    assert rss_kib(pid) - before < 4 * 1024  # within a few MB of where it started


LEAKY_WSGATE = (
    sys.executable,
    "-c",
    "import logging, sys\n"
    "import wsgate.auth.authenticator as auth\n"
    "original = auth.Authenticator.authenticate\n"
    "async def leaky(self, token, source):\n"
    "    logging.getLogger('wsgate.auth').warning('LEAK %s', token)\n"
    "    return await original(self, token, source)\n"
    "auth.Authenticator.authenticate = leaky\n"
    "from wsgate.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n",
)


def test_the_log_check_finds_a_token_logged_by_admission(tmp_path: Path) -> None:
    """The check the ``servers`` fixture makes at teardown, proven: the same server, with
    ``log.warning("LEAK %s", token)`` injected into admission, is caught by it."""
    config = tmp_path / "wsgate.toml"
    config.write_text(f'[auth]\nhmac_secret = "{SECRET}"\nissuer = "{ISS}"\naudience = "{AUD}"\n')
    leaky = start_server(tmp_path, "--config", str(config), command=LEAKY_WSGATE)
    tokens = {good("probe-1"), good("probe-2")}

    async def send_them() -> None:
        for token in tokens:
            answer = await connect(port_of(leaky), token=token)
            assert answer.status == 101

    try:
        trio.run(send_them)
    finally:
        logs = stop(leaky)
    assert "LEAK" in logs
    assert leaked_tokens(logs, tokens) == tokens
    assert leaked_tokens(logs, {good("never-sent")}) == set()
