"""otaplane.openapi.params: typed parsing of the raw RPC parameter map."""

from __future__ import annotations

import pytest

from otaplane import errors
from otaplane.errors import ApiError
from otaplane.openapi.params import Bool, Enum, Int, ListOf, Param, Str, StructList, parse_params


def parse_raw(specs: tuple[Param, ...] | Param, raw: dict[str, str]) -> dict:
    return parse_params(specs if isinstance(specs, tuple) else (specs,), raw)


def error_of(specs: tuple[Param, ...] | Param, raw: dict[str, str]) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_raw(specs, raw)
    return info.value


def assert_invalid(error: ApiError, name: str) -> None:
    assert error.code == "InvalidParameter"
    assert error.spec.http_status == 400
    assert error.spec.gateway
    assert error.message.startswith(f"The specified parameter {name} is not valid: ")


def assert_missing(error: ApiError, name: str) -> None:
    assert error.code == f"Missing{name}"
    assert error.message == f"{name} is mandatory for this action."
    assert error.spec.http_status == 400
    assert error.spec.gateway


# --- Bool ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "tRuE", " true ", "true\n"])
def test_bool_true_any_case(raw):
    assert parse_raw(Param("B", Bool()), {"B": raw}) == {"B": True}


@pytest.mark.parametrize("raw", ["false", "False", "FALSE", "fAlSe", " False"])
def test_bool_false_any_case(raw):
    assert parse_raw(Param("B", Bool()), {"B": raw}) == {"B": False}


@pytest.mark.parametrize("raw", ["1", "0", "yes", "no", "t", "f", "truee", "tru", "null", "None", "ｔｒｕｅ", "\x00"])
def test_bool_garbage_is_invalid(raw):
    assert_invalid(error_of(Param("B", Bool()), {"B": raw}), "B")


def test_bool_empty_means_absent():
    assert parse_raw(Param("B", Bool(), default=True), {"B": ""}) == {"B": True}
    assert parse_raw(Param("B", Bool()), {}) == {"B": None}


def test_bool_required():
    assert_missing(error_of(Param("NeedPush", Bool(), required=True), {}), "NeedPush")
    assert_missing(error_of(Param("NeedPush", Bool(), required=True), {"NeedPush": ""}), "NeedPush")


# --- Int ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, value",
    [("0", 0), ("7", 7), ("+7", 7), ("-7", -7), ("007", 7), (" 7", 7), ("7 ", 7),
     ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -(2**63))],
)
def test_int_valid(raw, value):
    assert parse_raw(Param("N", Int()), {"N": raw}) == {"N": value}


@pytest.mark.parametrize(
    "raw",
    [
        "abc", "1e3", "1.0", "1.5", "0x10", "1_000", "1,000", "--1", "+-1", "- 1", "1 2", "7a", "a7",
        "99999999999999999999",  # 20 digits
        "9223372036854775808",  # int64 max + 1
        "-9223372036854775809",
        "9999999999999999999",
        "٣",  # Arabic-Indic digit three: int() would take it
        "１２",  # full-width digits
        "\x007", "7\x00", "NaN", "inf", "∞", "+", "-",
    ],
)
def test_int_garbage_is_invalid(raw):
    error = error_of(Param("N", Int()), {"N": raw})
    assert_invalid(error, "N")


def test_int_empty_means_absent():
    assert parse_raw(Param("N", Int(), default=5), {"N": ""}) == {"N": 5}
    assert_missing(error_of(Param("N", Int(), required=True), {"N": ""}), "N")


def test_int_whitespace_only_is_invalid():
    assert_invalid(error_of(Param("N", Int()), {"N": " "}), "N")


def test_int_range():
    spec = Param("PageSize", Int(min=1, max=200))
    assert parse_raw(spec, {"PageSize": "1"}) == {"PageSize": 1}
    assert parse_raw(spec, {"PageSize": "200"}) == {"PageSize": 200}
    for raw, reason in (("0", "must be >= 1"), ("-1", "must be >= 1"), ("201", "must be <= 200")):
        error = error_of(spec, {"PageSize": raw})
        assert_invalid(error, "PageSize")
        assert error.message.endswith(reason)


