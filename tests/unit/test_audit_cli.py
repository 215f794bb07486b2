"""``keyward audit`` without etcd: its table, its checks, and one-line errors for missing or bad settings."""

from __future__ import annotations

import argparse
import pathlib

import pytest

from keyward import census
from keyward.cli import audit
from keyward.wire import envelope_pb2

V1, V2 = "secrets/v1/" + "a" * 24, "secrets/v2/" + "b" * 24


def kms(key_id: str, provider: str = "keyward") -> bytes:
    obj = envelope_pb2.EncryptedObject(encryptedData=b"x", keyID=key_id, encryptedDEKSource=b"d")
    return f"k8s:enc:kms:v2:{provider}:".encode() + obj.SerializeToString()


def results() -> list[census.Census]:
    return [
        census.take(census.resource("secrets"), [kms(V1), kms(V2), kms(V2), b"k8s\x00plain"]),
        census.take(census.resource("configmaps"), [b"k8s\x00a", b"k8s\x00b", b"k8s:enc:aescbc:v1:k:xx"]),
        census.take(census.resource("widgets.example.com"), []),
    ]


def test_the_table_has_aligned_columns_a_total_and_notes_for_empty_resources():
    text = audit.table(results(), 1234, "https://10.0.0.5:2379")
    assert text.splitlines() == [
        "RESOURCE             PROTECTION        PROVIDER  KEY ID                               OBJECTS",
        "secrets              kms-v2            keyward   secrets/v1/aaaaaaaaaaaaaaaaaaaaaaaa        1",
        "secrets              kms-v2            keyward   secrets/v2/bbbbbbbbbbbbbbbbbbbbbbbb        2",
        "secrets              plaintext         -         -                                          1",
        "configmaps           other-encryption  aescbc    -                                          1",
        "configmaps           plaintext         -         -                                          2",
        "widgets.example.com  -                 -         -                                          0",
        "TOTAL                                                                                       7",
        "",
        "read at etcd revision 1234 from https://10.0.0.5:2379; envelope headers only, nothing decrypted",
        "note: no widgets.example.com under /registry/example.com/widgets/: check the resource name "
        "(plural, with its API group) and --etcd-prefix",
    ]


def test_control_characters_from_etcd_do_not_reach_the_terminal():
    c = census.take(census.resource("secrets"), [kms("evil\x1b[2J\nid", provider="p\x07")])
    text = audit.table([c], 1, "https://e:2379")
    assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b[2J\\nid" in text


def test_no_check_asked_nothing_fails():
    audit.check(results(), expect_key_ids=(), fail_on_plaintext=False)


def test_expect_key_id_counts_what_is_elsewhere_per_resource():
    with pytest.raises(audit.CheckFailed) as caught:
        audit.check(results(), expect_key_ids=[V2], fail_on_plaintext=False)
    assert str(caught.value) == f"5 of 7 objects are not under key_id {V2} (secrets: 2, configmaps: 3)"
    only_secrets = results()[:1]
    with pytest.raises(audit.CheckFailed, match=r"^3 of 4 objects are not under key_id"):
        audit.check(only_secrets, expect_key_ids=[V1], fail_on_plaintext=False)


def test_several_expected_key_ids_are_all_allowed():
    secrets = census.take(census.resource("secrets"), [kms(V1), kms(V2)])
    audit.check([secrets], expect_key_ids=[V1, V2], fail_on_plaintext=False)


def test_fail_on_plaintext_names_the_resources_with_plaintext():
    with pytest.raises(audit.CheckFailed) as caught:
        audit.check(results(), expect_key_ids=(), fail_on_plaintext=True)
    assert str(caught.value) == "3 objects are stored in plaintext (secrets: 1, configmaps: 2)"
    encrypted = census.take(census.resource("secrets"), [kms(V1)])
    audit.check([encrypted], expect_key_ids=(), fail_on_plaintext=True)


def run(capsys: pytest.CaptureFixture[str], env: dict[str, str], *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="keyward")  # the e2e tests go through the real entry point
    audit.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", *argv])
    code = audit.run(args, environ=env)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return code, lines[0]


@pytest.fixture
def env(tmp_path: pathlib.Path) -> dict[str, str]:
    files = {}
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("")
        files[name] = str(tmp_path / name)
    return {
        "KEYWARD_ETCD_ENDPOINTS": "https://127.0.0.1:2379",
        "KEYWARD_ETCD_CACERT": files["ca.crt"],
        "KEYWARD_ETCD_CERT": files["client.crt"],
        "KEYWARD_ETCD_KEY": files["client.key"],
    }


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        (
            "KEYWARD_ETCD_ENDPOINTS",
            "keyward: no etcd endpoint given: set --etcd-endpoints or KEYWARD_ETCD_ENDPOINTS",
        ),
        (
            "KEYWARD_ETCD_CACERT",
            "keyward: no etcd CA certificate given: set --etcd-cacert or KEYWARD_ETCD_CACERT",
        ),
        (
            "KEYWARD_ETCD_CERT",
            "keyward: no etcd client certificate given: set --etcd-cert or KEYWARD_ETCD_CERT",
        ),
        ("KEYWARD_ETCD_KEY", "keyward: no etcd client key given: set --etcd-key or KEYWARD_ETCD_KEY"),
    ],
)
def test_a_missing_setting_names_its_flag_and_variable(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], variable: str, expected: str
):
    del env[variable]
    code, line = run(capsys, env)
    assert code == 2
    assert line.startswith(expected)


def test_flags_win_over_the_environment(capsys: pytest.CaptureFixture[str], env: dict[str, str]):
    code, line = run(capsys, env, "--etcd-cert", "/nonexistent/client.crt")
    assert code == 2
    assert line == (
        "keyward: cannot read the etcd client certificate file /nonexistent/client.crt: No such file or "
        "directory (set by --etcd-cert or KEYWARD_ETCD_CERT)"
    )


def test_a_bad_endpoint_is_a_usage_error(capsys: pytest.CaptureFixture[str], env: dict[str, str]):
    code, line = run(capsys, env, "--etcd-endpoints", "http://10.0.0.5:2379")
    assert code == 2
    assert "is not https" in line and line.endswith("(set by --etcd-endpoints or KEYWARD_ETCD_ENDPOINTS)")


def test_a_bad_resource_is_a_usage_error(capsys: pytest.CaptureFixture[str], env: dict[str, str]):
    code, line = run(capsys, env, "--resource", "secrets", "--resource", "Widgets.Example.com")
    assert code == 2
    assert line.startswith("keyward: 'Widgets.Example.com' is not a resource name")


def test_a_ca_file_that_holds_no_certificate_is_named(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
):
    code, line = run(capsys, env)
    assert code == 2
    assert "holds no usable PEM certificate" in line and line.endswith("KEYWARD_ETCD_CACERT)")
