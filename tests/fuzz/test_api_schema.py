"""The API against its own /openapi.json (the contract, docs/api-contract.md), in-process (ASGI),
with every check schemathesis has: no 5xx, every status, content type and header documented,
every schema-valid request taken and every invalid one refused, 405 with its ``Allow``, a
missing or bad token refused. Once as an operator, once as an admin (whose writes stay in the
test's own folder: its catalog, its data directory; no worker runs the queued jobs)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config._auth import OpenAPIAuthConfig

from vmkeep.api import contract
from vmkeep.api.app import create_app
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens
from vmkeep.engine.service.tokens import POLICY
from vmkeep.model import ROLES

# The app is built at import (schemathesis reads its schema then): give it its own catalog.
ROOT = Path(tempfile.mkdtemp(prefix="vmkeep-schema-"))
(ROOT / "config.toml").write_text('version = 1\n[libvirt]\nuri = "test:///default"\n')
CONFIG = load_config(ROOT / "config.toml", environ={"VMKEEP_DATA_DIR": str(ROOT / "data")})
APP = create_app(CONFIG)


def schema_as(role: str) -> schemathesis.schemas.BaseSchema:
    """The schema, its bearer scheme filled with a new token of ``role`` (schemathesis sends
    it, and leaves it out where a case means no token)."""
    secret = tokens.create(Context(CONFIG), f"fuzz-{role}", role)["token"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
    schema.config.auth.openapi = OpenAPIAuthConfig(schemes={"HTTPBearer": {"bearer": secret}})
    return schema


def admin_only() -> list[str]:
    """The operation ids whose policy needs an admin (an operator gets 403 from each)."""
    return [
        route.unique_id
        for route in APP.routes
        if isinstance(route, APIRoute) and contract.token_check(route)
        and ROLES.index(POLICY[policy_key(route)]) > ROLES.index("operator")
    ]  # fmt: skip


def policy_key(route: APIRoute) -> str:
    return next(d.call.action for d in route.dependant.dependencies if hasattr(d.call, "action"))


# every operation as an operator; those an operator may not call, once more as an admin
operator = schema_as("operator")
admin = schema_as("admin").include(operation_id=admin_only())
# schemathesis' generated cases do not run under pytest-xdist (collected, never executed): this
# module runs in the serial phase of `make test`, and scripts/check_report.py checks it ran
pytestmark = pytest.mark.serial

# Checks left out, each with its reason (every other registered check runs everywhere else):
EXCLUDED: dict[str, str] = {}
# ... and for one operation: schema-valid requests the engine refuses for reasons no JSON Schema
# states (positive_data_acceptance expects them taken)
ACCEPTANCE = "positive_data_acceptance"
EXCLUDED_FOR: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/v1/vms"): {ACCEPTANCE: "the body's xml must be a libvirt domain XML"},
    ("POST", "/v1/hosts"): {
        ACCEPTANCE: "an exec driver's vmm_dir must be a folder of scripts on the daemon's host"
    },
    ("POST", "/v1/datastores"): {
        ACCEPTANCE: "a driver's options are checked by reaching the store (its path, host)"
    },
    ("POST", "/v1/backupjobs"): {
        ACCEPTANCE: "schedule is a calendar expression; exactly one of vms/group/pool/all"
    },
    ("PATCH", "/v1/backupjobs/{name}"): {ACCEPTANCE: "schedule is a calendar expression"},
    ("POST", "/v1/vms/{vm}/actions/recover"): {
        ACCEPTANCE: "exactly one of how or redeploy; host and from_backup only with redeploy"
    },
}


def all_checks_enabled() -> None:
    """Every check schemathesis registers is on (its default): none is dropped silently."""
    load_all_checks()
    config = operator.config.checks_config_for(operation=None, phase=None)
    off = [n for n in CHECKS.get_all_names() if not config.get_by_name(name=n).enabled]
    assert not off, f"checks switched off: {off}"


@pytest.fixture(autouse=True)
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # a relative path a case sends stays in the test's folder


def test_every_check_runs() -> None:
    all_checks_enabled()
    names = set(EXCLUDED).union(*EXCLUDED_FOR.values())
    assert names <= set(CHECKS.get_all_names())
    paths = {(m, p) for p, ops in APP.openapi()["paths"].items() for m in map(str.upper, ops)}
    assert set(EXCLUDED_FOR) <= paths  # no exclusion outlives its operation


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


STREAM_SECONDS = 0.2  # how long a case's /v1/events stream runs (it is endless without)


def _seconds(value: object) -> float:
    """A generated max_seconds as the API reads it (inf: none, the stream is endless)."""
    if value is None:
        return float("inf")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0  # not a number: refused at once


def validate(case: schemathesis.Case) -> None:
    if case.operation.path == "/v1/events":
        case.query = case.query or {}
        if _seconds(case.query.get("max_seconds")) > STREAM_SECONDS:
            case.query["max_seconds"] = STREAM_SECONDS
    names = [*EXCLUDED, *EXCLUDED_FOR.get((case.method.upper(), case.operation.path), {})]
    case.call_and_validate(excluded_checks=CHECKS.get_by_names(names))


@operator.parametrize()
@SETTINGS
def test_operator(case: schemathesis.Case) -> None:
    validate(case)


@admin.parametrize()
@SETTINGS
def test_admin(case: schemathesis.Case) -> None:
    validate(case)
