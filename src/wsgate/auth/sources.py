"""Where a token may come from in the upgrade request.

A pure function over the request's headers and offered subprotocols. Two
different tokens in one request are refused (400), never merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

import attrs

from ..errors import BadRequest
from .tokens import TokenSource

PROTOCOL = "wsgate.v1"
BEARER_PREFIX = "bearer."


@attrs.frozen
class Credentials:
    """What the upgrade request carried: at most one token, and the subprotocol to select."""

    token: str | None
    source: TokenSource | None
    subprotocol: str | None


def extract_credentials(
    headers: Sequence[tuple[bytes, bytes]],
    subprotocols: Sequence[str],
    *,
    header: bool = True,
    subprotocol: bool = True,
    cookie: str | None = None,
    target: str | None = None,
) -> Credentials:
    """Find the token in the request, or raise :class:`BadRequest`.

    ``cookie``: the cookie name to read a token from (None: off). ``target``: the request
    target to read ``access_token`` from (None: off).
    """
    found: list[tuple[str, TokenSource]] = []
    if cookie is not None:
        found.extend((value, TokenSource.COOKIE) for value in _cookie_values(headers, cookie))
    if target is not None:
        query: dict[str, list[str]] = parse_qs(urlsplit(target).query)
        found.extend((token, TokenSource.QUERY) for token in query.get("access_token", []))
    if header:
        for name, value in headers:
            if name.lower() != b"authorization":
                continue
            text = value.decode("latin-1").strip()
            scheme, _, credential = text.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise BadRequest("Authorization must be 'Bearer <token>'")
            found.append((credential.strip(), TokenSource.HEADER))
    offered_protocol = PROTOCOL in subprotocols
    bearer = [p for p in subprotocols if p.lower().startswith(BEARER_PREFIX)]
    if bearer:
        if not subprotocol:
            raise BadRequest("subprotocol tokens are not enabled")
        if not offered_protocol:
            raise BadRequest(f"a bearer subprotocol must come with {PROTOCOL}")
        found.extend((p[len(BEARER_PREFIX) :], TokenSource.SUBPROTOCOL) for p in bearer)
    distinct = {token for token, _ in found}
    if sum(source is TokenSource.COOKIE for _, source in found) > 1:
        raise BadRequest(f"more than one {cookie} cookie in the request")
    if len(distinct) > 1:
        raise BadRequest("more than one token in the request")
    chosen = PROTOCOL if offered_protocol else None
    if not found:
        return Credentials(None, None, chosen)
    token, source = found[0]
    if not token:
        raise BadRequest("empty token")
    return Credentials(token, source, chosen)


def _cookie_values(headers: Sequence[tuple[bytes, bytes]], name: str) -> list[str]:
    """Every value of cookie ``name`` in the request, one per occurrence.

    ``SimpleCookie`` keeps the last of two cookies of one name, so each pair is read
    on its own: two are refused by the caller, never folded into one.
    """
    values = []
    for header, value in headers:
        if header.lower() != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            if pair.split("=", 1)[0].strip() != name:
                continue
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(pair.strip())
            except CookieError:
                raise BadRequest("malformed Cookie header") from None
            if name not in jar:
                raise BadRequest("malformed Cookie header")
            values.append(jar[name].value)
    return values