def test_int_choices():
    spec = Param("NodeType", Int(choices=(0, 1)), required=True)
    assert parse_raw(spec, {"NodeType": "0"}) == {"NodeType": 0}
    assert parse_raw(spec, {"NodeType": "1"}) == {"NodeType": 1}
    error = error_of(spec, {"NodeType": "7"})
    assert_invalid(error, "NodeType")
    assert error.message == "The specified parameter NodeType is not valid: must be one of 0, 1"


def test_int_retry_interval_choices():
    spec = Param("RetryInterval", Int(choices=(0, 10, 30, 60, 1440)))
    assert parse_raw(spec, {"RetryInterval": "1440"}) == {"RetryInterval": 1440}
    assert_invalid(error_of(spec, {"RetryInterval": "15"}), "RetryInterval")


# --- Str ----------------------------------------------------------------------------------------
def test_str_length():
    spec = Param("Name", Str(min_len=4, max_len=30))
    assert parse_raw(spec, {"Name": "abcd"}) == {"Name": "abcd"}
    assert parse_raw(spec, {"Name": "a" * 30}) == {"Name": "a" * 30}
    short = error_of(spec, {"Name": "abc"})
    assert_invalid(short, "Name")
    assert short.message.endswith("must be at least 4 characters")
    long = error_of(spec, {"Name": "a" * 31})
    assert_invalid(long, "Name")
    assert long.message.endswith("must be at most 30 characters")


def test_str_length_counts_characters_not_bytes():
    spec = Param("Desc", Str(max_len=4))
    assert parse_raw(spec, {"Desc": "中文字符"}) == {"Desc": "中文字符"}
    assert_invalid(error_of(spec, {"Desc": "中文字符!"}), "Desc")


def test_str_pattern_is_a_full_match():
    spec = Param("ProductName", Str(pattern=r"[A-Za-z0-9_]+"))
    assert parse_raw(spec, {"ProductName": "Abc_123"}) == {"ProductName": "Abc_123"}
    for raw in ("abc-1", "abc 1", "abc\n", "ábc", "abc;drop", "中文"):
        error = error_of(spec, {"ProductName": raw})
        assert_invalid(error, "ProductName")
        assert error.message.endswith(r"must match [A-Za-z0-9_]+")


def test_str_pattern_hint():
    spec = Param("V", Str(pattern=r"[0-9.]+", pattern_hint="digits and dots only"))
    assert error_of(spec, {"V": "x"}).message.endswith("digits and dots only")


def test_str_keeps_the_raw_value():
    assert parse_raw(Param("S", Str()), {"S": "  padded  "}) == {"S": "  padded  "}


def test_str_empty_optional_means_absent():
    # The Python SDKs send a field set to "" as `S=`: it is a field not given, whatever its checks.
    assert parse_raw(Param("S", Str()), {"S": ""}) == {"S": None}
    assert parse_raw(Param("S", Str(min_len=1)), {"S": ""}) == {"S": None}
    assert parse_raw(Param("S", Str(min_len=1, pattern="[a-z]+"), default="d"), {"S": ""}) == {"S": "d"}
    assert_missing(error_of(Param("S", Str(min_len=1), required=True), {"S": ""}), "S")


def test_str_absent_optional_gets_the_default():
    assert parse_raw(Param("S", Str(), default="d"), {}) == {"S": "d"}
    assert parse_raw(Param("S", Str()), {}) == {"S": None}


# --- Enum ---------------------------------------------------------------------------------------
def test_enum_is_case_insensitive_and_returns_the_canonical_spelling():
    spec = Param("TargetSelection", Enum(("ALL", "SPECIFIC", "GRAY", "GROUP")))
    for raw in ("ALL", "all", "All", "aLl"):
        assert parse_raw(spec, {"TargetSelection": raw}) == {"TargetSelection": "ALL"}
    assert parse_raw(spec, {"TargetSelection": "specific"}) == {"TargetSelection": "SPECIFIC"}


