"""The etcd client's settings and failures: every one is an EtcdError of one line that names what to check.

Failures come from real sockets on 127.0.0.1 (a closed port, a listener that never answers, one that does
not speak TLS) and real certificate files; reads from a real etcd are in tests/e2e/test_audit.py.
"""

from __future__ import annotations

import pathlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

import localcluster
from keyward import etcd


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> localcluster.Pki:
    return localcluster.Pki(tmp_path_factory.mktemp("pki"))


def client(pki: localcluster.Pki, endpoints: str, **kw: float) -> etcd.EtcdClient:
    return etcd.EtcdClient(endpoints, pki.ca_cert, pki.admin_cert, pki.admin_key, **kw)


def error_of(call: Callable[[], object]) -> str:
    with pytest.raises(etcd.EtcdError) as caught:
        call()
    text = str(caught.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("https://127.0.0.1:2379", "127.0.0.1", 2379),
        ("https://10.0.0.5:12379/", "10.0.0.5", 12379),
        (" https://etcd-0.example.internal ", "etcd-0.example.internal", 2379),
        ("https://[::1]:2379", "::1", 2379),
    ],
)
def test_any_https_endpoint_is_accepted(text: str, host: str, port: int):
    assert etcd.parse_endpoint(text) == etcd.Endpoint(host, port)


def test_an_ipv6_endpoint_keeps_its_brackets_in_messages():
    assert etcd.parse_endpoint("https://[::1]:2379").url == "https://[::1]:2379"


@pytest.mark.parametrize(
    "text", ["http://127.0.0.1:2379", "127.0.0.1:2379", "https://", "https://h:port", "https://h:1/v3"]
)
def test_other_endpoints_are_refused_with_the_expected_form(text: str):
    with pytest.raises(etcd.EtcdConfigError) as caught:
        etcd.parse_endpoint(text)
    assert caught.value.setting == "endpoints"
    assert "https://HOST:PORT" in str(caught.value)


def test_a_list_of_endpoints_keeps_its_order_and_skips_blanks():
    found = etcd.parse_endpoints("https://a:1, ,https://b:2,")
    assert [e.url for e in found] == ["https://a:1", "https://b:2"]
    with pytest.raises(etcd.EtcdConfigError):
        etcd.parse_endpoints(" , ")


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"/registry/secrets/", b"/registry/secrets0"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0")],
)
def test_prefix_end_is_the_first_key_after_the_prefix(prefix: bytes, end: bytes):
    assert etcd.prefix_end(prefix) == end


def test_from_env_names_the_missing_variable():
    with pytest.raises(etcd.EtcdConfigError, match="KEYWARD_ETCD_ENDPOINTS is not set"):
        etcd.EtcdClient.from_env({})
    with pytest.raises(etcd.EtcdConfigError, match="KEYWARD_ETCD_CACERT is not set"):
        etcd.EtcdClient.from_env({"KEYWARD_ETCD_ENDPOINTS": "https://127.0.0.1:2379"})


@pytest.mark.parametrize("setting", ["cacert", "cert", "key"])
def test_a_missing_file_names_itself_and_its_setting(pki: localcluster.Pki, setting: str):
    files = {"cacert": pki.ca_cert, "cert": pki.admin_cert, "key": pki.admin_key}
    files[setting] = pathlib.Path("/nonexistent/dir") / f"{setting}.pem"
    c = etcd.EtcdClient("https://127.0.0.1:1", files["cacert"], files["cert"], files["key"])
    with pytest.raises(etcd.EtcdConfigError) as caught:
        c.healthy()
    assert caught.value.setting == setting
    assert f"/nonexistent/dir/{setting}.pem" in str(caught.value)
    assert "No such file or directory" in str(caught.value)


def test_a_ca_file_without_a_certificate_is_named(pki: localcluster.Pki, tmp_path: pathlib.Path):
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate\n")
    c = etcd.EtcdClient("https://127.0.0.1:1", bogus, pki.admin_cert, pki.admin_key)
    assert "holds no usable PEM certificate" in error_of(c.healthy)


def test_a_key_that_does_not_belong_to_the_certificate_is_named(pki: localcluster.Pki):
    c = etcd.EtcdClient("https://127.0.0.1:1", pki.ca_cert, pki.admin_cert, pki.etcd_client_key)
    assert "the key must belong to the certificate" in error_of(c.healthy)


def test_a_certificate_without_its_key_is_refused(pki: localcluster.Pki):
    c = etcd.EtcdClient("https://127.0.0.1:1", pki.ca_cert, pki.admin_cert, None)
    with pytest.raises(etcd.EtcdConfigError) as caught:
        c.healthy()
    assert caught.value.setting == "key"


@pytest.fixture
def closed_port() -> int:
    return localcluster.free_port()  # free a moment ago: nothing listens


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listener that accepts connections and never says anything."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def plain_port() -> Iterator[int]:
    """A listener that answers every connection with plain-text HTTP, not TLS."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)  # so that the thread sees ``stop`` soon
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_connection_refused_names_the_endpoint(pki: localcluster.Pki, closed_port: int):
    text = error_of(client(pki, f"https://127.0.0.1:{closed_port}").healthy)
    assert f"nothing listens at https://127.0.0.1:{closed_port} (connection refused)" in text


def test_a_silent_endpoint_times_out(pki: localcluster.Pki, silent_port: int):
    c = client(pki, f"https://127.0.0.1:{silent_port}", timeout=0.3)
    text = error_of(lambda: c.current_revision(b"/registry"))
    assert "did not answer within 0.3s" in text


def test_an_endpoint_that_is_not_tls_is_named(pki: localcluster.Pki, plain_port: int):
    assert "does not speak TLS" in error_of(client(pki, f"https://127.0.0.1:{plain_port}").healthy)


def test_when_no_endpoint_answers_each_reason_is_on_the_one_line(
    pki: localcluster.Pki, closed_port: int, plain_port: int
):
    text = error_of(client(pki, f"https://127.0.0.1:{closed_port},https://127.0.0.1:{plain_port}").healthy)
    assert text.startswith("no etcd endpoint answered: ")
    assert "connection refused" in text and "does not speak TLS" in text
