"""The operator's pure decisions: durations, policies, when to rotate, which version changes to make."""

from __future__ import annotations

import datetime

import pytest

from keyward.hsm import manifests
from keyward.hsm.manifests import State
from keyward_operator import conditions, decisions, durations, policies

T0 = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def key(count: int = 1) -> manifests.Manifest:
    m = manifests.new("k", T0)
    for i in range(count):
        m, v = manifests.begin_version(m, bytes([i]) * 12, T0)
        m = manifests.complete_version(m, v.version, T0, make_primary=True)
    return m


def policy(**spec: str) -> policies.Policy:
    return policies.from_spec("p", spec)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90d", 90 * 86400), ("1h30m", 5400), ("20s", 20), ("2d3h", 183600)]
)
def test_durations_parse(text, seconds):
    assert durations.parse(text, field="f").total_seconds() == seconds
    assert (
        durations.parse(
            durations.format_duration(durations.parse(text, field="f")), field="f"
        ).total_seconds()
        == seconds
    )


@pytest.mark.parametrize("text", ["", "5w", "-1d", "ninety days", "1.5h", "h"])
def test_bad_durations_name_the_field(text):
    with pytest.raises(durations.DurationError, match=r"spec\.rotationPeriod must be a duration such as 90d"):
        durations.parse(text, field="spec.rotationPeriod")


def test_defaults_follow_the_kubernetes_docs_and_the_cloud_kmss():
    p = policies.built_in()
    assert p.rotation_period == datetime.timedelta(days=90)
    assert p.destruction_window == datetime.timedelta(days=30)
    assert p.destroy_after_disabled is None


def test_a_minimum_interval_longer_than_the_period_is_refused():
    with pytest.raises(policies.PolicyError, match=r"minimumRotationInterval \(2d\) is longer than"):
        policy(rotationPeriod="1d", minimumRotationInterval="2d")


def test_should_not_rotate_before_the_period_and_should_at_it():
    p = policy(rotationPeriod="1d", minimumRotationInterval="1h")
    m = key()
    assert (
        decisions.rotation(
            now=T0 + datetime.timedelta(hours=23), manifest=m, policy=p, requested=None, handled=None
        )
        is None
    )
    due = decisions.rotation(
        now=T0 + datetime.timedelta(days=1), manifest=m, policy=p, requested=None, handled=None
    )
    assert isinstance(due, decisions.Rotate) and due.request_id == "scheduled:2026-12-02T00:00:00Z"


def test_should_wait_on_a_request_59_minutes_after_the_last_rotation():
    p = policy(rotationPeriod="1d", minimumRotationInterval="1h")
    wait = decisions.rotation(
        now=T0 + datetime.timedelta(minutes=59), manifest=key(), policy=p, requested="r1", handled=None
    )
    assert isinstance(wait, decisions.Wait) and wait.reason == "RotationRateLimited"
    assert wait.until == T0 + datetime.timedelta(hours=1)
    go = decisions.rotation(
        now=T0 + datetime.timedelta(minutes=60), manifest=key(), policy=p, requested="r1", handled=None
    )
    assert isinstance(go, decisions.Rotate) and go.request_id == "manual:r1" and go.handled_request == "r1"


def test_should_ignore_a_request_already_handled():
    p = policy(rotationPeriod="1d", minimumRotationInterval="1s")
    assert (
        decisions.rotation(
            now=T0 + datetime.timedelta(hours=2), manifest=key(), policy=p, requested="r1", handled="r1"
        )
        is None
    )


def plan(m, desired, now=T0, **spec):
    return decisions.version_plan(now=now, manifest=m, policy=policy(**spec), desired=desired)


def test_should_refuse_to_disable_or_destroy_the_primary():
    result = plan(key(2), {2: "Disabled"})
    assert not result.steps and result.violations[0].reason == "PrimaryProtected"


def test_should_refuse_to_destroy_an_enabled_version_and_say_disable_first():
    result = plan(key(2), {1: "Destroyed"})
    assert not result.steps and result.violations[0].reason == "DisableBeforeDestroy"