def test_enum_lower_case_choices():
    spec = Param("AliyunCommodityCode", Enum(("iothub_senior", "iothub")))
    assert parse_raw(spec, {"AliyunCommodityCode": "IOTHUB_SENIOR"}) == {"AliyunCommodityCode": "iothub_senior"}


@pytest.mark.parametrize("raw", ["NONE", "AL", "ALLL", " ALL", "ALL ", "A LL", "\x00", "ＡＬＬ"])
def test_enum_garbage_is_invalid(raw):
    spec = Param("TargetSelection", Enum(("ALL", "SPECIFIC")))
    error = error_of(spec, {"TargetSelection": raw})
    assert_invalid(error, "TargetSelection")
    assert error.message.endswith("must be one of ALL, SPECIFIC")


def test_enum_case_sensitive_when_asked():
    spec = Param("P", Enum(("HTTPS", "MQTT"), case_insensitive=False))
    assert parse_raw(spec, {"P": "MQTT"}) == {"P": "MQTT"}
    assert_invalid(error_of(spec, {"P": "mqtt"}), "P")


def test_enum_empty_means_absent():
    spec = Param("P", Enum(("HTTPS", "MQTT")), default="HTTPS")
    assert parse_raw(spec, {"P": ""}) == {"P": "HTTPS"}


# --- required, aliases, invalid_error -----------------------------------------------------------
@pytest.mark.parametrize("name", ["ProductKey", "FirmwareId", "JobId"])
def test_required_missing(name):
    error = error_of(Param(name, Str(), required=True), {})
    assert_missing(error, name)


def test_required_empty_string_is_missing():
    assert_missing(error_of(Param("ProductKey", Str(), required=True), {"ProductKey": ""}), "ProductKey")


def test_required_is_checked_in_declaration_order():
    specs = (Param("A", Str(), required=True), Param("B", Str(), required=True))
    assert error_of(specs, {}).code == "MissingA"
    assert error_of(specs, {"A": "x"}).code == "MissingB"


def test_missing_uses_the_catalogue_message():
    assert errors.missing("FirmwareId").message == "FirmwareId is mandatory for this action."
    assert errors.missing("FirmwareId").code == "MissingFirmwareId"


def test_unknown_parameters_are_ignored():
    assert parse_raw(Param("A", Str()), {"A": "1", "Other": "x", "A.1": "y"}) == {"A": "1"}


def test_alias():
    spec = Param("Udi", Str(), aliases=("FirmwareUdi",))
    assert parse_raw(spec, {"FirmwareUdi": "u"}) == {"Udi": "u"}
    assert parse_raw(spec, {"Udi": "main", "FirmwareUdi": "alias"}) == {"Udi": "main"}
    assert parse_raw(spec, {}) == {"Udi": None}


def test_empty_name_falls_back_to_the_alias():
    spec = Param("FirmwareId", Str(min_len=1), required=True, aliases=("FirmwareID",))
    assert parse_raw(spec, {"FirmwareId": "", "FirmwareID": "fw1"}) == {"FirmwareId": "fw1"}
    assert_missing(error_of(spec, {"FirmwareId": "", "FirmwareID": ""}), "FirmwareId")


def test_alias_satisfies_required_and_is_validated():
    spec = Param("Udi", Str(max_len=3), required=True, aliases=("A1", "A2"))
    assert parse_raw(spec, {"A2": "abc"}) == {"Udi": "abc"}
    assert parse_raw(spec, {"A1": "x", "A2": "y"}) == {"Udi": "x"}
    assert_missing(error_of(spec, {}), "Udi")
    error = error_of(spec, {"A1": "abcd"})
    assert_invalid(error, "Udi")  # errors name the declared parameter


def test_invalid_error_override_to_a_business_code():
    spec = Param("CurrentPage", Int(min=1), required=True, invalid_error=errors.InvalidPageParams)
    error = error_of(spec, {"CurrentPage": "abc"})
    assert error.code == "iot.common.InvalidPageParams"
    assert error.spec.http_status == 200
    assert not error.spec.gateway
    assert error.message == "The page parameters are invalid: must be an integer"
    assert error_of(spec, {"CurrentPage": "0"}).message == "The page parameters are invalid: must be >= 1"


