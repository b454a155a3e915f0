import dataclasses

import pytest

from deepshrink.config import Config, check
from deepshrink.errors import ConfigError
from deepshrink.train import TrainConfig


@dataclasses.dataclass
class _Inner(Config):
    bits: int = 8

    def validate(self) -> None:
        check(1 <= self.bits <= 8, "_Inner", "bits", f"must be in 1..8, got {self.bits}")


@dataclasses.dataclass
class _Outer(Config):
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    sizes: tuple[int, ...] = (1, 2)
    per_layer: dict[str, _Inner] = dataclasses.field(default_factory=dict)
    name: str | None = None


def test_round_trip_nested():
    c = _Outer(inner=_Inner(4), sizes=(3, 4), per_layer={"fc1": _Inner(2)}, name="x")
    back = _Outer.from_json(c.to_json())
    assert back == c
    assert isinstance(back.per_layer["fc1"], _Inner) and back.sizes == (3, 4)


def test_unknown_key_and_bad_value_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['bitz'\]"):
        _Inner.from_dict({"bitz": 3})
    with pytest.raises(ConfigError, match=r"_Inner.bits: must be in 1..8, got 9"):
        _Inner(9)
    with pytest.raises(ConfigError, match="_Outer"):
        _Outer.from_dict({"type": "_Inner"})


def test_train_config_validation_and_files(tmp_path):
    with pytest.raises(ConfigError, match="TrainConfig.optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="TrainConfig.lr"):
        TrainConfig(lr=0)
    (tmp_path / "c.yaml").write_text("epochs: 3\nlr: 0.01\n")
    assert TrainConfig.from_file(tmp_path / "c.yaml") == TrainConfig(epochs=3, lr=0.01)
    c = TrainConfig(epochs=2, grad_clip=1.0)
    assert TrainConfig.from_json(c.to_json()) == c


def test_override_ignores_none_and_validates():
    c = TrainConfig(epochs=3)
    assert c.override(epochs=None, lr=0.5) == TrainConfig(epochs=3, lr=0.5)
    with pytest.raises(ConfigError, match="TrainConfig.lr"):
        c.override(lr=-1.0)


def test_layer_selection_vocabulary() -> None:
    """``ignore`` / ``overrides`` patterns: regex full match on module names, first match wins."""
    import pytest

    from deepshrink.config import check_patterns, name_matches, override_for, unmatched_patterns
    from deepshrink.errors import ConfigError

    assert name_matches("encoder.layer.3.attention", [r"encoder\.layer\.\d+\.attention"])
    assert not name_matches("encoder.layer.3.attention.out", [r"encoder\.layer\.\d+\.attention"])
    assert name_matches("fc", ["fc"]) and not name_matches("fc2", ["fc"])
    assert override_for("features.3", {r"features\..*": 8, ".*": 4}, 2) == 8
    assert override_for("head", {r"features\..*": 8}, 2) == 2
    assert unmatched_patterns(["a.b", "c"], ["a\\..*", "zzz"]) == ["zzz"]
    with pytest.raises(ConfigError, match=r"X.ignore: '\(' is not a valid regular expression"):
        check_patterns("X", "ignore", ["("])
