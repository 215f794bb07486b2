"""Classifying raw etcd values without decrypting them."""

from __future__ import annotations

from keyward import atrest
from keyward.wire import envelope_pb2


def test_a_kms_v2_value_gives_its_provider_and_key_id():
    obj = envelope_pb2.EncryptedObject(
        encryptedData=b"x", keyID="secrets/v3/" + "a" * 24, encryptedDEKSource=b"d"
    )
    found = atrest.inspect(b"k8s:enc:kms:v2:keyward:" + obj.SerializeToString())
    assert found == atrest.AtRest(
        atrest.Protection.KMS_V2, provider="keyward", key_id="secrets/v3/" + "a" * 24
    )


def test_a_value_written_before_encryption_is_plaintext():
    assert atrest.inspect(b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret").protection is atrest.Protection.PLAINTEXT


def test_other_providers_are_named():
    found = atrest.inspect(b"k8s:enc:aescbc:v1:key1:....")
    assert (found.protection, found.provider) == (atrest.Protection.OTHER, "aescbc")


def test_a_kms_prefix_with_garbage_is_unreadable_not_plaintext():
    assert atrest.inspect(b"k8s:enc:kms:v2:keyward:\xff\xff\xff").protection is atrest.Protection.UNREADABLE
