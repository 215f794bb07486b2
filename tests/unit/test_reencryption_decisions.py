"""Re-encryption's pure parts: when a run starts, how it is recorded, adoption, retirement, rate limit."""

from __future__ import annotations

import datetime

import pytest

from keyward.hsm import manifests
from keyward_operator import policies, retirement
from keyward_operator.reencryption import adoption, ratelimit, record, resourcenames

T0 = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def key(count: int, *, step: datetime.timedelta = HOUR) -> manifests.Manifest:
    """A key with ``count`` versions, version n made at T0 + (n-1)*step, the last one primary."""
    m = manifests.new("k", T0)
    for i in range(count):
        at = T0 + i * step
        m, v = manifests.begin_version(m, bytes([i]) * 12, at)
        m = manifests.complete_version(m, v.version, at, make_primary=True)
    return m


def a_run(target: int, phase: str, **kw: object) -> record.Run:
    return record.Run(
        target_version=target,
        target_key_id=f"k/v{target}/x",
        trigger="Rotation",
        phase=phase,
        requested_at=T0,
        **kw,  # type: ignore[arg-type]
    )


def start(run: record.Run | None, *, primary: int = 2, requested: str | None = None, handled=None, now=T0):
    return record.next_start(
        now=now,
        primary_version=primary,
        primary_key_id=f"k/v{primary}/x",
        run=run,
        requested=requested,
        handled=handled,
        retry_after=datetime.timedelta(minutes=10),
    )


def test_a_new_primary_starts_a_run_and_an_active_run_for_it_continues():
    assert start(None, primary=1) is None, "a key with one version has nothing older to move away from"
    assert start(None, primary=2).trigger == "Rotation"
    assert start(a_run(2, record.RUNNING)) is None
    assert start(a_run(2, record.SUCCEEDED)) is None
    assert start(a_run(2, record.RUNNING), primary=3).trigger == "Rotation", "a newer primary wins"


def test_a_request_starts_a_run_once_and_a_failed_run_is_retried_after_its_backoff():
    s = start(a_run(2, record.SUCCEEDED), requested="r1")
    assert s is not None and (s.trigger, s.request) == ("Requested", "r1")
    assert start(a_run(2, record.SUCCEEDED), requested="r1", handled="r1") is None
    assert start(None, primary=1, requested="r2").trigger == "Requested", "plaintext clusters ask at v1"
    failed = a_run(2, record.FAILED, finished_at=T0)
    assert start(failed, now=T0 + datetime.timedelta(minutes=9)) is None
    assert start(failed, now=T0 + datetime.timedelta(minutes=10)).trigger == "Retry"


def test_a_run_survives_the_round_trip_through_the_status():
    run = a_run(3, record.RUNNING, started_at=T0 + HOUR)
    run.resources = [
        record.ResourceProgress("secrets", seen=500, rewritten=480, conflicts=20, continue_token="tok"),
        record.ResourceProgress("configmaps", done=True, seen=3, unchanged=3),
    ]
    run.note_failure("secrets a/b: HTTP 422: nope")
    raw = run.to_status()
    assert raw["seen"] == 503 and raw["rewritten"] == 480 and raw["resources"][0]["continue"] == "tok"
    back = record.Run.from_status(raw)
    assert back == run
    assert record.Run.from_status({}) is None
    for _ in range(20):
        run.note_failure("x")
    assert len(run.failed_objects) == record.MAX_FAILED_OBJECTS


def test_the_reencrypted_condition_speaks_of_the_current_primary():
    name = "k"
    ok, reason, message = record.condition(None, primary_version=1, primary_key_id="k/v1/x", name=name)
    assert (ok, reason) == (None, "NotRequested") and "keyward reencrypt k" in message
    done = a_run(2, record.SUCCEEDED, started_at=T0, finished_at=T0)
    assert record.condition(done, primary_version=2, primary_key_id="k/v2/x", name=name)[0] is True
    ok, reason, _ = record.condition(done, primary_version=3, primary_key_id="k/v3/x", name=name)
    assert (ok, reason) == (False, "Pending"), "a finished run for an older primary does not count"
    failed = a_run(
        2, record.FAILED, message="1 object(s) could not be rewritten (first: secrets a/b: HTTP 422)"
    )
    ok, reason, message = record.condition(failed, primary_version=2, primary_key_id="k/v2/x", name=name)
    assert (ok, reason) == (False, "ReencryptionFailed") and "a/b" in message


def retire(m, *, run=None, succeeded=None, desired=None, now=T0, decrypt_only="1h"):
    return retirement.plan(
        now=now,
        manifest=m,
        policy=policies.from_spec("p", {"decryptOnlyPeriod": decrypt_only}),
        desired=desired or {},
        run=run,
        succeeded=succeeded,
    )


