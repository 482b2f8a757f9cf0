"""Products: the rules around creating, reading, renaming and deleting them."""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from sqlalchemy.exc import IntegrityError

from otaplane import errors, ids
from otaplane.secretbox import SecretBox
from otaplane.services.row_memo import RowMemo
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store import devices as device_store
from otaplane.store import firmware as firmware_store
from otaplane.store import modules as module_store
from otaplane.store import products as store
from otaplane.timefmt import now_ms

# QueryProduct answers NetType as the platform's numeric code.
NET_TYPE_CODES = {"WIFI": 3, "CELLULAR": 6, "ETHERNET": 7, "OTHER": 8}


@dataclass(frozen=True, slots=True)  # slots: built on every QueryProduct, twice as fast
class Product:
    product_key: str
    product_name: str
    product_secret: str
    node_type: int
    data_format: int | None
    aliyun_commodity_code: str
    description: str | None
    auth_type: str
    net_type: str | None
    protocol_type: str | None
    category_key: str | None
    id2: bool
    validate_type: int | None
    publish_auto: bool | None
    status: str
    device_count: int
    created_ms: int
    modified_ms: int


@dataclass(frozen=True)
class Page:
    current_page: int
    page_size: int
    total: int
    items: list[Product]

    @property
    def page_count(self) -> int:
        return ceil(self.total / self.page_size) if self.page_size else 0


@dataclass(frozen=True)
class NewProduct:
    product_name: str
    node_type: int
    aliyun_commodity_code: str = "iothub"
    data_format: int | None = None
    description: str | None = None
    auth_type: str = "secret"
    net_type: str | None = None
    protocol_type: str | None = None
    category_key: str | None = None
    id2: bool = False
    validate_type: int | None = None
    publish_auto: bool | None = None


class ProductService:
    def __init__(self, db: Database, box: SecretBox):
        self.db = db
        self.box = box
        # A products row (+ device_count) -> its Product, secret decrypted: built once per
        # row value, as building costs several times more than looking it up.
        self._products = RowMemo(self._build_product)

    def _product(self, row) -> Product:
        return self._products.get(row)

    def _build_product(self, row) -> Product:
        return Product(
            product_key=row["product_key"],
            product_name=row["product_name"],
            product_secret=self.box.decrypt(row["product_secret_encrypted"]),
            node_type=row["node_type"],
            data_format=row["data_format"],
            aliyun_commodity_code=row["aliyun_commodity_code"],
            description=row["description"],
            auth_type=row["auth_type"],
            net_type=row["net_type"],
            protocol_type=row["protocol_type"],
            category_key=row["category_key"],
            id2=bool(row["id2"]),
            validate_type=row["validate_type"],
            publish_auto=row["publish_auto"],
            status=row["status"],
            device_count=row["device_count"],
            created_ms=row["created_ms"],
            modified_ms=row["modified_ms"],
        )

    def create(self, tenant: Tenant, new: NewProduct) -> Product:
        if new.aliyun_commodity_code == "iothub_senior" and new.data_format is None:
            raise errors.missing("DataFormat")
        now = now_ms()
        for _attempt in range(5):  # a ProductKey collision is astronomically rare; retry anyway
            product_key = ids.product_key()
            try:
                with self.db.begin() as conn:
                    if store.name_taken(conn, tenant.instance_pk, new.product_name):
                        raise errors.AlreadyExistedProductName()
                    product_id = store.insert(
                        conn,
                        {
                            "instance_pk": tenant.instance_pk,
                            "product_key": product_key,
                            "product_secret_encrypted": self.box.encrypt(ids.product_secret()),
                            "status": "DEVELOPMENT_STATUS",
                            "created_ms": now,
                            "modified_ms": now,
                            **new.__dict__,
                        },
                    )
                    module_store.insert(conn, product_id, module_store.DEFAULT_MODULE, None, None, True, now)
                    return self._product(store.get(conn, tenant.instance_pk, product_key))
            except IntegrityError:
                # Either a concurrent create took the name, or the key collided.
                with self.db.connect() as conn:
                    if store.name_taken(conn, tenant.instance_pk, new.product_name):
                        raise errors.AlreadyExistedProductName() from None
        raise errors.SystemException()

    def get(self, tenant: Tenant, product_key: str) -> Product:
        with self.db.connect() as conn:
            row = store.get(conn, tenant.instance_pk, product_key)
        if row is None:
            raise errors.NotExistedProduct()
        return self._product(row)

    def page(self, tenant: Tenant, current_page: int, page_size: int, commodity_code: str | None) -> Page:
        with self.db.connect() as conn:
            total, rows = store.page(
                conn, tenant.instance_pk, (current_page - 1) * page_size, page_size, commodity_code
            )
        return Page(current_page, page_size, total, [self._product(r) for r in rows])

    def update(self, tenant: Tenant, product_key: str, name: str, description: str | None) -> None:
        try:
            with self.db.begin() as conn:
                row = store.get(conn, tenant.instance_pk, product_key)
                if row is None:
                    raise errors.NotExistedProduct()
                if store.name_taken(conn, tenant.instance_pk, name, except_key=product_key):
                    raise errors.AlreadyExistedProductName()
                values = {"product_name": name, "modified_ms": now_ms()}
                if description is not None:
                    values["description"] = description
                store.update(conn, row["id"], values)
        except IntegrityError:
            raise errors.AlreadyExistedProductName() from None

    def delete(self, tenant: Tenant, product_key: str) -> None:
        try:
            with self.db.begin() as conn:
                row = store.get(conn, tenant.instance_pk, product_key)
                if row is None:
                    raise errors.NotExistedProduct()
                self._refuse_if_in_use(conn, row)
                module_store.delete_for_product(conn, row["id"])
                device_store.delete_applies_of_product(conn, row["id"])  # BatchRegisterDevice's records
                store.delete(conn, row["id"])
        except IntegrityError:  # a device or package came in meanwhile (its foreign key)
            with self.db.connect() as conn:
                row = store.get(conn, tenant.instance_pk, product_key)
                if row is not None:
                    self._refuse_if_in_use(conn, row)
            raise

    @staticmethod
    def _refuse_if_in_use(conn, row) -> None:
        if row["device_count"] > 0:
            raise errors.ProductHasDevices()
        if firmware_store.count_for_product(conn, row["id"]) > 0:
            raise errors.ProductHasFirmware()
