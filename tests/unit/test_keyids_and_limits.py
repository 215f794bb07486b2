"""Key names, key_ids, and the apiserver's limits on what a plugin returns."""

from __future__ import annotations

import pytest

from keyward.hsm import errors, keyids
from kmsplugin import limits


@pytest.mark.parametrize("name", ["secrets", "a", "k-1", "x" * 63])
def test_dns_labels_are_valid_key_names(name):
    assert keyids.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Secrets", "-a", "a-", "a_b", "a/b", "x" * 64, "a.b"])
def test_other_names_are_refused_with_the_rule(name):
    with pytest.raises(errors.InvalidNameError, match="DNS-1123 label"):
        keyids.validate_name(name)


def test_a_key_id_round_trips_and_stays_far_below_the_limit():
    kid = keyids.format_key_id("x" * 63, 4_000_000_000, b"\xab" * keyids.OBJECT_ID_BYTES)
    parsed = keyids.parse_key_id(kid)
    assert parsed is not None
    assert (parsed.name, parsed.version, parsed.object_id) == ("x" * 63, 4_000_000_000, b"\xab" * 12)
    assert len(kid) < 120


@pytest.mark.parametrize("text", ["", "secrets/v0/00", "secrets/1/" + "0" * 24, "k8s:enc:foo"])
def test_strings_that_are_not_key_ids_parse_to_none(text):
    assert keyids.parse_key_id(text) is None


def test_key_id_limits():
    limits.check_key_id("k" * 1024)
    with pytest.raises(limits.LimitError, match="key_id is empty"):
        limits.check_key_id("")
    with pytest.raises(limits.LimitError, match="1025 bytes; the limit is 1024"):
        limits.check_key_id("k" * 1025)


def test_ciphertext_limits():
    limits.check_ciphertext(b"c" * 1024)
    with pytest.raises(limits.LimitError, match="empty"):
        limits.check_ciphertext(b"")
    with pytest.raises(limits.LimitError, match="limit is 1024"):
        limits.check_ciphertext(b"c" * 1025)


@pytest.mark.parametrize("key", ["keyward.io", "a.b.c", "v1.keyward.io"])
def test_fqdn_annotation_keys_are_accepted(key):
    limits.check_annotations({key: b"v"})


@pytest.mark.parametrize("key", ["keyward", "Keyward.io", "keyward.io/x", "-a.b", ""])
def test_other_annotation_keys_are_refused(key):
    with pytest.raises(limits.LimitError, match="fully qualified domain name"):
        limits.check_annotations({key: b"v"})


def test_annotations_are_limited_to_32_kib_in_total():
    limits.check_annotations({"a.io": b"v" * (32 * 1024 - 4)})
    with pytest.raises(limits.LimitError, match="limit is 32768"):
        limits.check_annotations({"a.io": b"v" * (32 * 1024 - 3)})
