"""The ciphertext format: parsing, and telling truncation, foreign data and key_id mismatch apart."""

from __future__ import annotations

import pytest

from keyward.hsm import envelope, errors
from kmsplugin import limits

KEY_ID = "secrets/v1/0123456789abcdef01234567"


def sealed(body: bytes = b"c" * 48) -> bytes:
    return envelope.header(KEY_ID, b"n" * 12) + body


def test_a_well_formed_ciphertext_splits_into_header_nonce_and_body():
    parts = envelope.parse(sealed())
    assert parts.nonce == b"n" * 12
    assert parts.body == b"c" * 48
    assert parts.key_id_tag == envelope.key_id_tag(KEY_ID)
    envelope.check_key_id(parts, KEY_ID)


def test_foreign_bytes_are_rejected_as_not_our_format():
    with pytest.raises(errors.MalformedCiphertextError, match="not in Keyward's format"):
        envelope.parse(b"k8s:enc:aescbc:v1:" + b"x" * 60)


def test_an_unknown_format_number_is_rejected_by_name():
    data = bytearray(sealed())
    data[2] = 9
    with pytest.raises(errors.MalformedCiphertextError, match="format 9 is not supported"):
        envelope.parse(bytes(data))


@pytest.mark.parametrize("length", [3, envelope.HEADER_LEN, envelope.MIN_LEN - 1])
def test_a_truncated_ciphertext_says_truncated(length):
    with pytest.raises(errors.MalformedCiphertextError, match="truncated"):
        envelope.parse(sealed()[:length])


def test_a_ciphertext_presented_with_another_key_id_is_a_mismatch_not_tampering():
    with pytest.raises(errors.KeyIdMismatchError, match="not made under key_id"):
        envelope.check_key_id(envelope.parse(sealed()), "secrets/v2/0123456789abcdef01234567")


def test_the_aad_binds_header_and_full_key_id():
    head = envelope.header(KEY_ID, b"n" * 12)
    assert envelope.aad(head, KEY_ID) != envelope.aad(head, KEY_ID + "x")
    assert head in envelope.aad(head, KEY_ID)


def test_a_32_byte_seed_fits_far_below_the_apiservers_limit():
    assert envelope.MIN_LEN + 32 == 71
    assert envelope.MIN_LEN + 32 < limits.MAX_CIPHERTEXT
