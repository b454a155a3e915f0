"""The data record a model file keeps: round trip, hostile values, mismatch errors."""

import pytest

from deepshrink.data import DataRecord, data_record, load_digits
from deepshrink.errors import DataError, FormatError


def test_round_trip_and_check() -> None:
    digits = load_digits()
    rec = data_record(digits)
    assert rec.input_shape == (1, 8, 8) and rec.num_classes == 10 and rec.dataset == "digits"
    assert DataRecord.from_dict(rec.to_dict()) == rec
    rec.check(digits)  # no error
    other = DataRecord("fashion-mnist", (1, 28, 28), 10)
    with pytest.raises(DataError, match=r"shape \(1, 8, 8\).*fashion-mnist.*\(1, 28, 28\)"):
        other.check(digits)


@pytest.mark.parametrize("bad", [
    None, [], {"input_shape": "x", "num_classes": 10, "dataset": "d"},
    {"input_shape": [-1, 8], "num_classes": 10, "dataset": "d"},
    {"input_shape": [1, 8, 8], "num_classes": 10**9, "dataset": "d"},
    {"input_shape": [1, 8, 8], "num_classes": 10},
    {"input_shape": [1, 8, 8], "num_classes": 10, "dataset": "d", "preprocessing": "os:system"},
])
def test_hostile_records_are_format_errors(bad: object) -> None:
    with pytest.raises(FormatError):
        DataRecord.from_dict(bad)
