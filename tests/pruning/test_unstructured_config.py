"""UnstructuredConfig: validation names the field, JSON round trip."""

from __future__ import annotations

import pytest

from deepshrink.errors import ConfigError
from deepshrink.pruning import UnstructuredConfig


def test_json_round_trip() -> None:
    cfg = UnstructuredConfig(ratio=0.9, scope="global", overrides={"2": 0.5, r"fc\d+": 0.7},
                             layer_types=("Linear",), ignore=("head",), skip_last=True)
    back = UnstructuredConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.layer_types, tuple)
    q = UnstructuredConfig(method="quality", quality=1.2)
    assert UnstructuredConfig.from_dict(q.to_dict()) == q


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_bad_ratio_names_field(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"UnstructuredConfig\.ratio: must be in \[0, 1\)"):
        UnstructuredConfig(ratio=ratio)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"method": "random"}, "method"),
    ({"scope": "model"}, "scope"),
    ({"method": "threshold"}, "threshold"),
    ({"method": "threshold", "threshold": -1.0}, "threshold"),
    ({"method": "quality"}, "quality"),
    ({"layer_types": ("Linear", "LSTM")}, "layer_types"),
    ({"overrides": {"2": 1.0}}, "overrides['2']"),
    ({"overrides": {"fc[": 0.5}}, "overrides"),
])
def test_bad_fields_name_themselves(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        UnstructuredConfig(**kwargs)
    assert f"UnstructuredConfig.{field}" in str(info.value)


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        UnstructuredConfig.from_dict({"ratio": 0.5, "sparsity": 0.5})


def test_scaled_reaches_target_geometrically() -> None:
    cfg = UnstructuredConfig(ratio=0.96, overrides={"a": 0.75})
    half = cfg.scaled(0.5)
    assert half.ratio == pytest.approx(0.8)  # kept 0.04 -> sqrt = 0.2
    assert half.overrides["a"] == pytest.approx(0.5)
    assert cfg.scaled(1.0).ratio == pytest.approx(0.96)


def test_scaled_cubic_spacing() -> None:
    cfg = UnstructuredConfig(ratio=0.9)
    assert cfg.scaled(0.5, "cubic").ratio == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert cfg.scaled(1.0, "cubic").ratio == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="spacing"):
        cfg.scaled(0.5, "linear")
