"""CreateProduct, QueryProduct, QueryProductList, UpdateProduct, DeleteProduct."""

from __future__ import annotations

from typing import Any

from otaplane import errors
from otaplane.openapi.actions.common import PRODUCT_KEY, paging
from otaplane.openapi.params import Bool, Enum, Int, Param, Str
from otaplane.openapi.registry import action
from otaplane.services.products import NET_TYPE_CODES, NewProduct, Product

PRODUCT_NAME = Param(
    "ProductName",
    Str(min_len=4, max_len=30, pattern=r"[A-Za-z0-9_]+"),
    required=True,
    invalid_error=errors.InvalidFormattedProductName,
)
DESCRIPTION = Param("Description", Str(max_len=100))
COMMODITY_CODE = Enum(("iothub_senior", "iothub"))


def _created(p: Product) -> dict[str, Any]:
    return {
        "ProductKey": p.product_key,
        "ProductName": p.product_name,
        "ProductSecret": p.product_secret,
        "NodeType": p.node_type,
        "AliyunCommodityCode": p.aliyun_commodity_code,
        "DataFormat": p.data_format,
        "Description": p.description,
        "AuthType": p.auth_type,
        "Id2": p.id2,
        "ProtocolType": p.protocol_type,
    }


def _detail(p: Product) -> dict[str, Any]:
    return {
        **_created(p),
        "DeviceCount": p.device_count,
        "GmtCreate": p.created_ms,
        "CategoryKey": p.category_key,
        "NetType": NET_TYPE_CODES.get(p.net_type) if p.net_type else None,
        "ProductStatus": p.status,
        "ValidateType": p.validate_type,
        "Owner": True,
    }


def _summary(p: Product) -> dict[str, Any]:
    return {
        "ProductKey": p.product_key,
        "ProductName": p.product_name,
        "NodeType": p.node_type,
        "DataFormat": p.data_format,
        "Description": p.description,
        "DeviceCount": p.device_count,
        "GmtCreate": p.created_ms,
        "AuthType": p.auth_type,
    }


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@action(
    "CreateProduct",
    PRODUCT_NAME,
    Param("NodeType", Int(choices=(0, 1)), required=True),
    Param("AliyunCommodityCode", COMMODITY_CODE, default="iothub"),
    Param("DataFormat", Int(choices=(0, 1))),
    DESCRIPTION,
    Param("AuthType", Enum(("secret", "id2", "x509")), default="secret"),
    Param("NetType", Enum(tuple(NET_TYPE_CODES))),
    Param("ProtocolType", Enum(("modbus", "opc-ua", "customize", "ble", "zigbee"))),
    Param("CategoryKey", Str(max_len=64)),
    Param("Id2", Bool(), default=False),
    Param("ValidateType", Int(choices=(1, 2))),
    Param("PublishAuto", Bool()),
)
def create_product(services, tenant, p):
    product = services.products.create(
        tenant,
        NewProduct(
            product_name=p["ProductName"],
            node_type=p["NodeType"],
            aliyun_commodity_code=p["AliyunCommodityCode"],
            data_format=p["DataFormat"],
            description=p["Description"],
            auth_type=p["AuthType"],
            net_type=p["NetType"],
            protocol_type=p["ProtocolType"],
            category_key=p["CategoryKey"],
            id2=p["Id2"],
            validate_type=p["ValidateType"],
            publish_auto=p["PublishAuto"],
        ),
    )
    return {"ProductKey": product.product_key, "Data": _drop_none(_created(product))}


@action("QueryProduct", PRODUCT_KEY, quick_read=True)
def query_product(services, tenant, p):
    return {"Data": _drop_none(_detail(services.products.get(tenant, p["ProductKey"])))}


@action("QueryProductList", *paging(200), Param("AliyunCommodityCode", COMMODITY_CODE),
        Param("ResourceGroupId", Str(max_len=64)))
def query_product_list(services, tenant, p):
    page = services.products.page(tenant, p["CurrentPage"], p["PageSize"], p["AliyunCommodityCode"])
    return {
        "Data": {
            "CurrentPage": page.current_page,
            "PageSize": page.page_size,
            "PageCount": page.page_count,
            "Total": page.total,
            "List": {"ProductInfo": [_drop_none(_summary(item)) for item in page.items]},
        }
    }


@action("UpdateProduct", PRODUCT_KEY, PRODUCT_NAME, DESCRIPTION)
def update_product(services, tenant, p):
    services.products.update(tenant, p["ProductKey"], p["ProductName"], p["Description"])
    return {}


@action("DeleteProduct", PRODUCT_KEY)
def delete_product(services, tenant, p):
    services.products.delete(tenant, p["ProductKey"])
    return {}


ACTIONS = (create_product, query_product, query_product_list, update_product, delete_product)