def test_invalid_error_override_without_placeholders():
    spec = Param("ProductName", Str(min_len=4, pattern=r"[A-Za-z0-9_]+"),
                 invalid_error=errors.InvalidFormattedProductName)
    error = error_of(spec, {"ProductName": "ab"})
    assert error.code == "iot.prod.InvalidFormattedProductName"
    assert error.message == errors.InvalidFormattedProductName.message


def test_invalid_error_does_not_change_missing():
    spec = Param("CurrentPage", Int(), required=True, invalid_error=errors.InvalidPageParams)
    assert_missing(error_of(spec, {}), "CurrentPage")


def test_default_for_absent_optional():
    specs = (Param("N", Int(), default=10), Param("B", Bool(), default=True), Param("S", Str()))
    assert parse_raw(specs, {}) == {"N": 10, "B": True, "S": None}


# --- ListOf -------------------------------------------------------------------------------------
def test_list_ordered_by_index_numerically():
    raw = {f"Name.{i}": f"v{i}" for i in (10, 2, 1, 11, 3, 9)}
    assert parse_raw(Param("Name", ListOf(Str())), raw) == {"Name": ["v1", "v2", "v3", "v9", "v10", "v11"]}


def test_list_gaps_are_closed():
    raw = {"Name.1": "a", "Name.3": "c", "Name.7": "g"}
    assert parse_raw(Param("Name", ListOf(Str())), raw) == {"Name": ["a", "c", "g"]}


def test_list_leading_zeros_are_the_same_index_number():
    raw = {"Name.2": "b", "Name.01": "a"}
    assert parse_raw(Param("Name", ListOf(Str())), raw) == {"Name": ["a", "b"]}


def test_list_items_are_parsed():
    spec = Param("N", ListOf(Int(min=1)))
    assert parse_raw(spec, {"N.1": "5", "N.2": "7"}) == {"N": [5, 7]}
    error = error_of(spec, {"N.1": "5", "N.2": "x"})
    assert_invalid(error, "N")
    assert "N.2 must be an integer" in error.message


def test_list_absent_is_none_or_missing():
    assert parse_raw(Param("N", ListOf(Str())), {}) == {"N": None}
    assert parse_raw(Param("N", ListOf(Str()), default=[]), {}) == {"N": []}
    assert_missing(error_of(Param("TargetDeviceName", ListOf(Str()), required=True), {}), "TargetDeviceName")


def test_list_bare_name_is_not_an_item():
    spec = Param("TargetDeviceName", ListOf(Str()), required=True)
    assert_missing(error_of(spec, {"TargetDeviceName": "d1"}), "TargetDeviceName")


def test_list_max_items():
    spec = Param("TaskId", ListOf(Str(), max_items=3))
    assert parse_raw(spec, {f"TaskId.{i}": str(i) for i in range(1, 4)}) == {"TaskId": ["1", "2", "3"]}
    error = error_of(spec, {f"TaskId.{i}": str(i) for i in range(1, 5)})
    assert_invalid(error, "TaskId")
    assert error.message.endswith("at most 3 items are allowed")


def test_list_unique():
    spec = Param("DeviceName", ListOf(Str(), unique=True))
    assert parse_raw(spec, {"DeviceName.1": "a", "DeviceName.2": "b"}) == {"DeviceName": ["a", "b"]}
    error = error_of(spec, {"DeviceName.1": "a", "DeviceName.2": "b", "DeviceName.3": "a"})
    assert_invalid(error, "DeviceName")
    assert error.message.endswith("items must be unique")


def test_list_unique_compares_parsed_values():
    spec = Param("V", ListOf(Enum(("ALL", "GRAY")), unique=True))
    assert_invalid(error_of(spec, {"V.1": "all", "V.2": "ALL"}), "V")


def test_list_non_unique_allowed_by_default():
    assert parse_raw(Param("V", ListOf(Str())), {"V.1": "a", "V.2": "a"}) == {"V": ["a", "a"]}


