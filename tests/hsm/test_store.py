"""The key store on a real SoftHSM2 token, in this process: crash recovery, concurrent writers, attributes.

python-pkcs11 loads a PKCS#11 module once per process and SoftHSM2 reads its configuration then, so every
test here shares one session-wide token and uses a key name of its own.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from pkcs11 import Attribute, ObjectClass

import localcluster
from keyward.hsm import config, errors, manifests, store, worker
from keyward.hsm.manifests import State


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture(scope="module")
def hsm() -> Iterator[worker.HsmWorker]:
    base = pathlib.Path(tempfile.mkdtemp(prefix="kws-", dir="/tmp"))
    token = localcluster.SoftHsmToken(base / "hsm")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    cfg = config.HsmConfig(module_path=token.module_path, token_label=token.label, pin_file=token.pin_file)
    w = worker.HsmWorker(cfg)
    yield w
    w.close()
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key_store(hsm: worker.HsmWorker, clock: FakeClock, tmp_path: pathlib.Path) -> store.KeyStore:
    return store.KeyStore(hsm, clock=clock, lock_path=tmp_path / "lock")


def key_objects(hsm: worker.HsmWorker, object_id: bytes | None = None) -> list[dict[Attribute, Any]]:
    def read(session: Any) -> list[dict[Attribute, Any]]:
        template: dict[Any, Any] = {Attribute.CLASS: ObjectClass.SECRET_KEY}
        if object_id is not None:
            template[Attribute.ID] = object_id
        return [
            {
                a: obj[a]
                for a in (
                    Attribute.ID,
                    Attribute.SENSITIVE,
                    Attribute.EXTRACTABLE,
                    Attribute.WRAP,
                    Attribute.UNWRAP,
                    Attribute.ENCRYPT,
                    Attribute.DECRYPT,
                    Attribute.LABEL,
                )
            }
            for obj in session.get_objects(template)
        ]

    return hsm.run(read)


def objects_of(hsm: worker.HsmWorker, m: manifests.Manifest) -> list[dict[Attribute, Any]]:
    ids = {v.object_id for v in m.versions}
    return [o for o in key_objects(hsm) if bytes(o[Attribute.ID]) in ids]


def test_version_keys_are_sensitive_non_extractable_and_only_encrypt_and_decrypt(key_store, hsm):
    m = key_store.create_key("attrs", actor="test")
    (obj,) = objects_of(hsm, m)
    assert obj[Attribute.SENSITIVE] is True and obj[Attribute.EXTRACTABLE] is False
    assert obj[Attribute.WRAP] is False and obj[Attribute.UNWRAP] is False
    assert obj[Attribute.ENCRYPT] is True and obj[Attribute.DECRYPT] is True
    assert obj[Attribute.LABEL] == "keyward/attrs/v1"


def test_a_rotation_interrupted_after_generating_completes_once_on_the_next_call(key_store, hsm, monkeypatch):
    key_store.create_key("crash-after-generate", actor="test")
    real = manifests.complete_version
    monkeypatch.setattr(
        manifests, "complete_version", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash"))
    )
    with pytest.raises(RuntimeError, match="crash"):
        key_store.rotate("crash-after-generate", actor="test")
    monkeypatch.setattr(manifests, "complete_version", real)
    half = key_store.manifest("crash-after-generate")
    assert half.primary == 1 and half.pending is not None and half.pending.version == 2
    assert len(key_objects(hsm, half.pending.object_id)) == 1  # generated, not yet promoted

    done = key_store.rotate("crash-after-generate", actor="test")  # the user simply asks again
    assert done.primary == 2 and done.pending is None
    assert [v.version for v in done.versions] == [1, 2]
    assert len(objects_of(hsm, done)) == 2, "the half-made version was reused, not generated twice"


def test_a_rotation_interrupted_before_generating_generates_the_recorded_version(key_store, hsm):
    m = key_store.create_key("crash-before-generate", actor="test")
    pending, v = manifests.begin_version(m, os.urandom(12), m.created_at)
    key_store._write(m, pending)  # what a crash right after recording the intent leaves behind
    assert key_objects(hsm, v.object_id) == []
    done = key_store.resume("crash-before-generate", actor="test")
    assert done.primary == 2 and done.version(2).object_id == v.object_id
    assert len(objects_of(hsm, done)) == 2
    assert key_store.resume("crash-before-generate", actor="test") == done  # nothing left to do


def test_a_writer_holding_a_stale_manifest_is_refused_and_changes_nothing(key_store, hsm, clock, tmp_path):
    other = store.KeyStore(hsm, clock=clock, lock_path=tmp_path / "other-lock")
    stale = key_store.create_key("cas", actor="test")
    other.rotate("cas", actor="test")
    with pytest.raises(errors.StoreConflictError, match="changed by another writer"):
        key_store._write(stale, manifests.set_primary(stale, 1))
    assert key_store.manifest("cas").primary == 2


def test_superseded_manifest_objects_are_removed_after_each_write(key_store, hsm):
    key_store.create_key("gc", actor="test")
    for _ in range(3):
        key_store.rotate("gc", actor="test")

    def count(session: Any) -> int:
        return len(list(session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "gc"})))

    assert hsm.run(count) == 1


def test_destruction_waits_for_its_time_then_deletes_the_material(key_store, hsm, clock):
    m = key_store.create_key("destroy", actor="test")
    v1 = m.version(1)
    sealed = key_store.encrypt(v1, b"k" * 32)
    key_store.rotate("destroy", actor="test")
    key_store.disable("destroy", 1, actor="test")
    key_store.schedule_destroy("destroy", 1, clock() + datetime.timedelta(days=30), actor="test")
    clock.now += datetime.timedelta(days=29)
    with pytest.raises(errors.VersionStateError, match="before its scheduled time"):
        key_store.destroy("destroy", 1, actor="test")
    assert len(key_objects(hsm, v1.object_id)) == 1
    clock.now += datetime.timedelta(days=1)
    m = key_store.destroy("destroy", 1, actor="test")
    assert m.version(1).state is State.DESTROYED
    assert key_objects(hsm, v1.object_id) == []
    with pytest.raises(errors.VersionStateError, match="Destroyed"):
        key_store.decrypt(m.version(1), sealed)


def test_a_key_made_again_under_the_same_name_never_reuses_a_key_id(key_store, hsm):
    first = key_store.create_key("again", actor="test")

    def wipe(session: Any) -> None:
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "again"}):
            obj.destroy()
        for v in first.versions:
            for obj in session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: v.object_id}
            ):
                obj.destroy()

    hsm.run(wipe)
    second = key_store.create_key("again", actor="test")
    assert second.version(1).key_id != first.version(1).key_id


def test_creating_an_existing_key_is_refused_and_changes_nothing(key_store):
    m = key_store.create_key("exists", actor="test")
    with pytest.raises(errors.KeyExistsError, match="already exists"):
        key_store.create_key("exists", actor="test")
    assert key_store.manifest("exists") == m


def test_an_unknown_key_says_how_to_create_it(key_store):
    with pytest.raises(errors.KeyNotFoundError, match="keyward keys create nope"):
        key_store.rotate("nope", actor="test")


def test_a_rotation_request_makes_exactly_one_version_however_often_it_is_replayed(key_store, hsm):
    key_store.create_key("replayed", actor="test")
    first = key_store.rotate("replayed", actor="test", request_id="manual:2026-12-03T10:00:00Z")
    again = key_store.rotate("replayed", actor="test", request_id="manual:2026-12-03T10:00:00Z")
    assert first == again and first.primary == 2
    other = key_store.rotate("replayed", actor="test", request_id="manual:2026-12-03T11:00:00Z")
    assert other.primary == 3 and other.version(3).request_id == "manual:2026-12-03T11:00:00Z"
    assert len(objects_of(hsm, other)) == 3


def test_a_replayed_request_whose_version_was_interrupted_finishes_that_version(key_store, hsm, monkeypatch):
    key_store.create_key("replay-crash", actor="test")
    real = manifests.complete_version
    monkeypatch.setattr(
        manifests, "complete_version", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash"))
    )
    with pytest.raises(RuntimeError):
        key_store.rotate("replay-crash", actor="test", request_id="scheduled:1")
    monkeypatch.setattr(manifests, "complete_version", real)
    done = key_store.rotate("replay-crash", actor="test", request_id="scheduled:1")
    assert done.primary == 2 and done.version(2).request_id == "scheduled:1"
    assert len(objects_of(hsm, done)) == 2
