"""A small HTTP/1.1 server on h11 (which parses; we never do), for the admin listener
and the fake auth service. One handler call per request; keep-alive supported."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import h11
import trio

MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 30.0


@attrs.frozen
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


#: Returns the response, or None to drop the connection without one.
Handler = Callable[[Request], Awaitable[Response | None]]


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def connection(stream: trio.SocketStream) -> None:
        await serve_connection(handler, stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, listeners)
        task_status.started(bound)


async def serve_connection(handler: Handler, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    async with stream:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT) as waited:
                request = await _read_request(conn, stream)
            if waited.cancelled_caught or request is None:
                return
            response = await handler(request)
            if response is None:
                return
            if not await _send(conn, stream, response):
                return
            if conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _send(conn, stream, Response(exc.error_status_hint, b'{"error":"bad request"}'))
            return None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                await _send(conn, stream, Response(413, b'{"error":"body too large"}'))
                return None
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(head.method.decode(), head.target.decode("latin-1"), headers, bytes(body))
        else:
            return None


async def _send(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> bool:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