def test_should_schedule_then_destroy_at_the_windows_end():
    m = manifests.disable(key(2), 1, T0)
    assert [s.action for s in plan(m, {1: "Destroyed"}).steps] == ["schedule_destroy"]
    m = manifests.schedule_destroy(m, 1, T0, T0 + datetime.timedelta(days=30))
    early = plan(m, {1: "Destroyed"}, now=T0 + datetime.timedelta(days=29))
    assert early.steps == () and early.wake_at == T0 + datetime.timedelta(days=30)
    assert [s.action for s in plan(m, {1: "Destroyed"}, now=T0 + datetime.timedelta(days=30)).steps] == [
        "destroy"
    ]


def test_should_cancel_a_scheduled_destruction_when_asked_for_disabled_or_enabled():
    m = manifests.schedule_destroy(manifests.disable(key(2), 1, T0), 1, T0, T0 + datetime.timedelta(days=30))
    assert [s.action for s in plan(m, {1: "Disabled"}).steps] == ["cancel_destroy"]
    assert [s.action for s in plan(m, {1: "Enabled"}).steps] == ["cancel_destroy", "enable"]


def test_should_never_resurrect_a_destroyed_version():
    m = manifests.schedule_destroy(manifests.disable(key(2), 1, T0), 1, T0, T0)
    m = manifests.mark_destroyed(m, 1, T0)
    assert m.version(1).state is State.DESTROYED
    assert plan(m, {1: "Enabled"}).violations[0].reason == "VersionDestroyed"
    assert plan(m, {1: "Destroyed"}).violations == ()


def test_should_never_disable_a_superseded_version_on_its_own():
    assert plan(key(3), {}, now=T0 + datetime.timedelta(days=365)).steps == ()


def test_should_schedule_destruction_of_long_disabled_versions_only_when_the_policy_says_so():
    m = manifests.disable(key(2), 1, T0)
    later = T0 + datetime.timedelta(days=10)
    assert plan(m, {}, now=later).steps == ()
    auto = plan(m, {}, now=later, destroyAfterDisabled="7d")
    assert [s.action for s in auto.steps] == ["schedule_destroy"]


def test_should_report_versions_that_do_not_exist():
    assert plan(key(1), {7: "Disabled"}).violations[0].reason == "UnknownVersion"


def test_should_not_rotate_into_a_version_the_spec_asks_to_disable_or_destroy():
    p = policy(rotationPeriod="1d", minimumRotationInterval="1s")
    for state in ("Disabled", "Destroyed"):
        for requested, now in (
            ("r1", T0 + datetime.timedelta(hours=1)),
            (None, T0 + datetime.timedelta(days=2)),
        ):
            wait = decisions.rotation(
                now=now, manifest=key(), policy=p, requested=requested, handled=None, desired={2: state}
            )
            assert isinstance(wait, decisions.Wait) and wait.reason == "NextVersionBlocked", (
                state,
                requested,
            )
            assert f"version 2 to be {state}" in wait.message
    # An entry for an existing version does not block.
    go = decisions.rotation(
        now=T0 + datetime.timedelta(hours=1),
        manifest=key(2),
        policy=p,
        requested="r1",
        handled=None,
        desired={1: "Disabled"},
    )
    assert isinstance(go, decisions.Rotate)


def test_the_requester_is_credited_only_with_the_request_it_was_written_for():
    annotations = {decisions.REQUESTED_BY_ANNOTATION: "alice for 2026-12-03T10:00:00Z"}
    assert decisions.requester(annotations, "2026-12-03T10:00:00Z") == "alice"
    assert decisions.requester(annotations, "manual-2") is None  # a later kubectl annotate
    assert decisions.requester({decisions.REQUESTED_BY_ANNOTATION: "bob"}, "bob") is None
    assert decisions.requester({}, "x") is None


def test_a_condition_with_the_same_reason_and_message_is_unchanged():
    merged = conditions.merge(
        [], [("Ready", False, "RotationPolicyNotFound", "missing")], generation=1, now=T0
    )
    assert conditions.unchanged(merged, "Ready", "RotationPolicyNotFound", "missing")
    assert not conditions.unchanged(merged, "Ready", "RotationPolicyNotFound", "other")
    assert not conditions.unchanged(merged, "VersionsReconciled", "RotationPolicyNotFound", "missing")
