"""Property-based tests over the app's own OpenAPI schema (schemathesis): no 5xx for any generated
input, and every response conforms to the schema (status code, content type, body, headers).

Bounded: a few examples per operation (``max_examples``), so the whole module runs in well under a minute.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from disalign.service.main import create_app
from tests.service.conftest import ADMIN_TOKEN, Artifacts, install, make_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


# The schema is read at collection (schemathesis' lazy fixture loader does not work with pytest 9), so the app is
# built here; it loads nothing until its lifespan runs at the first call, after `calibration` below filled the directory.
ROOT = Path(tempfile.mkdtemp(prefix="disalign-schema-"))
APP = create_app(make_settings(ROOT / "calibration", max_body_bytes=256 * 1024, max_images=4, max_rows=64))
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app, schema.location = APP, "/openapi.json"


@pytest.fixture(scope="module", autouse=True)
def calibration(artifacts: Artifacts) -> Iterator[Path]:
    install(artifacts.good, ROOT / "calibration")
    yield ROOT / "calibration"
    shutil.rmtree(ROOT, ignore_errors=True)


def served_model(case) -> None:
    """Name the served model in /v2/models/{name} (random names only reach the 404, tested in test_app)."""
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters["name"] = "disalign"


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_error_and_responses_match_the_schema(case):
    served_model(case)
    case.call_and_validate(checks=CHECKS)


@schema.include(path="/admin/reload").parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_reload_with_the_admin_token(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)
