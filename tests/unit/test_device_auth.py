"""Device CONNECT signatures: vectors computed here with hmac directly, in the clientId forms the
SDKs send (device-protocol.md section 2)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from otaplane.devices import auth

PK, DN, SECRET = "a1TestPK", "dev1", "secret123"


def expected(secret: str, content: str, digest) -> str:
    return hmac.new(secret.encode(), content.encode(), digest).hexdigest()


def test_python_sdk_form_hmacsha1_lowercase():
    client_id = (f"{PK}&{DN}|securemode=3,signmethod=hmacsha1,ext=1,_ss=1,lan=Python,_v=1.2.13,"
                 "timestamp=1795644898|")
    password = expected(SECRET, f"clientId{PK}&{DN}deviceName{DN}productKey{PK}timestamp1795644898", hashlib.sha1)
    login = auth.parse_login(client_id, f"{DN}&{PK}")
    assert (login.product_key, login.device_name, login.client_id) == (PK, DN, f"{PK}&{DN}")
    assert (login.sign_method, login.timestamp, login.secure_mode) == ("hmacsha1", "1795644898", "3")
    assert login.extensions["_ss"] == "1"
    assert auth.password_for(login, SECRET) == password
    assert auth.verify(login, SECRET, password)


def test_link_sdk4_form_trailing_comma_hmacsha256_uppercase():
    client_id = f"{PK}.{DN}|timestamp=2524608000000,_ss=1,_v=sdk-c-4.1.0,securemode=2,signmethod=hmacsha256,ext=3,|"
    password = expected(SECRET, f"clientId{PK}.{DN}deviceName{DN}productKey{PK}timestamp2524608000000",
                        hashlib.sha256).upper()
    login = auth.parse_login(client_id, f"{DN}&{PK}")
    assert login.client_id == f"{PK}.{DN}" and login.sign_method == "hmacsha256"
    assert login.timestamp == "2524608000000"  # 2050: never checked for freshness
    assert auth.verify(login, SECRET, password)
    assert auth.verify(login, SECRET, password.encode())  # bytes as well


def test_iotkit3_form():
    client_id = (f"{PK}.{DN}|timestamp=2524608000000,_v=sdk-c-3.2.0,securemode=3,signmethod=hmacsha256,lan=C,"
                 "_ss=1,gw=0,ext=0|")
    password = expected(SECRET, f"clientId{PK}.{DN}deviceName{DN}productKey{PK}timestamp2524608000000",
                        hashlib.sha256).upper()
    assert auth.verify(auth.parse_login(client_id, f"{DN}&{PK}"), SECRET, password)


def test_assigned_client_id_signs_an_empty_client_id_value():
    client_id = "|timestamp=2524608000000,securemode=2,signmethod=hmacsha256,|"
    password = expected(SECRET, f"clientIddeviceName{DN}productKey{PK}timestamp2524608000000", hashlib.sha256)
    assert auth.verify(auth.parse_login(client_id, f"{DN}&{PK}"), SECRET, password)


def test_hmacmd5_without_timestamp_signs_no_timestamp():
    client_id = "my-id|securemode=3,signmethod=hmacmd5|"
    password = expected(SECRET, f"clientIdmy-iddeviceName{DN}productKey{PK}", hashlib.md5)
    login = auth.parse_login(client_id, f"{DN}&{PK}")
    assert login.timestamp is None
    assert auth.verify(login, SECRET, password)


def test_no_signmethod_means_hmacmd5():
    login = auth.parse_login("my-id|securemode=3|", f"{DN}&{PK}")
    assert login.sign_method == "hmacmd5"


def test_signmethod_is_case_insensitive():
    assert auth.parse_login("x|signmethod=HmacSHA1|", f"{DN}&{PK}").sign_method == "hmacsha1"


def test_empty_items_and_items_without_values_are_tolerated():
    client_id = "x|,,securemode=3,,flag,signmethod=hmacsha1,timestamp=1,|"
    login = auth.parse_login(client_id, f"{DN}&{PK}")
    assert (login.sign_method, login.timestamp) == ("hmacsha1", "1")
    password = expected(SECRET, f"clientIdxdeviceName{DN}productKey{PK}timestamp1", hashlib.sha1)
    assert auth.verify(login, SECRET, password)


def test_a_client_id_without_extensions():
    login = auth.parse_login("plain-client", f"{DN}&{PK}")
    assert login.client_id == "plain-client" and login.extensions == {}


def test_device_names_may_contain_at_dot_colon():
    login = auth.parse_login("x|signmethod=hmacsha1|", f"dev@a.b:c&{PK}")
    assert (login.product_key, login.device_name) == (PK, "dev@a.b:c")


@pytest.mark.parametrize("bad", ["wrong", "", None])
def test_wrong_passwords_are_refused(bad):
    login = auth.parse_login(f"{PK}&{DN}|signmethod=hmacsha1,timestamp=1|", f"{DN}&{PK}")
    assert not auth.verify(login, SECRET, bad)


def test_another_secret_or_another_timestamp_does_not_verify():
    login = auth.parse_login(f"{PK}&{DN}|signmethod=hmacsha1,timestamp=1|", f"{DN}&{PK}")
    password = auth.password_for(login, SECRET)
    assert not auth.verify(login, "other-secret", password)
    other = auth.parse_login(f"{PK}&{DN}|signmethod=hmacsha1,timestamp=2|", f"{DN}&{PK}")
    assert not auth.verify(other, SECRET, password)


@pytest.mark.parametrize("username", [None, "", "no-ampersand", "&pk", "dn&"])
def test_usernames_that_name_no_device_are_refused(username):
    with pytest.raises(auth.LoginRefused):
        auth.parse_login("x|signmethod=hmacsha1|", username)


def test_unknown_signmethod_and_dynamic_registration_are_refused():
    with pytest.raises(auth.LoginRefused):
        auth.parse_login("x|signmethod=hmacsha512|", f"{DN}&{PK}")
    with pytest.raises(auth.LoginRefused):
        auth.parse_login("x|securemode=-2,authType=register|", f"{DN}&{PK}")
