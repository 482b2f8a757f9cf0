from tests.support.clients import RawSigner


def test_server_answers_a_signed_v1_call(server):
    # A fresh account: other tests add products to the shared one.
    response = RawSigner(server.base_url, *server.create_key("smoke-fresh")).v1("QueryProductList", {"CurrentPage": "1", "PageSize": "10"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["Success"] is True
    assert body["Data"]["Total"] == 0


def test_server_answers_a_signed_v3_call(server, admin_key):
    response = RawSigner(server.base_url, *admin_key).v3("QueryProductList", {"CurrentPage": "1", "PageSize": "10"})
    assert response.status_code == 200, response.text
    assert response.json()["Success"] is True


def test_listening_on_all_interfaces_without_a_public_url_warns(make_server):
    """The URLs then say 127.0.0.1, which no device on another machine reaches (found by a
    new-user audit: the README's external-broker example listened on 0.0.0.0 without one)."""
    server = make_server("sqlite", "--host", "0.0.0.0")
    assert "without --public-url" in server.logs()
    named = make_server("sqlite", "--host", "0.0.0.0", "--public-url", "http://ota.example.com")
    assert "without --public-url" not in named.logs()
