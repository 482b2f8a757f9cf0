"""DeleteOTAFirmware racing a job created for the same package (two replicas, or two worker
threads of one server): exactly one wins, and the loser says why. Unlocked, the deletion checked
for jobs, then its DELETE waited for the job's commit and took the new job away by cascade: both
answered Success, and the JobId the client was given was JobNotFound at once. The other order
answered the job with DeviceHasUnfinishedTask (the foreign key's refusal read as the unique
index's). Real services, on each database backend, the two requests in two threads; the
interleaving is forced by holding one request inside its transaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from otaplane import errors
from otaplane.services import firmware as firmware_module
from otaplane.services import jobs as jobs_module
from otaplane.services.container import Services
from otaplane.services.firmware import NewFirmware
from otaplane.services.jobs import VERIFY, JobSpec
from otaplane.services.products import NewProduct
from tests.conftest import BACKENDS
from tests.support.services import fresh_services

BLOCKED_S = 0.5  # long enough for the other thread to reach its wait


@pytest.fixture(params=BACKENDS)
def services(request, tmp_path, postgres) -> Iterator[Services]:
    with fresh_services(request.param, tmp_path, postgres) as built:
        yield built


def package_and_device(services: Services):
    tenant = services.accounts.tenant_by_name("default")
    product_key = services.products.create(tenant, NewProduct(product_name="delrace", node_type=0)).product_key
    services.devices.register(tenant, product_key, "bench-1", None)
    form, _ = services.firmware.new_upload(tenant, "bin")
    path = services.blobs.root / form.key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"firmware" * 64)
    package = services.firmware.create(tenant, NewFirmware(product_key, "racy", "2.0", firmware_url=form.object_url))
    spec = JobSpec(firmware_id=package.firmware_id, product_key=product_key, job_type=VERIFY,
                   device_names=["bench-1"], timeout_minutes=5)
    return tenant, package.firmware_id, spec


def run(target, results: dict, name: str) -> threading.Thread:
    def body():
        try:
            results[name] = target()
        except Exception as exc:  # the outcome under test
            results[name] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_a_job_inserted_before_the_deletion_checks_keeps_its_package(services, monkeypatch):
    tenant, firmware_id, spec = package_and_device(services)
    inserted, go = threading.Event(), threading.Event()
    real_insert = jobs_module.store.insert_job

    def insert_then_hold(conn, values):  # the job's row written, its transaction not committed yet
        job_pk = real_insert(conn, values)
        inserted.set()
        assert go.wait(30)
        return job_pk

    monkeypatch.setattr(jobs_module.store, "insert_job", insert_then_hold)
    results: dict = {}
    job_thread = run(lambda: services.jobs.create(tenant, spec), results, "job")
    assert inserted.wait(30)
    delete_thread = run(lambda: services.firmware.delete(tenant, firmware_id), results, "delete")
    time.sleep(BLOCKED_S)
    go.set()
    job_thread.join(60)
    delete_thread.join(60)

    assert not isinstance(results["job"], Exception), results["job"]
    job_id, _ = results["job"]
    assert isinstance(results["delete"], errors.ApiError), results["delete"]
    assert results["delete"].code == "iot.ota.FirmwareHasRunningJob"
    assert services.jobs.get(tenant, job_id) is not None  # was JobNotFound: deleted with the package
    assert services.firmware.get(tenant, firmware_id).firmware_id == firmware_id


def test_a_job_for_a_package_whose_deletion_has_checked_finds_it_gone(services, monkeypatch):
    tenant, firmware_id, spec = package_and_device(services)
    checked, go = threading.Event(), threading.Event()
    real_check = firmware_module.job_store.firmware_has_unfinished_tasks

    def check_then_hold(conn, firmware_pk):  # the deletion found no job, and has not deleted yet
        found = real_check(conn, firmware_pk)
        checked.set()
        assert go.wait(30)
        return found

    monkeypatch.setattr(firmware_module.job_store, "firmware_has_unfinished_tasks", check_then_hold)
    results: dict = {}
    delete_thread = run(lambda: services.firmware.delete(tenant, firmware_id), results, "delete")
    assert checked.wait(30)
    job_thread = run(lambda: services.jobs.create(tenant, spec), results, "job")
    time.sleep(BLOCKED_S)
    go.set()
    delete_thread.join(60)
    job_thread.join(60)

    assert results["delete"] is None, results["delete"]
    assert isinstance(results["job"], errors.ApiError), results["job"]  # was Success, the job gone
    assert results["job"].code == "iot.ota.FirmwareNotFound"