def test_list_item_with_only_a_subfield_has_no_value():
    error = error_of(Param("Name", ListOf(Str())), {"Name.1": "a", "Name.2.Key": "b"})
    assert_invalid(error, "Name")
    assert "Name.2 has no value" in error.message


@pytest.mark.parametrize(
    "key",
    ["Name.-1", "Name.999999999", "Name.1a", "Name.a", "Name.", "Name..1", "Name.1.", "Name.+1",
     "Name. 1", "Name.٣", "Name.１", "Namex.1", "name.1", "Name.1.2.3"],
)
def test_list_ignores_keys_that_are_not_items(key):
    assert parse_raw(Param("Name", ListOf(Str())), {key: "x", "Name.1": "a"}) == {"Name": ["a"]}


def test_list_index_zero_does_not_crash():
    # The SDKs count from 1; whatever a stray `.0` does, it is not a server error.
    result = parse_raw(Param("Name", ListOf(Str())), {"Name.0": "z", "Name.1": "a"})
    assert result["Name"][-1] == "a"


def test_list_max_items_counts_after_gaps():
    spec = Param("Name", ListOf(Str(), max_items=2))
    assert parse_raw(spec, {"Name.1": "a", "Name.100": "b"}) == {"Name": ["a", "b"]}


def test_list_error_uses_invalid_error_override():
    spec = Param("SrcVersion", ListOf(Str(max_len=2)), invalid_error=errors.InvalidFormattedParameter)
    error = error_of(spec, {"SrcVersion.1": "abc"})
    assert error.code == "iot.common.InvalidFormattedParameter"
    assert error.message.startswith("The parameter SrcVersion is in an invalid format: SrcVersion.1 ")


# --- StructList ---------------------------------------------------------------------------------
TAG = Param("Tag", StructList({"Key": Str(min_len=1, max_len=30), "Value": Str(max_len=1024)},
                              required_fields=("Key",), max_items=3))


def test_struct_list_ordered_by_index():
    raw = {"Tag.10.Key": "k10", "Tag.10.Value": "v10", "Tag.2.Key": "k2", "Tag.2.Value": "v2",
           "Tag.1.Key": "k1"}
    assert parse_raw(TAG, raw) == {"Tag": [{"Key": "k1"}, {"Key": "k2", "Value": "v2"},
                                           {"Key": "k10", "Value": "v10"}]}


def test_struct_list_absent_is_none():
    assert parse_raw(TAG, {}) == {"Tag": None}


def test_struct_list_required_field():
    error = error_of(TAG, {"Tag.1.Key": "k", "Tag.2.Value": "v"})
    assert_missing(error, "Tag.2.Key")


def test_struct_list_required_field_empty_is_missing():
    # Key has min_len=1 so "" is refused by the field type first.
    spec = Param("Tag", StructList({"Key": Str(), "Value": Str()}, required_fields=("Key",)))
    assert_missing(error_of(spec, {"Tag.1.Key": "", "Tag.1.Value": "v"}), "Tag.1.Key")


def test_struct_list_field_is_parsed():
    error = error_of(TAG, {"Tag.1.Key": "k" * 31})
    assert_invalid(error, "Tag")
    assert "Tag.1.Key must be at most 30 characters" in error.message


def test_struct_list_unknown_subfields_are_ignored():
    assert parse_raw(TAG, {"Tag.1.Key": "k", "Tag.1.Colour": "red"}) == {"Tag": [{"Key": "k"}]}


def test_struct_list_max_items():
    raw = {f"Tag.{i}.Key": f"k{i}" for i in range(1, 5)}
    error = error_of(TAG, raw)
    assert_invalid(error, "Tag")
    assert error.message.endswith("at most 3 items are allowed")


def test_struct_list_typed_fields():
    spec = Param("MultiFiles", StructList({"Name": Str(min_len=1), "Size": Int(min=0)}))
    assert parse_raw(spec, {"MultiFiles.1.Name": "a", "MultiFiles.1.Size": "12"}) == {
        "MultiFiles": [{"Name": "a", "Size": 12}]
    }
    error = error_of(spec, {"MultiFiles.1.Name": "a", "MultiFiles.1.Size": "1e3"})
    assert "MultiFiles.1.Size must be an integer" in error.message


