"""The notification outbox (``engine/service/notify.py``): a read for viewers. Targets are
named ("webhook", "url:<digest>") and shown redacted, never their URLs."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI

from vmkeep.api.base import Api, FastJSON
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import notify


def routes(api: Api, r: FastAPI) -> None:
    """Add these routes to ``r``."""
    ctx, read = api.ctx, api.read

    @r.get("/v1/notifications")
    def list_notifications(
        state: Literal["PENDING", "SENT", "FAILED"] | None = None, who: Actor = read
    ) -> Any:
        """The notifications of finished jobs, newest first."""
        return FastJSON(notify.list_rows(ctx(), state))
