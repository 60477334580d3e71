"""Sending one notification (``notify.py`` keeps the outbox): the configured targets, the
webhook's signed JSON POST, one notification-library (apprise) URL, and the redaction that keeps
their secrets out of logs, rows and output (docs/notifications.md).

A webhook URL may carry a token in its path or query (Slack-style hooks) and an apprise URL a
password or a token in its host (``tgram://TOKEN/CHAT``): a target is only ever shown as
``redact(url)``, and every error text passes ``scrub`` before it is logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from vmkeep import jsontext
from vmkeep.config import NotifyConfig

SIGNATURE_HEADER = "X-Vmkeep-Signature"
ERROR_MAX = 500  # characters of an error kept on a row
# loggers of the libraries that send: their records are scrubbed (httpx logs each request's URL
# at INFO, urllib3 its path at DEBUG, apprise an unparsable URL whole)
LIBRARY_LOGGERS = ("httpx", "httpcore", "apprise", "urllib3.connectionpool")
# a URL in a text, without the punctuation that follows it
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{1,31}://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]]")


@dataclass(frozen=True)
class Target:
    """One place to send to: ``name`` is what rows store ("webhook" or "url:" and a digest
    of the URL: a row follows its URL, not its place in ``urls``, when the list changes)."""

    name: str
    url: str  # the secret: never logged, stored or shown

    @property
    def shown(self) -> str:
        return redact(self.url)


def targets(cfg: NotifyConfig) -> list[Target]:
    """The configured targets, in order: the webhook, then each apprise URL."""
    found = [Target("webhook", cfg.webhook_url.get_secret_value())] if cfg.webhook_url else []
    found += [Target(url_name(u.get_secret_value()), u.get_secret_value()) for u in cfg.urls]
    with _SECRETS_LOCK:
        for t in found:
            _SECRETS.update(_fragments(t.url))
        if cfg.webhook_secret is not None:
            _SECRETS.add(cfg.webhook_secret.get_secret_value())
    _install_log_scrub()
    return found


def _shown_host(host: str) -> bool:
    """A host name or address is shown; a "host" that is no DNS name (``slack://TokenA/...``,
    ``tgram://123:TOKEN/...``) is a credential and is hidden."""
    return "." in host or ":" in host or host == "localhost"


def url_name(url: str) -> str:
    """An apprise URL's name in the outbox: ``url:`` and 12 hex digits of its SHA-256 (the URL
    holds passwords: never stored; the digest names it without revealing it)."""
    return "url:" + hashlib.sha256(url.encode()).hexdigest()[:12]


def redact(url: str) -> str:
    """A target as it may be shown: its scheme and host, e.g. ``https://hooks.example.com/…``
    or ``mailto://…@smtp.example.com``; user, password, path, query and a host that is no DNS
    name are replaced by ``…``."""
    try:
        p = urlsplit(url.strip())
        host, port = p.hostname or "", p.port
    except ValueError:  # a port that is no number: the "host" is a token
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://…" if scheme.isalnum() else "…"
    if not p.scheme:
        return "…"
    user = "…@" if "@" in p.netloc else ""
    where = (host + (f":{port}" if port else "")) if _shown_host(host) else "…"
    rest = "/…" if p.path.strip("/") or p.query or p.fragment else ""
    return f"{p.scheme}://{user}{where}{rest}"


def _fragments(url: str) -> set[str]:
    """The parts of a target URL that may be secret, to cut out of any text (``scrub``): the
    URL, its credentials, a host that is no DNS name, its path and query, and long path
    segments and query values (tokens); not a plain host or a short word of the path."""
    url = url.strip()
    parts = {url}
    try:
        p = urlsplit(url)
        if "@" in p.netloc:
            parts.add(p.netloc)
        if p.hostname and not _shown_host(p.hostname):
            parts |= {p.netloc, p.hostname}
        creds = {p.username or "", p.password or "", unquote(p.password or "")}
        if p.path.strip("/"):
            parts |= {p.path, p.path.strip("/")}
        parts |= {p.query} | {v for _, v in parse_qsl(p.query) if len(v) >= 8}
        parts |= {seg for seg in p.path.split("/") if len(seg) >= 12}
    except ValueError:  # no parsable port: the "host" is a token
        parts |= {url.split("://", 1)[-1]} | set(re.split(r"[/@?&=]", url.split("://", 1)[-1]))
        creds = set()
    # a short path ("/hook") is no secret, and cutting it would garble every text holding it;
    # a password is one however short
    return {s for s in parts if len(s) >= 8} | {s for s in creds if len(s) >= 3}


# every secret fragment of the targets seen in this process (``targets``)
_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()


def scrub(text: str) -> str:
    """``text`` with every URL redacted and every known secret fragment cut out."""
    text = _URL.sub(lambda m: redact(m.group(0)), text)
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for s in secrets:
        text = text.replace(s, "…")
    return text


def short_error(text: str) -> str:
    """An error as a row stores it: scrubbed, one line, at most ERROR_MAX characters."""
    one = " ".join(scrub(text).split())
    return one if len(one) <= ERROR_MAX else one[: ERROR_MAX - 1] + "…"


class _Scrub(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the logging module's to report
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_SCRUB = _Scrub()
_installed = threading.Lock()


def _install_log_scrub() -> None:
    """Scrub the records of the sending libraries' loggers (once per process)."""
    with _installed:
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            if _SCRUB not in logger.filters:
                logger.addFilter(_SCRUB)


# --- the webhook -----------------------------------------------------------------------------


def body_of(payload: dict[str, Any]) -> bytes:
    """The exact bytes a webhook POSTs (and signs)."""
    return jsontext.dumps(payload)


def signature(secret: str, body: bytes) -> str:
    """The ``X-Vmkeep-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def send_webhook(cfg: NotifyConfig, url: str, payload: dict[str, Any]) -> str | None:
    """POST the payload as JSON; None on a 2xx answer, else the error (scrubbed)."""
    import httpx

    body = body_of(payload)
    headers = {"Content-Type": "application/json", "User-Agent": "vmkeep-notify"}
    if cfg.webhook_secret is not None:
        headers[SIGNATURE_HEADER] = signature(cfg.webhook_secret.get_secret_value(), body)
    try:
        answer = httpx.post(url, content=body, headers=headers, timeout=cfg.timeout)
    except httpx.TimeoutException:
        return f"no answer from {redact(url)} within {cfg.timeout:g} s ([notify] timeout)"
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as err:
        return short_error(f"{type(err).__name__} sending to {redact(url)}: {err}")
    if 200 <= answer.status_code < 300:
        return None
    said = answer.text[:200].strip()
    return short_error(
        f"{redact(url)} answered HTTP {answer.status_code}" + (f": {said}" if said else "")
    )


# --- a notification-library (apprise) URL ----------------------------------------------------

STATUS_TYPES = {"ok": "success", "warnings": "warning", "failed": "failure"}


def title_and_body(payload: dict[str, Any]) -> tuple[str, str]:
    """The short human text of a notification: ``vmkeep: backup of web1 failed: <error>``."""
    kind = payload.get("kind") or "job"
    subject = payload.get("vm") or payload.get("target") or ""
    status = payload.get("status", "")
    title = f"vmkeep: {kind} of {subject} {status}" if subject else f"vmkeep: {kind} {status}"
    if payload.get("event") == "notify.test":
        title = "vmkeep: test notification"
    lines = [title + (f": {payload['error']['message']}" if payload.get("error") else "")]
    for w in payload.get("warnings") or []:
        lines.append(f"warning: {w}")
    facts = [
        ("job", payload.get("job")),
        ("backup job", payload.get("backupjob")),
        ("host", payload.get("host")),
        ("duration", f"{payload['duration_s']:g} s" if payload.get("duration_s") else None),
        ("finished", payload.get("finished")),
    ]
    lines += [f"{k}: {v}" for k, v in facts if v not in (None, "")]
    return title, "\n".join(lines)


def send_apprise(cfg: NotifyConfig, url: str, payload: dict[str, Any]) -> str | None:
    """Send through one apprise URL; None when it was delivered, else the error (scrubbed)."""
    import apprise

    a = apprise.Apprise()
    if not a.add(url):
        scheme = url.split("://", 1)[0] if "://" in url else "(none)"
        return (
            f"the notification library does not understand the URL {redact(url)} "
            f"(scheme {scheme!r}); fix it in [notify] urls"
        )
    for service in a:  # [notify] timeout for each connect and read, as the webhook's
        service.socket_connect_timeout = service.socket_read_timeout = cfg.timeout
    title, body = title_and_body(payload)
    kind = STATUS_TYPES.get(str(payload.get("status")), "info")
    try:
        result = a.notify(body=body, title=title, notify_type=kind, timeout=cfg.timeout * 3)
    except Exception as err:  # noqa: BLE001 - a plugin's bug is this target's error
        return short_error(f"{type(err).__name__} sending to {redact(url)}: {err}")
    if result:
        return None
    said = "; ".join(e.message for e in result.logs() if e.level in ("WARNING", "ERROR"))
    return short_error(f"sending to {redact(url)} failed" + (f": {said}" if said else ""))


def send(cfg: NotifyConfig, target: Target, payload: dict[str, Any]) -> str | None:
    """Deliver ``payload`` to ``target`` now; None on success, else the error (scrubbed)."""
    try:
        if target.name == "webhook":
            return send_webhook(cfg, target.url, payload)
        return send_apprise(cfg, target.url, payload)
    except Exception as err:  # noqa: BLE001 - never raise out of a delivery
        return short_error(f"{type(err).__name__} sending to {target.shown}: {err}")
