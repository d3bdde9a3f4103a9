"""The ``wsgate`` command: ``serve``, ``token``, ``connect`` and ``check-config``."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .auth.devkey import dev_key_path, load_dev_secret
from .auth.tokens import mint_token
from .config import Settings
from .configfile import load_settings, to_toml
from .errors import ConfigError
from .runner import run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsgate", description="Authenticating WebSocket gateway.")
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")

    s = sub.add_parser("serve", help="run the gateway")
    common(s)
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8765)")
    s.add_argument("--dev", action="store_true", default=None, help="force dev mode")
    s.add_argument(
        "--app",
        metavar="APP",
        help="what serves runs: demo (default), noop, echo (a raw WebSocket echo),"
        " or your agent as package.module:attribute",
    )
    s.add_argument("--upstream", metavar="URL", help="relay runs to the agent service at URL")
    s.add_argument("--redis-url", metavar="URL", help="join the other nodes of this gateway through Redis")
    s.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the port (needs Redis)")
    s.add_argument(
        "--demo", action="store_true", default=None, help="admit clients without a token (demo policy)"
    )
    s.add_argument("--policy", choices=["strict", "tolerant", "local", "demo"], help="admission policy")
    s.add_argument("--introspection-url", help="RFC 7662 introspection endpoint of the auth service")
    s.add_argument("--jwks-url", help="JWKS URL to take verification keys from")
    s.add_argument("--admin-port", type=int, help="port of the admin listener (needs admin.api_key)")
    s.add_argument("--log-format", choices=["text", "json"], help="log format (default text)")
    s.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="lowest level logged (default info)",
    )

    t = sub.add_parser("token", help="mint a token signed with the dev key (or auth.hmac_secret)")
    common(t)
    t.add_argument("--sub", required=True, help="subject (user id)")
    t.add_argument(
        "--ttl", type=_positive, default=900.0, help="lifetime in seconds, more than 0 (default 900)"
    )
    t.add_argument("--scope", action="append", default=[], help="a scope; repeat for more")
    t.add_argument("--tenant", help="tenant claim")
    t.add_argument("--jti", help="token id, for revoking it by jti (default: a random one)")

    k = sub.add_parser("connect", help="an interactive client: type messages, see events")
    k.add_argument("url", help="the gateway's WebSocket URL, e.g. ws://127.0.0.1:8765/ws")
    given = k.add_mutually_exclusive_group(required=True)
    given.add_argument("--token", help="the token to connect with")
    given.add_argument("--token-file", metavar="FILE", help="read the token from FILE (again for /refresh)")

    c = sub.add_parser("check-config", help="validate the configuration and print it")
    common(c)
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _settings(args: argparse.Namespace, overrides: dict[str, Any]) -> Settings:
    return load_settings(args.config, os.environ, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "connect":
            return _connect(args)
        return _check_config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"wsgate: config: {problem}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        {
            "server.host": args.host,
            "server.port": args.port,
            "dev.enabled": args.dev,
            "agent.app": args.app,
            "agent.upstream_url": args.upstream,
            "cluster.redis_url": args.redis_url,
            "server.workers": args.workers,
            "auth.policy": "demo" if args.demo else args.policy,
            "auth.introspection_url": args.introspection_url,
            "auth.jwks_url": args.jwks_url,
            "admin.port": args.admin_port,
            "log.format": args.log_format,
            "log.level": args.log_level,
        },
    )
    return run(settings)


def _token(args: argparse.Namespace) -> int:
    settings = _settings(args, {})
    issuer: str | None
    audience: str | None
    if settings.dev_mode:
        path = dev_key_path(settings.dev.key_file)
        created = not path.exists()
        secret = load_dev_secret(path)
        if created:
            print(
                f"wsgate: token: no dev key was at {path}; made a new one. A dev server already"
                " running signs with another key and refuses this token: restart it.",
                file=sys.stderr,
            )
        issuer, audience = (
            settings.auth.issuer or settings.dev.issuer,
            settings.auth.audience or settings.dev.audience,
        )
    elif settings.auth.hmac_secret is not None:
        secret = settings.auth.hmac_secret.encode()
        issuer, audience = settings.auth.issuer, settings.auth.audience
    else:
        print("wsgate: token: needs dev mode or auth.hmac_secret to sign with", file=sys.stderr)
        return 2
    claims = {"tenant": args.tenant} if args.tenant else {}
    print(
        mint_token(
            secret,
            args.sub,
            now=time.time(),
            ttl=args.ttl,
            issuer=issuer,
            audience=audience,
            scopes=args.scope,
            jti=args.jti or secrets.token_hex(8),
            **claims,
        )
    )
    return 0


def _connect(args: argparse.Namespace) -> int:
    import trio

    from .console import console, token_source

    try:
        return trio.run(console, args.url, token_source(args.token, args.token_file))
    except KeyboardInterrupt:
        return 130


def _check_config(args: argparse.Namespace) -> int:
    """Print the effective settings as TOML that ``--config`` reads back (secrets masked)."""
    settings = _settings(args, {})
    mode = "on" if settings.dev_mode else "off"
    print(f"# wsgate {__version__}: the effective configuration; dev mode {mode}")
    print(to_toml(settings), end="")
    return 0
