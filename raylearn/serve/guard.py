"""Request guard of the HTTP ingress: bearer auth and body-size limits, checked before the body is read.

:class:`Guard` is the state (token, limits), held by the ingress instance and updated by its ``reconfigure``;
:class:`GuardMiddleware` is a pure ASGI middleware that reads it for every request, answers 401 / 413 / 400
from the headers alone, and counts the bytes of bodies that declare no ``Content-Length`` (chunked).
Starlette's ``RequestBodyLimitMiddleware`` is not used: its limit is fixed at construction and its 413 is plain
text, while this limit depends on the content type and follows ``reconfigure``, and every error is JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

#: paths served without a token (liveness, the API docs, MONAI Label's auth discovery and token exchange, and the
#: status page's HTML and plotly.js, which hold no data: the page asks the API with the user's token)
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/auth/",
                        "/auth", "/auth/token", "/", "/ui/plotly.min.js"})
#: roles of annotation users, each with the roles it includes
ROLES = {"annotator": frozenset({"annotator"}), "admin": frozenset({"annotator", "admin"})}


def token_digest(token: str) -> str:
    """sha256 hex of a bearer token (what a users list may hold instead of the token)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    """Who a request is: ``name`` and ``role`` (``annotator`` or ``admin``; the service token is ``admin``)."""

    name: str
    role: str

    def has(self, role: str) -> bool:
        return role in ROLES[self.role]
#: limit of request bodies that are not multipart uploads (JSON click lists)
MAX_JSON_BYTES = 1 << 20
NO_AUTH_WARNING = ("auth is OFF: no bearer token reached this replica, so anyone who can reach the port may use "
                   "the API. Set SamMed3DIngress.user_config.auth_token, or {env} in the application's "
                   "runtime_env.env_vars (the shell environment of `serve run` does not reach the replicas of an "
                   "already running cluster), or start with `raylearn serve`, which passes {env} on.")


@dataclass
class Guard:
    """Per-replica guard state. ``token`` None = no auth; ``source`` says where the token came from."""

    token: str | None = None
    source: str = "none"
    max_upload_bytes: int = 256 << 20
    warnings: list[str] = field(default_factory=list)
    #: annotation users: sha256 of their token -> User
    users: dict[str, User] = field(default_factory=dict)

    def configure(self, config_token: str | None, build_token: str | None, env_name: str, require: bool,
                  max_upload_mb: float, announce: bool = True) -> None:
        """Resolve the token (config, then the build argument, then the replica's env var) and the limits.

        Raises:
            ValueError: ``require`` and no token was found anywhere (the deployment fails to start).
        """
        found = [(config_token, "user_config auth_token"), (build_token, "build_app token"),
                 (os.environ.get(env_name), f"env {env_name} of the replica")]
        token, source = next(((t, s) for t, s in found if t), (None, "none"))
        if token is None and not self.users and require:
            raise ValueError("require_auth is true but no token reached the replica: "
                             + NO_AUTH_WARNING.format(env=env_name).split(". ", 1)[1])
        self.token, self.source = token, source
        self.max_upload_bytes = int(max_upload_mb * (1 << 20))
        self.warnings = [] if self.enabled else [NO_AUTH_WARNING.format(env=env_name)]
        if not self.enabled and announce:
            log.warning("raylearn serve: %s", self.warnings[0])

    @property
    def enabled(self) -> bool:
        """Auth is on when a service token or any annotation user exists."""
        return self.token is not None or bool(self.users)

    def set_users(self, users: dict[str, User]) -> None:
        """Annotation users by token sha256; with none and no service token, auth is off."""
        self.users = dict(users)
        self.warnings = [w for w in self.warnings if not w.startswith("auth is OFF")] if self.enabled else \
            self.warnings

    def identify(self, header: str | None) -> User | None:
        """The user of an ``Authorization`` header: the service token is the admin ``service``; with auth off
        everybody is the admin ``anonymous``; None when the token is missing or unknown."""
        if not self.enabled:
            return User("anonymous", "admin")
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        given = given.strip()
        if self.token is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            return User("service", "admin")
        digest = token_digest(given)
        for known, user in self.users.items():
            if hmac.compare_digest(known, digest):
                return user
        return None

    def authorised(self, header: str | None) -> bool:
        return self.identify(header) is not None


async def _send_error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Auth (401) and declared body size (413) from the request headers, before any handler reads the body."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        g = self.guard
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path not in OPEN_PATHS and not g.authorised(headers.get("authorization")):
            await _send_error(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": "Bearer"})
            return
        ctype = headers.get("content-type", "").lower()
        # uploads: multipart forms, and raw arrays on nnInteractive's protocol (volumes sent as octet-stream)
        multipart = ctype.startswith("multipart/form-data") or (
            ctype.startswith("application/octet-stream") and path.startswith("/nninteractive/"))
        limit = g.max_upload_bytes if multipart else MAX_JSON_BYTES
        what = f"max_upload_mb = {limit / (1 << 20):g}" if multipart else "the 1 MiB of a non-upload body"
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "Content-Length is not a non-negative integer")
                return
            if int(declared) > limit:
                await _send_error(send, 413, f"request body of {int(declared):,} bytes exceeds the limit of "
                                             f"{what} ({limit:,} bytes)")
                return
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:  # no Content-Length (chunked): count as it arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body exceeds the limit of {what} ({limit:,} bytes)")
            return message

        await self.app(scope, counted, send)
