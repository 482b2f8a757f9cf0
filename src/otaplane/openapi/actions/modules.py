"""CreateOTAModule, UpdateOTAModule, DeleteOTAModule, ListOTAModuleByProduct."""

from __future__ import annotations

from otaplane.openapi.actions.common import PRODUCT_KEY
from otaplane.openapi.params import Param, Str
from otaplane.openapi.registry import action
from otaplane.timefmt import gmt_rfc

MODULE_NAME = Param(
    "ModuleName",
    Str(min_len=1, max_len=64, pattern=r"[A-Za-z0-9._-]+",
        pattern_hint="may contain only letters, digits, '.', '_' and '-'"),
    required=True,
)
ALIAS_NAME = Param("AliasName", Str(min_len=1, max_len=64))
DESC = Param("Desc", Str(max_len=100))


@action("CreateOTAModule", PRODUCT_KEY, MODULE_NAME, ALIAS_NAME, DESC)
def create_module(services, tenant, p):
    services.modules.create(tenant, p["ProductKey"], p["ModuleName"], p["AliasName"], p["Desc"])
    return {}


@action("UpdateOTAModule", PRODUCT_KEY, MODULE_NAME, ALIAS_NAME, DESC)
def update_module(services, tenant, p):
    services.modules.update(tenant, p["ProductKey"], p["ModuleName"], p["AliasName"], p["Desc"])
    return {}


@action("DeleteOTAModule", PRODUCT_KEY, MODULE_NAME)
def delete_module(services, tenant, p):
    services.modules.delete(tenant, p["ProductKey"], p["ModuleName"])
    return {}


# The SDKs send this one as GET; POST is accepted too, as for every RPC action.
@action("ListOTAModuleByProduct", PRODUCT_KEY)
def list_modules(services, tenant, p):
    modules = services.modules.list(tenant, p["ProductKey"])
    # `Data` is a JSON array here: the Tea model iterates it.
    return {
        "Data": [
            {k: v for k, v in {
                "ProductKey": m.product_key,
                "ModuleName": m.module_name,
                "AliasName": m.alias_name,
                "Desc": m.description,
                "GmtCreate": gmt_rfc(m.created_ms),
                "GmtModified": gmt_rfc(m.modified_ms),
            }.items() if v is not None}
            for m in modules
        ]
    }


ACTIONS = (create_module, update_module, delete_module, list_modules)
