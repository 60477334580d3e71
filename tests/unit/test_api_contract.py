"""The OpenAPI document as the contract (api/contract.py): what each kind of route declares,
the error body's model, the 405's Allow header, the names rule as the schema's pattern."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST

from vmkeep.api.app import create_app
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens
from vmkeep.engine.service.params import NAME_SCHEMA
from vmkeep.names import MAX_LEN, check_name


@pytest.fixture
def app(tmp_path: Path) -> Any:
    (tmp_path / "config.toml").write_text("version = 1\n")
    config = load_config(tmp_path / "config.toml", environ={"VMKEEP_DATA_DIR": str(tmp_path)})
    built = create_app(config, local_socket=tmp_path / "api.sock")
    built.state.secret = tokens.create(Context(config), "t", "operator")["token"]
    built.state.config = config
    return built


def responses(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = doc["paths"][path][method]["responses"]
    return out


def test_each_kind_of_route_declares_what_it_can_answer(app: Any) -> None:
    doc = app.openapi()
    action = responses(doc, "post", "/v1/vms/{vm}/backup")
    assert set(action) == {"202", "401", "403", "404", "409", "413", "421", "422", "429", "5XX"}
    assert "Location" in action["202"]["headers"]
    read = responses(doc, "get", "/v1/vms/{vm}")
    assert set(read) == {"200", "304", "401", "403", "404", "421", "422", "5XX"}
    assert "ETag" in read["200"]["headers"] and "ETag" in read["304"]["headers"]
    plain = responses(doc, "get", "/v1/pools")  # no parameter: no 422, no 404
    assert set(plain) == {"200", "304", "401", "403", "421", "5XX"}
    assert set(responses(doc, "get", "/healthz")) == {"200"}  # no token, no parameter
    # the long requests' own 429 (a token's stream slots), kept by the pass
    assert "429" in responses(doc, "get", "/v1/events")
    assert "429" in responses(doc, "get", "/v1/jobs/{job_id}")


def test_error_bodies_and_content_types(app: Any) -> None:
    doc = app.openapi()
    body = doc["components"]["schemas"]["ErrorBody"]
    detail = doc["components"]["schemas"][body["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
    assert set(detail["required"]) == {"code", "message"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status[0] in "45":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    metrics = responses(doc, "get", "/metrics")["200"]["content"]
    assert list(metrics) == [CONTENT_TYPE_LATEST]  # Prometheus' text format
    assert set(responses(doc, "get", "/v1/events")["200"]["content"]) == {"text/event-stream"}
    download = responses(doc, "get", "/v1/backups/{backup}/files/content")["200"]["content"]
    assert set(download) == {"application/octet-stream"}
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_a_declared_error_is_what_the_api_answers(app: Any) -> None:
    client = TestClient(app)
    r = client.get("/v1/vms/nosuch")
    assert r.status_code == 401 and set(r.json()["error"]) == {"code", "message"}
    auth = {"Authorization": f"Bearer {app.state.secret}"}
    assert client.get("/v1/vms/nosuch", headers=auth).status_code == 404
    r = client.post("/v1/vms/a/backup", content=b"\xff\xfe", headers=auth)
    assert r.status_code == 422 and r.json()["error"]["code"] == "InvalidValue"  # was a 400


def test_a_405_lists_every_method_of_its_path(app: Any) -> None:
    client = TestClient(app)
    r = client.put("/v1/backups/1")  # GET is show_backup's route, DELETE the action's
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    r = client.options("/v1/vms")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}


@pytest.mark.parametrize(
    "name", ["a", "1a", "12", "1.", ".a", "a" * MAX_LEN, "a" * (MAX_LEN + 1), "_a", "a b", ".."]
)
def test_the_schema_pattern_is_the_names_rule(name: str) -> None:
    """The schema's pattern and maxLength say what check_name takes, no more, no less."""
    by_schema = bool(re.search(NAME_SCHEMA["pattern"], name)) and len(name) <= MAX_LEN
    try:
        check_name("name", name)
        by_engine = True
    except Exception:
        by_engine = False
    assert by_schema == by_engine


def test_request_models_show_their_constraints(app: Any) -> None:
    schemas = app.openapi()["components"]["schemas"]
    for model in ("DatastoreRequest", "GroupRequest", "PoolRequest", "BackupJobRequest"):
        assert schemas[model]["properties"]["name"]["pattern"] == NAME_SCHEMA["pattern"], model
    assert schemas["NoteRequest"]["properties"]["text"]["maxLength"] == 1024
    delete = app.openapi()["paths"]["/v1/backups/{backup}"]["delete"]["parameters"]
    increment = next(p for p in delete if p["name"] == "increment")["schema"]["anyOf"][0]
    assert increment["minimum"] == 0  # the action's query keeps its field's bounds


def test_the_yes_no_words_of_the_schema_are_the_engines() -> None:
    """A yes/no policy key's words in the schema are those ``backup_config.validate`` takes
    (one list: a word the engine takes is not refused by the request's validation)."""
    from vmkeep.api.pool_routes import PolicyKeys, policy_schema
    from vmkeep.engine.core import backup_config

    for word in (*backup_config.YES_WORDS, *backup_config.NO_WORDS):
        assert PolicyKeys.model_validate({"memory": word}).memory == word
        backup_config.validate("memory", word)  # the engine takes it too
        shown = policy_schema()["properties"]["memory"]["anyOf"]
        assert any(word in s.get("enum", []) for s in shown), word
    with pytest.raises(ValueError, match="use true, false or one of yes"):
        PolicyKeys.model_validate({"memory": "maybe"})


def test_a_files_read_of_a_point_not_valid_is_a_declared_409(app: Any) -> None:
    """``GET /v1/backups/{backup}/files[/content]`` of a FAILED backup: the engine's WrongState
    (409), which the document declares for these reads (not only for writes)."""
    import uuid

    from vmkeep.catalog.tables import Backup, Datastore, Increment, Vm

    ctx = Context(app.state.config)
    with ctx.catalog.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        vm = Vm(name="web", uuid=str(uuid.uuid4()), host_uri="qemu:///system", state="UNKNOWN",
                lcm_state="UNKNOWN", backup_config={})  # fmt: skip
        s.add_all([ds, vm])
        s.flush()
        b = Backup(vm_id=vm.id, datastore_id=ds.id, chain="web/1", mode="FULL", status="FAILED")
        s.add(b)
        s.flush()
        s.add(Increment(backup_id=b.id, seq=0, status="FAILED", size=1, files=[]))
        backup = b.id
    client = TestClient(app)
    h = {"Authorization": f"Bearer {app.state.secret}"}
    doc = app.openapi()
    for url, path in ((f"/v1/backups/{backup}/files", "/v1/backups/{backup}/files"),
                      (f"/v1/backups/{backup}/files/content?path=/etc/hostname",
                       "/v1/backups/{backup}/files/content")):  # fmt: skip
        r = client.get(url, headers=h)
        assert r.status_code == 409 and r.json()["error"]["code"] == "WrongState", r.text
        assert "409" in responses(doc, "get", path), path