def test_struct_list_required_param():
    spec = Param("Tag", StructList({"Key": Str()}), required=True)
    assert_missing(error_of(spec, {}), "Tag")


# --- several parameters together ----------------------------------------------------------------
def test_parse_params_all_values():
    specs = (
        Param("ProductKey", Str(max_len=32), required=True),
        Param("CurrentPage", Int(min=1), default=1),
        Param("NeedPush", Bool(), default=True),
        Param("TargetSelection", Enum(("ALL", "SPECIFIC"))),
        Param("TargetDeviceName", ListOf(Str())),
        Param("Tag", StructList({"Key": Str(), "Value": Str()})),
    )
    raw = {
        "ProductKey": "a1xyz",
        "NeedPush": "False",
        "TargetSelection": "specific",
        "TargetDeviceName.2": "d2",
        "TargetDeviceName.1": "d1",
        "Tag.1.Key": "k",
        "Tag.1.Value": "v",
    }
    assert parse_raw(specs, raw) == {
        "ProductKey": "a1xyz",
        "CurrentPage": 1,
        "NeedPush": False,
        "TargetSelection": "SPECIFIC",
        "TargetDeviceName": ["d1", "d2"],
        "Tag": [{"Key": "k", "Value": "v"}],
    }


# --- empty values in the declared actions -------------------------------------------------------
def _action_params(name: str, raw: dict[str, str]) -> dict:
    from otaplane.openapi.registry import build_table

    return parse_params(build_table()[name].all_params, raw)


def test_empty_optional_values_of_create_firmware_are_defaults():
    raw = {"FirmwareName": "fw", "DestVersion": "2.0", "ProductKey": "pk", "FirmwareUrl": "https://x/y.bin"}
    empty = dict.fromkeys(("IotInstanceId", "FirmwareDesc", "SrcVersion", "ModuleName", "Udi", "FirmwareSign",
                           "SignMethod", "Type", "FirmwareSize", "NeedToVerify"), "")
    p = _action_params("CreateOTAFirmware", {**raw, **empty})
    assert (p["IotInstanceId"], p["FirmwareDesc"], p["SrcVersion"], p["Udi"], p["FirmwareSign"]) == (None,) * 5
    assert (p["ModuleName"], p["SignMethod"], p["Type"], p["NeedToVerify"]) == ("default", "MD5", 0, True)


def test_empty_optional_values_of_jobs_and_lists_are_defaults():
    p = _action_params("CreateOTAStaticUpgradeJob", {"FirmwareId": "f", "ProductKey": "pk", "TargetSelection": "ALL",
                                                     "DownloadProtocol": "", "DnListFileUrl": "", "GrayPercent": ""})
    assert (p["DownloadProtocol"], p["DnListFileUrl"], p["GrayPercent"]) == ("HTTPS", None, None)
    p = _action_params("ListOTAFirmware", {"CurrentPage": "1", "PageSize": "10", "ProductKey": "", "DestVersion": ""})
    assert (p["ProductKey"], p["DestVersion"]) == (None, None)


def test_empty_description_of_modify_firmware_changes_nothing():
    # None: FirmwareService.modify leaves the stored description and Udi as they are.
    p = _action_params("ModifyOTAFirmware", {"FirmwareId": "f", "ProductKey": "pk", "FirmwareName": "",
                                             "FirmwareDesc": "", "FirmwareUdi": ""})
    assert (p["FirmwareName"], p["FirmwareDesc"], p["FirmwareUdi"]) == (None, None, None)


@pytest.mark.parametrize("name", ["FirmwareId", "ProductKey", "TargetSelection"])
def test_empty_required_values_are_missing(name):
    raw = {"FirmwareId": "f", "ProductKey": "pk", "TargetSelection": "ALL", name: ""}
    with pytest.raises(ApiError) as info:
        _action_params("CreateOTAStaticUpgradeJob", raw)
    assert_missing(info.value, name)
