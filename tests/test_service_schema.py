"""schemathesis over every route of the published OpenAPI schema: no 5xx, and every response (status code,
content type, body, headers) is one the schema describes. In-process (ASGI), fixed seed, bounded examples.

Not checked: `positive_data_acceptance` (schema-valid data must be accepted) — a JSON schema cannot express the
config's cross-field rules or that a data file must exist, so such requests are rightly 4xx.
Path parameters are often swapped for the ids of real jobs, so the routes run past their 404 too; those jobs have
ended, so every event stream ends.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from conftest import write_data

from nested_learning.service.app import create_app
from nested_learning.service.jobs import Settings

EXAMPLES = 30  # per operation; with schemathesis's own coverage cases this is well over 1,000 calls in all
ROOT = Path(tempfile.mkdtemp(prefix="nl-schema-"))
WORK = ROOT / "work"
write_data(WORK / "data")
APP = create_app(Settings(db=str(WORK / "jobs.db"), workdir=WORK, run_scheduler=False, max_body=200_000))
SVC = APP.state.jobs
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
CALLS: dict[str, int] = {}
STATUSES: dict[int, int] = {}


def _seed_jobs() -> dict[str, str]:
    """One job per ended status, with metrics rows (the completed one is never resumable)."""
    from nested_learning.config import TrainConfig

    ids = {}
    for status in ("completed", "failed", "stopped"):
        job = SVC.create(TrainConfig.model_validate({"data": {"dir": "data"}, "schedule": {"steps": 4}}))
        SVC.store.transition(job["id"], ["queued"], status, ended_at=time.time(), error="seeded")
        for step in range(1, 5):
            SVC.store.add_metric(job["id"], step, "train", {"train_loss": 1.0 / step})
        ids[status] = job["id"]
    return ids


JOBS = _seed_jobs()


@SCHEMA.hook
def flatmap_path_parameters(context, path_parameters):
    if not path_parameters or "job_id" not in path_parameters:
        return st.just(path_parameters)
    # An event stream follows its job until it ends: only the completed job is sure to stay ended.
    real = [JOBS["completed"]] if context.operation.path.endswith("/events") else list(JOBS.values())
    return st.sampled_from([path_parameters["job_id"], *real]).map(lambda j: {**path_parameters, "job_id": j})


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


@SCHEMA.parametrize()
@seed(20260101)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_response_is_documented_and_none_is_a_5xx(case):
    CALLS[case.operation.label] = CALLS.get(case.operation.label, 0) + 1
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1


def test_the_run_made_over_a_thousand_calls_on_every_operation():
    if not CALLS:
        pytest.skip("the schemathesis cases were not selected")
    operations = {op.ok().label for op in SCHEMA.get_all_operations()}
    assert set(CALLS) == operations, operations - set(CALLS)
    print(f"schemathesis: {sum(CALLS.values())} calls over {len(CALLS)} operations; statuses {sorted(STATUSES.items())}")
    assert sum(CALLS.values()) >= 1000, CALLS
    assert all(code < 500 for code in STATUSES), STATUSES
    assert any(200 <= code < 300 for code in STATUSES) and any(400 <= code < 500 for code in STATUSES)
