"""The version state machine: every allowed move, and every refused one with its reason."""

from __future__ import annotations

import datetime

import pytest

from keyward.hsm import errors, manifests
from keyward.hsm.manifests import State

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LATER = T0 + datetime.timedelta(days=31)


def key_with_versions(count: int) -> manifests.Manifest:
    m = manifests.new("secrets", T0)
    for i in range(count):
        m, v = manifests.begin_version(m, bytes([i]) * 12, T0)
        m = manifests.complete_version(m, v.version, T0, make_primary=True)
    return m


def test_a_rotation_adds_the_next_number_and_makes_it_primary():
    m = key_with_versions(2)
    assert m.primary == 2
    assert [v.state for v in m.versions] == [State.ENABLED, State.ENABLED]
    assert m.version(2).key_id == "secrets/v2/" + (b"\x01" * 12).hex()


def test_every_change_increments_the_generation():
    m = key_with_versions(1)
    assert m.generation == 2  # begin + complete
    assert manifests.disable(key_with_versions(2), 1, T0).generation == 5


def test_the_primary_can_be_neither_disabled_nor_scheduled_for_destruction():
    m = key_with_versions(2)
    with pytest.raises(errors.VersionStateError, match="it is the primary"):
        manifests.disable(m, 2, T0)
    with pytest.raises(errors.VersionStateError, match="primary"):
        manifests.schedule_destroy(m, 2, T0, LATER)


def test_destroy_requires_disable_then_schedule_then_the_time():
    m = key_with_versions(2)
    with pytest.raises(errors.VersionStateError, match="only a version that is Disabled"):
        manifests.schedule_destroy(m, 1, T0, LATER)
    m = manifests.disable(m, 1, T0)
    with pytest.raises(errors.VersionStateError, match="only a version that is DestroyScheduled"):
        manifests.mark_destroyed(m, 1, LATER)
    m = manifests.schedule_destroy(m, 1, T0, LATER)
    with pytest.raises(errors.VersionStateError, match="before its scheduled time"):
        manifests.mark_destroyed(m, 1, LATER - datetime.timedelta(seconds=1))
    m = manifests.mark_destroyed(m, 1, LATER)
    assert m.version(1).state is State.DESTROYED
    assert m.version(1).destroyed_at == LATER


def test_cancelling_a_scheduled_destruction_returns_to_disabled_not_enabled():
    m = manifests.schedule_destroy(manifests.disable(key_with_versions(2), 1, T0), 1, T0, LATER)
    m = manifests.cancel_destroy(m, 1, T0)
    assert m.version(1).state is State.DISABLED
    assert m.version(1).destroy_at is None


def test_destroyed_is_terminal_and_its_number_is_never_reused():
    m = manifests.schedule_destroy(manifests.disable(key_with_versions(2), 1, T0), 1, T0, LATER)
    m = manifests.mark_destroyed(m, 1, LATER)
    for change in (manifests.enable, manifests.disable, manifests.cancel_destroy):
        with pytest.raises(errors.VersionStateError):
            change(m, 1, LATER)
    m, v = manifests.begin_version(m, b"\x09" * 12, LATER)
    assert v.version == 3


def test_disabled_versions_do_not_decrypt_and_can_be_enabled_again():
    m = manifests.disable(key_with_versions(2), 1, T0)
    assert not m.version(1).can_decrypt
    assert manifests.enable(m, 1, T0).version(1).can_decrypt


def test_a_second_rotation_cannot_start_while_one_is_pending():
    m, _ = manifests.begin_version(key_with_versions(1), b"\x05" * 12, T0)
    with pytest.raises(errors.VersionStateError, match="being generated"):
        manifests.begin_version(m, b"\x06" * 12, T0)


def test_a_manifest_survives_serialisation_unchanged():
    m = manifests.schedule_destroy(manifests.disable(key_with_versions(3), 1, T0), 1, T0, LATER)
    assert manifests.Manifest.from_bytes(m.to_bytes()) == m


def test_an_unknown_manifest_format_is_refused_clearly():
    with pytest.raises(errors.StoreError, match="unknown format"):
        manifests.Manifest.from_bytes(b'{"kind":"KeywardKeyManifest","formatVersion":7}')
