"""Schemathesis against the API's own /openapi.json, in-process (ASGI): whatever it generates,
the API never answers 5xx and every error has the documented shape. Runs with an operator token
(admin routes answer 403, so nothing is created outside the test's folder)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from vmkeep.api.app import create_app
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens

# The app is built at import (schemathesis reads its schema then): give it its own catalog.
ROOT = Path(tempfile.mkdtemp(prefix="vmkeep-schema-"))
(ROOT / "config.toml").write_text("version = 1\n")
CONFIG = load_config(ROOT / "config.toml", environ={"VMKEEP_DATA_DIR": str(ROOT / "data")})
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(CONFIG))
TOKEN: dict[str, str] = {}
# schemathesis' generated cases do not run under pytest-xdist (collected, never executed): this
# module runs in the serial phase of `make test`, and scripts/check_report.py checks it ran
pytestmark = pytest.mark.serial


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    if not TOKEN:
        TOKEN["secret"] = tokens.create(Context(CONFIG), "fuzz", "operator")["token"]


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN['secret']}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}, response.text
