"""Who is looking at a page: the session cookie, its CSRF token and the role checks of the pages.

- The cookie ``vmkeep_session`` holds the API token the user logged in with (``GET/POST
  /login``): HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
  Path=/, Secure when the daemon serves TLS, for ``MAX_AGE`` seconds. ``POST /logout`` clears
  it; the token itself stays valid until an admin revokes it (``vmkeep token revoke``).
- Every form carries a hidden ``csrf`` field: HMAC-SHA256 of the cookie under the daemon's
  session key (``session.key`` in the data dir, 0600, made once and shared by every worker of
  the daemon). A POST whose field does not match (compared in constant time), or whose
  ``Origin`` (else ``Referer``) names another origin than the page's, is refused (403).
- The server enforces roles: a page's form checks the role its action's policy key needs
  (``tokens.authorize``, the API's own check); templates only hide the buttons (``can``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

from fastapi import Request
from starlette.datastructures import FormData

from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import tokens
from vmkeep.errors import Forbidden, InvalidValue, Unauthorized

if TYPE_CHECKING:
    from vmkeep.config import Config
    from vmkeep.engine.core.context import Context

COOKIE = "vmkeep_session"
MAX_AGE = 8 * 3600  # seconds: a working day; then the user logs in again
KEY_FILE = "session.key"  # in the data dir
FORM_TYPE = "application/x-www-form-urlencoded"


class LoginNeeded(Exception):
    """No valid session: the page answers 303 to /login?next=<the page>."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class CsrfRefused(Exception):
    """A POST without the page's CSRF token, or from another origin: 403."""


@dataclass(frozen=True)
class Posted:
    """A checked form: who sent it and its fields (``form["vm"]``, ``form.getlist("vms")``)."""

    actor: Actor
    form: FormData


def key(data_dir: Path) -> bytes:
    """The daemon's session key (32 random bytes), made on first use with 0600 permissions.
    Written to a temporary file and linked into place, so concurrent workers agree on one."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another worker made it first: use theirs
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:  # copied or restored with wider rights: the key is a secret
        path.chmod(0o600)
    secret = path.read_bytes()
    if len(secret) < 32:
        raise InvalidValue(
            str(path), f"{len(secret)} bytes", "delete it; the daemon makes a new one"
        )
    return secret


def csrf_token(session_key: bytes, cookie: str) -> str:
    return hmac.new(session_key, cookie.encode(), hashlib.sha256).hexdigest()


def cookie_of(request: Request) -> str | None:
    value = request.cookies.get(COOKIE)
    return value or None


def actor_of(ctx: Context, cookie: str | None) -> Actor | None:
    """The Actor of a session cookie (its token's name and role); None when missing or revoked."""
    if not cookie:
        return None
    try:
        return Actor(*tokens.authenticate(ctx, f"Bearer {cookie}"))
    except Unauthorized:
        return None


def can(config: Config, actor: Actor | None, policy_key: str) -> bool:
    """Whether ``actor``'s role may do ``policy_key`` (for templates: show the button)."""
    if actor is None:
        return False
    try:  # the API's own check, so a page shows what the server allows and nothing else
        tokens.authorize(actor.name, actor.role, policy_key, config.api.policy)
    except Forbidden:
        return False
    return True


def safe_next(url: str | None) -> str:
    """Where to go after login: a path of this site only (no ``//host`` or ``http:``, and no
    control character: a browser drops a tab or newline from a URL, so ``/<TAB>/host`` would be
    ``//host``)."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "/"
    return url


def login_url(request: Request) -> str:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?next={quote(here, safe='')}"


def same_origin(request: Request) -> bool:
    """Whether the POST's ``Origin`` (else ``Referer``) is this site; true when the browser sent
    neither (the CSRF token is then the guard)."""
    sent = request.headers.get("origin") or request.headers.get("referer")
    if sent is None:
        return True
    parts = urlsplit(sent)
    host = request.headers.get("host", "")
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


async def read_form(request: Request) -> FormData:
    """The urlencoded body of a page's form (the pages send no other kind)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != FORM_TYPE:
        raise CsrfRefused(f"a page's form is sent as {FORM_TYPE}, not {kind}")
    body = await request.body()
    try:
        pairs: list[tuple[str, Any]] = parse_qsl(body.decode(), keep_blank_values=True)
        return FormData(pairs)
    except UnicodeDecodeError as err:
        raise CsrfRefused("the form is not UTF-8 text") from err


def check_csrf(session_key: bytes, request: Request, cookie: str, form: FormData) -> None:
    if not same_origin(request):
        raise CsrfRefused(
            "the form was sent from another site (its Origin is not this dashboard's)"
        )
    sent = str(form.get("csrf") or "")
    if not sent or not hmac.compare_digest(sent, csrf_token(session_key, cookie)):
        raise CsrfRefused(
            "the form's security token is missing or out of date; reload the page and try again"
        )


def set_cookie(response: Any, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, token, max_age=MAX_AGE, path="/", httponly=True,
                        samesite="strict", secure=secure)  # fmt: skip


def clear_cookie(response: Any, secure: bool) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure)


# the actor ``limits.BodyLimit`` notes for a page's POST before its body is read: the page's own
# dependency checks the session (a form without one is sent to /login, not answered 401)
NOT_YET = Actor("-", "-")
