"""A real OAuth 2 / OpenID provider for the tests: django-oauth-toolkit, as its own process.

    python tests/idp_server.py --db PATH --key PEM [--inactive-key PEM] [--port N] [--slow-hasher]

Serves on 127.0.0.1 (port 0: any free one) with a SQLite database at ``--db`` (a
temp file, so that a restarted provider still knows the tokens it issued), and
prints ``idp listening on http://127.0.0.1:PORT`` once ready. The issuer is
``http://127.0.0.1:PORT/o``; its own endpoints are django-oauth-toolkit's:
OpenID discovery and JWKS, RFC 8414 metadata, token, RFC 7662 introspection and
RFC 7009 revocation. Users' access tokens are RS256 JWTs signed with the OpenID key
(the ``kid`` its JWKS publishes), made by its ``ACCESS_TOKEN_GENERATOR`` hook, with
``aud`` = ``wsgate`` (``other-service`` when the scope ``other-audience`` is
asked for); a service client's (client-credentials grant) are opaque.
Client secrets are hashed with MD5 unless ``--slow-hasher`` keeps
Django's PBKDF2 (half a second a check, as in production).

Clients (created on first start): ``chat`` (password grant, the user-facing
app), ``wsgate`` (client credentials, what the gateway authenticates as, with a
secret holding ``+``, ``%``, ``:`` and a space); users ``alice`` and ``bob``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import jwt

CHAT_SECRET = "chat-app-secret"
WSGATE_SECRET = "gw+s3cret%2F:with space"
PASSWORD = "correct horse battery staple"
AUDIENCE = "wsgate"

_state: dict[str, Any] = {}


def jwt_access_token(request: Any, refresh_token: bool = False) -> str:
    """django-oauth-toolkit's ACCESS_TOKEN_GENERATOR: a user's access token, as an RS256 JWT.

    A service client's token (client-credentials grant) is opaque: with OpenID on,
    django-oauth-toolkit takes any JWT-shaped bearer token presented at its own endpoints
    (introspection among them) for an ID token, and fails on it.
    """
    if request.grant_type == "client_credentials":
        return uuid.uuid4().hex + uuid.uuid4().hex
    scopes = list(request.scopes or [])
    user = getattr(request, "user", None)
    subject = user.get_username() if user is not None and user.is_authenticated else request.client_id
    now = int(time.time())
    claims = {
        "iss": _state["issuer"],
        "sub": subject,
        "aud": "other-service" if "other-audience" in scopes else AUDIENCE,
        "iat": now,
        "exp": now + _state["ttl"],
        "jti": uuid.uuid4().hex,
        "scope": " ".join(scopes),
        "client_id": request.client_id,
    }
    return jwt.encode(claims, _state["key"], algorithm="RS256", headers={"kid": _state["kid"]})


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--inactive-key", action="append", default=[])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttl", type=int, default=600)
    parser.add_argument("--slow-hasher", action="store_true")
    args = parser.parse_args()

    server = make_server("127.0.0.1", args.port, lambda environ, start: [], handler_class=_Quiet)
    issuer = f"http://127.0.0.1:{server.server_port}/o"
    pem = Path(args.key).read_text()

    import django
    from django.conf import settings

    hashers = [] if args.slow_hasher else ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.configure(
        DEBUG=False,
        SECRET_KEY="idp-for-wsgate-tests",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "oauth2_provider"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": args.db}},
        MIDDLEWARE=[],
        USE_TZ=True,
        # A failure of the provider's own is printed to its stderr (the tests show it).
        LOGGING={
            "version": 1,
            "handlers": {"stderr": {"class": "logging.StreamHandler"}},
            "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR"}},
        },
        **({"PASSWORD_HASHERS": hashers} if hashers else {}),
        OAUTH2_PROVIDER={
            "OIDC_ENABLED": True,
            "OIDC_ISS_ENDPOINT": issuer,
            "OIDC_RSA_PRIVATE_KEY": pem,
            "OIDC_RSA_PRIVATE_KEYS_INACTIVE": [Path(p).read_text() for p in args.inactive_key],
            "ACCESS_TOKEN_GENERATOR": "__main__.jwt_access_token",
            "ACCESS_TOKEN_EXPIRE_SECONDS": args.ttl,
            "SCOPES": {"openid": "", "read": "", "introspection": "", "other-audience": ""},
        },
    )
    django.setup()

    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from jwcrypto import jwk

    _state.update(
        issuer=issuer,
        key=pem.encode(),
        kid=jwk.JWK.from_pem(pem.encode()).thumbprint(),
        ttl=args.ttl,
    )
    call_command("migrate", verbosity=0, interactive=False)
    _populate()
    server.set_app(get_wsgi_application())
    print(f"idp listening on http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


def _populate() -> None:
    from django.contrib.auth.models import User
    from oauth2_provider.models import Application

    for name in ("alice", "bob"):
        if not User.objects.filter(username=name).exists():
            User.objects.create_user(name, password=PASSWORD)
    apps = [
        ("chat", CHAT_SECRET, Application.GRANT_PASSWORD),
        ("wsgate", WSGATE_SECRET, Application.GRANT_CLIENT_CREDENTIALS),
    ]
    for client_id, secret, grant in apps:
        if not Application.objects.filter(client_id=client_id).exists():
            Application.objects.create(
                client_id=client_id,
                client_secret=secret,
                name=client_id,
                client_type=Application.CLIENT_CONFIDENTIAL,
                authorization_grant_type=grant,
            )


def _urls() -> list[Any]:
    from django.urls import include, path

    return [path("o/", include("oauth2_provider.urls", namespace="oauth2_provider"))]


def __getattr__(name: str) -> Any:  # ROOT_URLCONF = this module: urlpatterns made on first use
    if name == "urlpatterns":
        return _urls()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
