"""What every page module shares: ``Web`` (the API's context and token policy, the session key,
the templates) with the page dependencies (``page_actor``, ``form_actor``), ``render`` and
``act`` (an action through the action table, then the job's page), and ``PageRoute``, which
turns a refusal into a page: no session -> 303 to /login, a bad form -> 403, an engine error ->
its message in words (the text the CLI prints) with the error's HTTP status."""

from __future__ import annotations

import hashlib
import hmac
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment
from starlette.concurrency import run_in_threadpool

from vmkeep.api import limits
from vmkeep.api.base import Api
from vmkeep.config import Config
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import actions, tokens
from vmkeep.errors import VmkeepError
from vmkeep.model import ROLES
from vmkeep.web import render as R
from vmkeep.web import session as S

FLASH = "vmkeep_flash"  # a one-shot message for the next page (signed, never a secret)
# every page: not kept by caches, never framed by another site (clickjacking), only its own
# script and stylesheet (an injected inline script would not run), forms sent only here
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class Web:
    api: Api
    key: bytes  # the daemon's session key (session.key)
    secure: bool  # the daemon serves TLS: cookies are Secure
    env: Environment = field(default_factory=R.environment)

    @property
    def config(self) -> Config:
        return self.api.config

    def ctx(self) -> Context:
        return self.api.ctx()

    # --- who ---------------------------------------------------------------------------------
    def can(self, actor: Actor | None, policy_key: str) -> bool:
        return S.can(self.config, actor, policy_key)

    @property
    def page_actor(self) -> Any:
        """The dependency of a page: its viewer's Actor, or 303 to /login."""

        def check(request: Request) -> Actor:
            who = S.actor_of(self.ctx(), S.cookie_of(request))
            if who is None:
                raise S.LoginNeeded(S.login_url(request))
            request.scope.setdefault("state", {})[limits.ACTOR] = who
            return who

        return Depends(check)

    def form_actor(self, policy_key: str | None) -> Any:
        """The dependency of a form's POST: the CSRF check, then the role ``policy_key`` needs
        (None: the handler authorizes, e.g. through ``act``); gives a ``session.Posted``."""

        async def check(request: Request) -> S.Posted:
            cookie = S.cookie_of(request)
            who = await run_in_threadpool(S.actor_of, self.ctx(), cookie)
            if who is None or cookie is None:
                raise S.LoginNeeded("/login")
            request.scope.setdefault("state", {})[limits.ACTOR] = who
            form = await S.read_form(request)
            S.check_csrf(self.key, request, cookie, form)
            if policy_key is not None:
                self.authorize(who, policy_key)
            return S.Posted(who, form)

        return Depends(check)

    def authorize(self, who: Actor, policy_key: str) -> None:
        tokens.authorize(who.name, who.role, policy_key, self.config.api.policy)

    # --- answers -----------------------------------------------------------------------------
    def render(self, request: Request, template: str, status: int = 200, **data: Any) -> Response:
        """``template`` with the page's common context (actor, csrf, nav, flash, can, plot, bar),
        answered with HTTP ``status``."""
        state = request.scope.get("state", {})
        who = state.get(limits.ACTOR)
        actor = who if isinstance(who, Actor) and who.role in ROLES else None
        cookie = S.cookie_of(request)
        flash = self.read_flash(request)
        context = {
            "request": request,
            "path": request.url.path,
            "actor": actor,
            "csrf": S.csrf_token(self.key, cookie) if cookie and actor else "",
            "nav": [(h, label) for h, label, role in R.NAV if actor and self.at_least(actor, role)],
            "flash": flash,
            "error": None,
            "can": lambda key: self.can(actor, key),
            "plot": R.plot,
            "bar": R.bar,
        } | data
        html = self.env.get_template(template).render(context)
        response = HTMLResponse(html, status_code=status)
        response.headers.update(PAGE_HEADERS)
        if flash is not None:
            response.delete_cookie(FLASH, path="/")
        return response

    @staticmethod
    def at_least(actor: Actor, role: str) -> bool:
        return ROLES.index(actor.role) >= ROLES.index(role)

    def redirect(self, url: str, flash: str | None = None) -> RedirectResponse:
        """303 to ``url`` (a POST's answer), with a one-shot message for the next page."""
        response = RedirectResponse(url, status_code=303)
        if flash:
            raw = urlsafe_b64encode(flash.encode()).decode()
            sig = hmac.new(self.key, raw.encode(), hashlib.sha256).hexdigest()[:32]
            response.set_cookie(FLASH, f"{raw}.{sig}", max_age=60, path="/", httponly=True,
                                samesite="strict", secure=self.secure)  # fmt: skip
        return response

    def read_flash(self, request: Request) -> str | None:
        raw, _, sig = request.cookies.get(FLASH, "").partition(".")
        if not raw:
            return None
        good = hmac.new(self.key, raw.encode(), hashlib.sha256).hexdigest()[:32]
        if not hmac.compare_digest(sig, good):
            return None
        try:
            return urlsafe_b64decode(raw.encode()).decode()
        except ValueError:
            return None

    def act(self, who: Actor, kind: str, data: dict[str, Any]) -> RedirectResponse:
        """Queue action ``kind`` with ``data`` through the action table, as the API's route
        would (the role its policy key needs, its checks, the per-token queue bound), then 303
        to the job's page. A refusal raises the engine's error (shown by ``PageRoute``)."""
        a = actions.action(kind)
        self.authorize(who, a.policy)
        p = actions.parse(a, {k: v for k, v in data.items() if v is not None and v != ""})
        job = actions.enqueue(self.ctx(), a, p, who, self.config.api.max_queued_per_token)
        return self.redirect(
            f"/jobs/{job['id']}", f"Queued {kind} of {job['target']} as job {job['id']}."
        )

    def router(self) -> APIRouter:
        """A router for page routes: not in the OpenAPI document, refusals shown as pages."""
        web = self

        class Bound(PageRoute):
            pass

        Bound.web = web
        return APIRouter(route_class=Bound, include_in_schema=False)


class PageRoute(APIRoute):
    """A page's route: its refusals and errors answered as pages (see the module's text)."""

    web: Web

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        web = self.web

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except S.LoginNeeded as need:
                return RedirectResponse(need.next_url, status_code=303)
            except S.CsrfRefused as refused:
                return failed(web, request, 403, "Refused", str(refused))
            except VmkeepError as err:
                status = 422 if err.http_status == 400 else err.http_status
                return failed(web, request, status, type(err).__name__, str(err))
            except RequestValidationError as err:
                first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid"}
                where = ".".join(str(p) for p in first.get("loc", ()))
                return failed(web, request, 422, "InvalidValue", f"{where}: {first.get('msg')}")

        return page


def failed(web: Web, request: Request, status: int, code: str, message: str) -> Response:
    """The error page: the message in words, and a way back to the page the form was on."""
    back = request.url.path if request.method == "GET" else "/"
    referer = request.headers.get("referer")
    if request.method != "GET" and referer and S.same_origin(request):
        split = urlsplit(referer)
        back = S.safe_next(split.path + (f"?{split.query}" if split.query else ""))
    return web.render(request, "error.html", status=status, code=code, error=message, back=back)
