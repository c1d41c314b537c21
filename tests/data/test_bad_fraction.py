"""The bad-image budget (``data.max_bad_fraction``) on plain rows: no Ray, no storage."""

from __future__ import annotations

import pytest

from mmrad.config import DataLoadConfig
from mmrad.data.loading import (
    BadImageBudget,
    BadImageError,
    DecodeSpec,
    SkipLog,
    TooManyBadImages,
)
from mmrad.storage import Storage

MANIFEST = "s3://bucket/set/manifest.parquet"


def rows(good: int, bad: int) -> list[dict]:
    """``good`` readable rows, then ``bad`` rows whose image is missing."""
    return [{"id": f"ok{i}", "error": ""} for i in range(good)] + [
        {"id": f"bad{i}", "error": f"s3://bucket/bad{i}.png: no such object"} for i in range(bad)
    ]


def budget(total: int, max_fraction: float = 0.02) -> BadImageBudget:
    return BadImageBudget(max_fraction, total, MANIFEST, "train records")


def test_the_default_is_one_percent_and_the_key_is_validated():
    assert DataLoadConfig().max_bad_fraction == 0.01
    for wrong in (-0.1, 1.5):
        with pytest.raises(ValueError, match="max_bad_fraction"):
            DataLoadConfig(max_bad_fraction=wrong)


def test_the_allowance_is_the_floor_of_the_share_of_the_whole_set():
    assert budget(100).allowed == 2
    assert budget(149).allowed == 2
    assert budget(50, 0.01).allowed == 0  # small sets at the default tolerate none
    assert budget(100, 0.29).allowed == 29  # not 28 from 0.29 * 100 in floating point


def test_up_to_the_limit_bad_rows_are_skipped_and_the_rest_kept():
    skips = SkipLog(budget(100))
    kept = [row["id"] for row in skips.usable_rows(rows(98, 2))]
    assert len(kept) == 98 and list(skips.skipped) == ["bad0", "bad1"]
    assert "no such object" in skips.skipped["bad1"]


def test_one_over_the_limit_raises_with_counts_key_manifest_and_first_ids():
    skips = SkipLog(budget(100))
    with pytest.raises(TooManyBadImages) as err:
        list(skips.usable_rows(rows(97, 3)))
    message = str(err.value)
    assert "3 of 100 train records of s3://bucket/set/manifest.parquet" in message
    assert "(3.0%)" in message
    assert "data.max_bad_fraction=0.02 allows 2" in message
    assert "'bad0': s3://bucket/bad0.png: no such object" in message
    assert isinstance(err.value, BadImageError)


def test_the_first_bad_row_is_judged_against_the_whole_set_not_the_rows_seen():
    skips = SkipLog(budget(1000, 0.01))
    assert list(skips.usable_rows(rows(0, 10))) == []  # 10 of 1000: within 1%
    with pytest.raises(TooManyBadImages, match="11 of 1000"):
        skips.add({"late": "undecodable"})


def test_an_id_met_again_in_a_later_epoch_is_counted_once():
    skips = SkipLog(budget(100))
    for _epoch in range(5):
        list(skips.usable_rows(rows(98, 2)))
    assert len(skips.skipped) == 2


def test_other_ranks_skips_count_toward_the_same_budget():
    skips = SkipLog(budget(100))
    skips.add({"r0-a": "missing", "r1-a": "denied"})
    with pytest.raises(TooManyBadImages, match="3 of 100"):
        skips.add({"r1-b": "undecodable"})


def test_a_set_with_no_usable_row_fails_even_when_every_row_may_be_bad():
    skips = SkipLog(budget(3, max_fraction=1.0))
    with pytest.raises(TooManyBadImages, match="allows 3 and none is left to use"):
        list(skips.usable_rows(rows(0, 3)))


def test_without_a_budget_the_log_only_counts():
    skips = SkipLog()
    assert list(skips.usable_rows(rows(0, 5))) == []
    assert len(skips.skipped) == 5


def test_the_message_lists_at_most_five_ids():
    with pytest.raises(TooManyBadImages) as err:
        SkipLog(budget(10, 0.0)).add({f"id{i}": "missing" for i in range(8)})
    assert "'id4'" in str(err.value) and "'id5'" not in str(err.value)


def test_decode_spec_carries_the_budget_from_the_config():
    config = DataLoadConfig(manifest=MANIFEST, max_bad_fraction=0.05)
    spec_budget = DecodeSpec.from_config(Storage(), config).bad_image_budget(40)
    assert spec_budget == BadImageBudget(0.05, 40, MANIFEST, "records")
    assert spec_budget.allowed == 2
