"""Retention rules (pure): context validation and which bundles are deleted first."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sledagent import BadRequest, BundleInfo, ZoneBundleCause, ZoneBundleId, ZoneBundleMetadata
from sledagent._retention import (
    DEFAULT_CONTEXT,
    apply_update,
    bytes_available,
    plan_cleanup,
    priority_key,
)
from sledagent._wire import CleanupContextUpdate, Duration, PriorityDimension

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CAUSE, TIME = PriorityDimension.CAUSE, PriorityDimension.TIME


def bundle(cause: ZoneBundleCause, age_h: int, size: int = 100) -> BundleInfo:
    meta = ZoneBundleMetadata(
        cause=cause,
        id=ZoneBundleId(bundle_id=uuid.uuid4(), zone_name="oxz_propolis-server_x"),
        time_created=T0 - dt.timedelta(hours=age_h),
        version=0,
    )
    return BundleInfo(meta, size)


def test_defaults_are_omicrons() -> None:
    assert DEFAULT_CONTEXT.period == Duration(secs=600, nanos=0)
    assert DEFAULT_CONTEXT.storage_limit == 25
    assert DEFAULT_CONTEXT.priority == [CAUSE, TIME]


@pytest.mark.parametrize(
    ("update", "field"),
    [
        (CleanupContextUpdate(period=Duration(secs=59, nanos=0)), "period"),
        (CleanupContextUpdate(period=Duration(secs=86_401, nanos=0)), "period"),
        (CleanupContextUpdate(storage_limit=0), "storage_limit"),
        (CleanupContextUpdate(storage_limit=51), "storage_limit"),
        (CleanupContextUpdate(priority=[CAUSE, CAUSE]), "priority"),
        (CleanupContextUpdate(priority=[TIME]), "priority"),
    ],
)
def test_an_invalid_update_is_refused_naming_the_field(
    update: CleanupContextUpdate, field: str
) -> None:
    with pytest.raises(BadRequest, match=f"`{field}`"):
        apply_update(DEFAULT_CONTEXT, update)


def test_an_update_changes_only_the_fields_it_names() -> None:
    new = apply_update(DEFAULT_CONTEXT, CleanupContextUpdate(storage_limit=10))
    assert new.storage_limit == 10
    assert new.period == DEFAULT_CONTEXT.period and new.priority == DEFAULT_CONTEXT.priority


def test_cause_then_time_deletes_other_causes_first_oldest_first() -> None:
    old_term = bundle(ZoneBundleCause.TERMINATED_INSTANCE, age_h=10)
    new_other = bundle(ZoneBundleCause.OTHER, age_h=1)
    old_other = bundle(ZoneBundleCause.OTHER, age_h=5)
    unexpected = bundle(ZoneBundleCause.UNEXPECTED_ZONE, age_h=3)
    order = sorted(
        [old_term, new_other, old_other, unexpected], key=lambda b: priority_key(b, [CAUSE, TIME])
    )
    assert order == [old_other, new_other, unexpected, old_term]
    by_time = sorted(
        [old_term, new_other, old_other, unexpected], key=lambda b: priority_key(b, [TIME, CAUSE])
    )
    assert by_time == [old_term, old_other, unexpected, new_other]


def test_cleanup_deletes_lowest_priority_until_usage_fits() -> None:
    keep = bundle(ZoneBundleCause.TERMINATED_INSTANCE, age_h=1, size=300)
    goes = [bundle(ZoneBundleCause.OTHER, age_h=h, size=300) for h in (1, 2)]
    plan = plan_cleanup([keep, *goes], bytes_available=350, priority=[CAUSE, TIME])
    assert set(plan.delete) == set(goes) and plan.bytes_freed == 600


@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(ZoneBundleCause)), st.integers(0, 1000), st.integers(1, 10**6)
        ),
        max_size=30,
    ),
    st.integers(0, 10**7),
    st.permutations([CAUSE, TIME]),
)
def test_cleanup_deletes_a_priority_prefix_and_leaves_usage_within_the_limit(
    specs: list[tuple[ZoneBundleCause, int, int]], available: int, priority: list[PriorityDimension]
) -> None:
    bundles = [bundle(c, age, size) for c, age, size in specs]
    plan = plan_cleanup(bundles, bytes_available=available, priority=priority)
    ordered = sorted(bundles, key=lambda b: priority_key(b, priority))
    assert list(plan.delete) == ordered[: len(plan.delete)]
    left = sum(b.size for b in bundles) - plan.bytes_freed
    assert left <= available or len(plan.delete) == len(bundles)
    if plan.delete:  # nothing more was deleted than needed
        assert left + plan.delete[-1].size > available


def test_bytes_available_is_quota_times_limit() -> None:
    assert bytes_available(1000, 25) == 250