def test_a_version_retires_only_after_a_successful_run_to_a_later_version_and_its_decrypt_only_period():
    m = key(2)  # v2 made at T0+1h
    late = T0 + 3 * HOUR
    blocked = retire(m, now=late)
    assert blocked.disable == () and (blocked.ok, blocked.reason) == (False, "ReencryptionPending")
    failed = a_run(
        2, record.FAILED, message="1 object(s) could not be rewritten (first: secrets a/b: HTTP 422)"
    )
    blocked = retire(m, run=failed, now=late)
    assert blocked.reason == "ReencryptionFailed" and "a/b" in blocked.message
    waiting = retire(m, run=a_run(2, record.WAITING, message="1 of 2 apiservers"), now=late)
    assert waiting.reason == "WaitingForAdoption" and waiting.disable == ()

    ok = record.Succeeded(2, T0 + HOUR, T0 + 2 * HOUR)  # finished an hour after it started
    early = retire(m, succeeded=ok, now=T0 + 2 * HOUR + datetime.timedelta(minutes=59))
    assert early.disable == () and early.reason == "DecryptOnlyPeriod" and early.wake_at == T0 + 3 * HOUR
    due = retire(m, succeeded=ok, now=T0 + 3 * HOUR)
    assert due.disable == (1,) and due.ok

    assert retire(m, succeeded=record.Succeeded(1, T0, T0), now=late).disable == (), (
        "a run to the same version proves nothing"
    )
    assert retire(m, succeeded=ok, now=late, desired={1: "Enabled"}).disable == (), "spec.versions wins"
    assert retire(key(1), now=late).reason == "NothingToRetire"


def test_adoption_needs_every_live_apiserver_to_report_the_key():
    a, b = "apiserver-aaa", "apiserver-bbb"
    text = "\n".join(
        [
            "# HELP x",
            f'{adoption.STATUS_METRIC}{{apiserver_id_hash="{adoption.sha256_label(a)}",'
            f'key_id_hash="{adoption.sha256_label("k/v2/x")}",provider_name="keyward"}} 1.7e+09',
            f'{adoption.STATUS_METRIC}{{apiserver_id_hash="{adoption.sha256_label(b)}",'
            f'key_id_hash="{adoption.sha256_label("k/v1/x")}",provider_name="keyward"}} 1.7e+09',
            'apiserver_envelope_encryption_key_id_hash_total{apiserver_id_hash="z",key_id_hash="y"} 3',
        ]
    )
    reported = adoption.reported_key_ids(text)
    assert adoption.judge("k/v2/x", [a], reported, []).adopted
    two = adoption.judge("k/v2/x", [a, b], reported, [])
    assert not two.adopted and (two.apiservers, two.reporting) == (2, 1) and b in two.message
    assert adoption.judge(
        "k/v1/x", [a, b], {**reported, adoption.sha256_label(a): {adoption.sha256_label("k/v1/x")}}, []
    ).adopted
    assert not adoption.judge("k/v2/x", [], {}, []).adopted


def test_expired_identity_leases_do_not_count():
    now = T0
    fresh = {
        "metadata": {"name": "apiserver-a"},
        "spec": {"renewTime": "2026-11-30T23:59:50Z", "leaseDurationSeconds": 3600},
    }
    dead = {
        "metadata": {"name": "apiserver-b"},
        "spec": {"renewTime": "2026-11-30T20:00:00Z", "leaseDurationSeconds": 3600},
    }
    assert adoption.live_apiservers([fresh, dead], now) == ["apiserver-a"]


def test_policy_reencryption_settings_are_checked_with_the_field_named():
    p = policies.from_spec(
        "p", {"reencryption": {"resources": ["secrets", "widgets.example.com"], "objectsPerSecond": 50}}
    )
    assert p.reencrypt_resources == ("secrets", "widgets.example.com") and p.reencrypt_rate == 50
    assert policies.built_in().reencrypt_resources == ("secrets",)
    with pytest.raises(policies.PolicyError, match=r"spec\.reencryption\.objectsPerSecond"):
        policies.from_spec("p", {"reencryption": {"objectsPerSecond": 0}})
    with pytest.raises(policies.PolicyError, match=r"spec\.reencryption\.resources"):
        policies.from_spec("p", {"reencryption": {"resources": ["Secrets!"]}})
    assert resourcenames.split("widgets.example.com") == ("widgets", "example.com")
    assert resourcenames.split("secrets") == ("secrets", "")


def test_the_rate_limiter_spaces_writes_to_the_rate():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = ratelimit.RateLimiter(10, burst=1, clock=lambda: now[0], sleep=sleep)
    for _ in range(11):
        limiter.acquire()
    assert now[0] == pytest.approx(1.0), "11 writes at 10/s with a burst of 1 take one second"
    with pytest.raises(ValueError):
        ratelimit.RateLimiter(0)


def test_a_rotation_run_that_rewrote_nothing_of_a_resource_proves_nothing():
    run = a_run(2, record.SUCCEEDED)
    run.resources = [
        record.ResourceProgress("secrets", seen=10, rewritten=9, conflicts=1),
        record.ResourceProgress("configmaps", seen=5, unchanged=5),
    ]
    assert record.summary(run) == "secrets, configmaps: 15 seen, 9 rewritten, 5 unchanged, 1 conflict"
    assert record.untouched(run) == ["configmaps"]
    run.trigger = "Requested"
    assert record.untouched(run) == [], "a requested run may legitimately find everything current"
