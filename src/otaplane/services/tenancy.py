"""Who is asking: the account behind an AccessKey and the IoT instance it addresses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tenant:
    account_id: int
    instance_pk: int  # instances.id: every tenant-owned query filters on it
    instance_id: str  # the IotInstanceId as clients know it
