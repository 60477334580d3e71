"""What every router of the API shares: the engine context of the serving thread, the token
check of a route (``require``), the work and stream slots, and the JSON responses."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from vmkeep import jsontext
from vmkeep.api import limits
from vmkeep.config import Config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service.workers import WorkSlots


@dataclass(frozen=True)
class Api:
    config: Config
    ctx: Callable[[], Context]  # one engine Context per server thread
    require: Callable[[str], Any]  # the dependency checking a token's role for a policy key
    is_local: Callable[[Any], bool]  # the request came over the daemon's own socket
    token_valid: Callable[[Any], Any]  # async: the request's token is still there
    work: WorkSlots
    streams: limits.StreamSlots
    # set when the server begins to stop (SIGTERM): open streams and waits end at their next look
    stopping: threading.Event

    @property
    def read(self) -> Any:
        return self.require("read")


class FastJSON(JSONResponse):
    """Reads answer straight from the engine's plain dicts (FastAPI's ``jsonable_encoder``
    walked every value of a 1,000-VM list twice), in the CLI's JSON (``jsontext``)."""

    def render(self, content: Any) -> bytes:
        return jsontext.dumps(content)


def jsonable(data: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(data)


def accepted(job: dict[str, Any]) -> JSONResponse:
    """202 with the queued job and its ``Location``."""
    return JSONResponse(
        {"job": jsonable(job)}, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"}
    )
