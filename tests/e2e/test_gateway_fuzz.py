"""Every action, fed generated parameters over signed HTTP: never a 5xx, never a traceback.

The strategies are built from the action table itself (otaplane.openapi.registry), so a new
action or parameter is fuzzed without touching this file. Most requests are ones a client could
send (the required parameters there, optional ones at random, values their declared types accept
or real identifiers of this account: a product, a package, a device, a job) with at most one
parameter left out, just past a limit, of the wrong kind or hostile (control characters, other
scripts, thousands of characters); the rest are every parameter at random. Requests are signed
with the official util (RawSigner), V1 or V3, and sent as GET queries or POST form bodies or
queries, so they get past the signature check and reach the parsers and the services: the
fixtures build what each action needs to succeed at all (a task waiting for confirmation, a
cancelled task, a batch registration's ApplyId, a dynamic job, packages with and without jobs,
a module without packages, an empty product). With -s each action prints how many of its
requests succeeded: 35 of the 40 succeed at least once at the default count.

What must hold for every request: an HTTP status under 500, a JSON envelope with a RequestId,
a Code from the catalogue on every refusal; and at the end, no ERROR line or traceback in the
server's log. Hypothesis runs derandomized (the same examples on every run, so CI is repeatable);
OTAPLANE_FUZZ_EXAMPLES=500 runs more (per action), OTAPLANE_FUZZ_SEED=N other ones.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from otaplane import errors
from otaplane.openapi.params import Bool, Enum, Int, ListOf, Param, Str, StructList
from otaplane.openapi.registry import build_table
from tests.conftest import BACKENDS
from tests.support.clients import RawSigner
from tests.support.fuzzing import EXAMPLES, assert_clean_log, fuzzing
from tests.support.uploads import post_upload

ACTIONS = build_table()
# BatchRegisterDevice makes up to Count devices: keep the fleet a fuzz run builds small.
MAX_BATCH = 50

CATALOGUE = {value.code for value in vars(errors).values() if isinstance(value, errors.ErrorSpec)}

HOSTILE = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda s: s * 600),  # up to ~5,000 chars
    st.sampled_from(["", " ", "\x00", "null", "-1", "0", "9" * 25, "1e9", "../../etc/passwd", "%00",
                     "' OR 1=1 --", "\u202e\u0661\uff17", "a\r\nX-Injected: 1", "[]", "{}"]),
)


class Fixtures:
    """Real identifiers of the fuzzing account, for the generated requests to reach deep: the
    state each action needs to succeed at all (a package needing verification, one without
    jobs, a dynamic job, a task waiting for confirmation, a cancelled task, a batch
    registration's ApplyId, a custom module, a product with nothing in it)."""

    def __init__(self, signer: RawSigner):
        self.signer = signer
        self.product_key = self._product()
        self.empty_product_key = self._product()  # no device, no package: DeleteProduct may succeed
        self.call("CreateOTAModule", {"ProductKey": self.product_key, "ModuleName": "fuzzmod"})  # deletable
        blob = os.urandom(2048)
        upload = self.call("GenerateOTAUploadURL", {})["Data"]
        assert post_upload(upload, blob).status_code in (200, 204)
        self.firmware_url = upload["FirmwareUrl"]
        self.blob_size, self.blob_md5 = str(len(blob)), hashlib.md5(blob).hexdigest()
        self.firmware_id = self._package("fuzz-base", "1.0.1", need_to_verify=False)
        self.unverified_id = self._package("fuzz-unverified", "1.0.2")  # for CreateOTAVerifyJob
        self.spare_id = self._package("fuzz-spare", "1.0.3", need_to_verify=False)  # no job: deletable
        dynamic_package = self._package("fuzz-dynamic", "1.0.4", need_to_verify=False)
        devices = [self.call("RegisterDevice", {"ProductKey": self.product_key, "DeviceName": f"fuzz-device-{n}"})
                   ["Data"] for n in range(3)]
        self.device_names = [device["DeviceName"] for device in devices]
        self.device_name, self.iot_id = self.device_names[0], devices[0]["IotId"]
        self.job_id = self._static_job(self.firmware_id, self.device_names[0])
        confirm_job = self._static_job(self.firmware_id, self.device_names[1], NeedConfirm="true")
        cancelled_job = self._static_job(self.spare_id, self.device_names[2])  # ends once cancelled:
        # then nothing holds the spare package, and DeleteOTAFirmware may succeed
        self.call("CancelOTATaskByJob", {"JobId": cancelled_job, "CancelQueuedTask": "true",
                                         "CancelNotifiedTask": "true"})
        dynamic_job = self.call("CreateOTADynamicUpgradeJob", {
            "FirmwareId": dynamic_package, "ProductKey": self.product_key, "SrcVersion.1": "1.0.0",
        })["Data"]["JobId"]
        self.job_ids = [self.job_id, confirm_job, cancelled_job, dynamic_job]
        self.task_ids = [self._task_of(confirm_job), self._task_of(cancelled_job)]
        self.apply_id = str(self.call("BatchRegisterDevice", {"ProductKey": self.product_key,
                                                              "Count": "2"})["Data"]["ApplyId"])

    def _product(self) -> str:
        return self.call("CreateProduct", {"ProductName": f"fuzz_{uuid.uuid4().hex[:8]}",
                                           "NodeType": "0"})["Data"]["ProductKey"]

    def _package(self, name: str, version: str, need_to_verify: bool = True) -> str:
        return self.call("CreateOTAFirmware", {
            "ProductKey": self.product_key, "FirmwareName": name, "DestVersion": version,
            "FirmwareUrl": self.firmware_url, "NeedToVerify": str(need_to_verify).lower(),
        })["Data"]["FirmwareId"]

    def _static_job(self, firmware_id: str, device_name: str, **extra: str) -> str:
        return self.call("CreateOTAStaticUpgradeJob", {
            "FirmwareId": firmware_id, "ProductKey": self.product_key,
            "TargetSelection": "SPECIFIC", "TargetDeviceName.1": device_name, **extra,
        })["Data"]["JobId"]

    def _task_of(self, job_id: str) -> str:
        tasks = self.call("ListOTATaskByJob", {"JobId": job_id})["Data"]["SimpleOTATaskInfo"]
        return tasks[0]["TaskId"]

    def call(self, action: str, params: dict[str, str]) -> dict:
        response = self.signer.v1(action, params)
        body = response.json()
        assert response.status_code == 200 and body.get("Success"), body
        return body

    def known(self, name: str) -> list[str]:
        """Real values for parameters of this name (or of these names' family)."""
        return {
            # The empty product a third of the time: most actions need the one with things in it.
            "ProductKey": [self.product_key, self.product_key, self.empty_product_key],
            "FirmwareId": [self.firmware_id, self.unverified_id, self.spare_id],
            "FirmwareUrl": [self.firmware_url],
            "Url": [self.firmware_url],
            "FirmwareSize": [self.blob_size],
            "FirmwareSign": [self.blob_md5],
            "JobId": self.job_ids,
            "TaskId": self.task_ids,
            "ApplyId": [self.apply_id],
            "DeviceName": self.device_names,
            "TargetDeviceName": self.device_names,
            "IotId": [self.iot_id],
            "ModuleName": ["default", "fuzzmod"],
            "SrcVersion": ["1.0.0"],
            "DestVersion": ["1.0.9"],
        }.get(name, [])


def _valid_text(spec: Str) -> st.SearchStrategy[str]:
    high = min(spec.max_len or 64, 64)
    if spec.pattern is None:
        return st.text(min_size=spec.min_len, max_size=high)
    return st.from_regex(spec.pattern, fullmatch=True).filter(lambda s: spec.min_len <= len(s) <= high)


def _valid_int(spec: Int, name: str) -> st.SearchStrategy[str]:
    if spec.choices:
        return st.sampled_from(spec.choices).map(str)
    low = spec.min if spec.min is not None else -(2**63)
    high = spec.max if spec.max is not None else 2**63 - 1
    if name == "Count":  # BatchRegisterDevice makes that many devices: keep the fleet small
        high = min(high, MAX_BATCH)
    return st.integers(low, high).map(str)


def valid_value(spec, name: str, fixtures: Fixtures) -> st.SearchStrategy[str]:
    """A value the parameter's declared type accepts (a real identifier where there is one)."""
    if isinstance(spec, Str):
        made = _valid_text(spec)
    elif isinstance(spec, Int):
        made = _valid_int(spec, name)
    elif isinstance(spec, Bool):
        made = st.sampled_from(["true", "false", "True", "FALSE"])
    elif isinstance(spec, Enum):
        made = st.sampled_from(spec.choices)
    else:
        made = st.text(max_size=20)
    known = fixtures.known(name)
    # Mostly the real one (the request then reaches the service), sometimes a well-formed other.
    return st.one_of(st.sampled_from(known), st.sampled_from(known), made) if known else made


def bad_value(spec) -> st.SearchStrategy[str]:
    """A value just past a declared limit, of the wrong kind, or hostile text."""
    near = [HOSTILE]
    if isinstance(spec, Str) and spec.max_len is not None:
        near.append(st.just("a" * (spec.max_len + 1)))
    if isinstance(spec, Int):
        edges = [v for v in (spec.min, spec.max) if v is not None]
        near.append(st.sampled_from([str(edges[0] - 1)] if edges else ["-1"]))
        near.append(st.sampled_from(["1.5", " 7 ", "+3", "0x10", "\u0661", "99999999999999999999"]))
    if isinstance(spec, (Bool, Enum)):
        near.append(st.sampled_from(["yes", "1", "ALL ", "maybe"]))
    return st.one_of(*near)


def _wire(param: Param, fixtures: Fixtures, value) -> st.SearchStrategy[dict[str, str]]:
    """The wire parameters of one declared parameter: name=value, or name.N[.Field]=value;
    `value(spec, name)` makes each value."""
    spec = param.type
    if isinstance(spec, ListOf):
        count = st.integers(1, min(spec.max_items or 3, 3))
        return count.flatmap(lambda n: st.lists(value(spec.item, param.name), min_size=n, max_size=n)).map(
            lambda items: {f"{param.name}.{i}": v for i, v in enumerate(items, 1)})
    if isinstance(spec, StructList):
        fields = sorted(spec.fields)

        def item(_):
            return st.fixed_dictionaries({f: value(spec.fields[f], f) for f in fields})

        return st.lists(st.just(None).flatmap(item), min_size=1, max_size=2).map(
            lambda items: {f"{param.name}.{i}.{f}": v for i, entry in enumerate(items, 1) for f, v in entry.items()})
    names = [param.name, *param.aliases]
    return st.tuples(st.sampled_from(names), value(spec, param.name)).map(lambda pair: {pair[0]: pair[1]})


def good_params(param: Param, fixtures: Fixtures) -> st.SearchStrategy[dict[str, str]]:
    return _wire(param, fixtures, lambda spec, name: valid_value(spec, name, fixtures))


def bad_params(param: Param, fixtures: Fixtures) -> st.SearchStrategy[dict[str, str]]:
    wire = _wire(param, fixtures, lambda spec, name: bad_value(spec))
    if isinstance(param.type, (ListOf, StructList)):  # odd indexes too: 0, gaps, huge
        odd = st.sampled_from([0, 21, 999999, 1000000]).map(lambda i: {f"{param.name}.{i}": "x"})
        wire = st.one_of(wire, odd)
    return wire


def request_for(action_name: str, fixtures: Fixtures) -> st.SearchStrategy[tuple[str, str, dict[str, str]]]:
    """Mostly requests a client could send (required parameters there, optional ones at random,
    all valid) with at most one parameter bad or left out; now and then every parameter at random."""
    action = ACTIONS[action_name]
    params = action.params
    extra = st.dictionaries(st.sampled_from(["Foo", "ProductKey.1", "IotInstanceId", "CurrentPage"]), HOSTILE,
                            max_size=1)

    def one_bad(bad_index: int | None):
        parts = []
        for index, param in enumerate(params):
            if index == bad_index:
                parts.append(st.one_of(st.just({}), bad_params(param, fixtures)))
            elif param.required:
                parts.append(good_params(param, fixtures))
            else:
                parts.append(st.one_of(st.just({}), good_params(param, fixtures)))
        return st.tuples(*parts)

    def chaos():
        return st.tuples(*[st.one_of(st.just({}), good_params(p, fixtures), bad_params(p, fixtures)) for p in params])

    bad_index = st.one_of(st.none(), st.integers(0, len(params) - 1)) if params else st.none()
    chunks = st.one_of(bad_index.flatmap(one_bad), bad_index.flatmap(one_bad), chaos())

    def merge(parts) -> dict[str, str]:
        merged: dict[str, str] = {}
        for part in parts:
            merged.update(part)
        return merged

    return st.tuples(st.just(action_name), st.sampled_from(sorted(action.methods)),
                     st.tuples(chunks, extra).map(lambda pair: merge([*pair[0], pair[1]])))


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_server(request, make_server):
    return make_server(request.param, "--rate-limit", "0")


@pytest.fixture(scope="module")
def fixtures(fuzz_server) -> Fixtures:
    return Fixtures(RawSigner(fuzz_server.base_url, *fuzz_server.create_key("fuzz")))


def send(signer: RawSigner, action: str, method: str, params: dict[str, str],
         v3: bool = False) -> httpx.Response | None:
    """A signed request. V1: a POST carries its parameters as a form body (as browsers and some
    SDKs send them), a GET in its query string; V3 (ACS3-HMAC-SHA256, as the Tea SDK signs): in
    the query string. None when the URL would be too long to send."""
    if v3:
        if len(urlencode(params)) > 50_000:
            return None
        return signer.v3(action, params, method=method)
    signed = signer.v1_params(action, params, method)
    if method == "POST":
        return httpx.post(f"{signer.base_url}/", content=urlencode(signed).encode(), timeout=30,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    url = f"{signer.base_url}/?{urlencode(signed)}"
    return httpx.get(url, timeout=30) if len(url) < 60_000 else None


def check_answer(response: httpx.Response, action: str, params: dict[str, str]) -> None:
    where = f"{action} {params!r:.600}"
    assert response.status_code < 500, f"{where}: HTTP {response.status_code} {response.text[:300]}"
    body = response.json()
    assert body.get("RequestId"), f"{where}: {body}"
    if response.status_code != 200:  # a gateway error
        assert body["Code"] in CATALOGUE or body["Code"].startswith("Missing"), f"{where}: {body}"
    elif not body.get("Success"):
        assert body["Code"] in CATALOGUE, f"{where}: {body}"


# The account's real product, package, device and job are shared by the actions: the ones that
# delete or cancel run last, so that the others still find them.
@pytest.mark.parametrize("action", sorted(ACTIONS, key=lambda name: (name.startswith(("Delete", "Cancel")), name)))
def test_no_generated_request_breaks_the_server(fuzz_server, fixtures, action):
    answered: dict[str, int] = {"success": 0, "refused": 0}

    @fuzzing(EXAMPLES)  # per action
    @given(request_for(action, fixtures), st.booleans())
    def one_request(generated, v3):
        _, method, params = generated
        response = send(fixtures.signer, action, method, params, v3)
        assume(response is not None)
        check_answer(response, action, params)
        answered["success" if response.json().get("Success") else "refused"] += 1

    one_request()
    print(f"{action}: {answered}")  # with -s: how many got past the parsers
    assert answered["refused"] > 0, answered  # the bad values were sent and refused
    assert_clean_log(fuzz_server)
