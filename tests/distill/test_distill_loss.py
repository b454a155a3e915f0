"""KD loss against hand computation; alpha limits; ensemble averaging; config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepshrink.distill import KDConfig, kd_loss, teacher_log_probs
from deepshrink.errors import ConfigError

S = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
T_LOGITS = torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.5, 2.0]])
Y = torch.tensor([0, 2])


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _hand_loss(temp: float, alpha: float) -> float:
    """Pure-Python reference: alpha * T² * mean KL(p||q) + (1 - alpha) * mean CE."""
    kl, ce = 0.0, 0.0
    for s, t, y in zip(S.tolist(), T_LOGITS.tolist(), Y.tolist(), strict=True):
        p, q = _softmax(t, temp), _softmax(s, temp)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        ce += -math.log(_softmax(s, 1.0)[y])
    n = len(Y)
    return alpha * temp**2 * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize(("temp", "alpha"), [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3)])
def test_loss_equals_hand_computed_value(temp: float, alpha: float) -> None:
    got = kd_loss(S, T_LOGITS, Y, temperature=temp, alpha=alpha)["loss"]
    # float32 vs float64 reference: at T=20 the KL is ~1e-4 and is multiplied by T²=400, so
    # float32 rounding in log p - log q shows up at ~1e-5 relative; 1e-4 still catches any slip.
    assert float(got) == pytest.approx(_hand_loss(temp, alpha), rel=1e-4, abs=1e-7)


def test_value_worked_on_paper() -> None:
    # T=2, alpha=0.5 worked with a pocket calculator (4 digits): sum KL = 0.00681 + 0.0423,
    # sum CE = 0.2413 + 0.1699; loss = 0.5 * 4 * 0.0491 / 2 + 0.5 * 0.4112 / 2 = 0.1519 (+- rounding).
    # Guards against a slip shared by the code and the Python reference (a sign, T vs T²).
    assert _hand_loss(2.0, 0.5) == pytest.approx(0.1516, abs=5e-4)
    got = kd_loss(S, T_LOGITS, Y, temperature=2.0, alpha=0.5)["loss"]
    assert float(got) == pytest.approx(0.1516, abs=5e-4)


def test_alpha_limits_reduce_to_pure_terms() -> None:
    soft = kd_loss(S, T_LOGITS, Y, temperature=3.0, alpha=1.0)
    hard = kd_loss(S, T_LOGITS, Y, temperature=3.0, alpha=0.0)
    assert torch.equal(hard["loss"], F.cross_entropy(S, Y))
    expected_soft = 9.0 * F.kl_div(F.log_softmax(S / 3, -1), F.log_softmax(T_LOGITS / 3, -1),
                                   reduction="batchmean", log_target=True)
    torch.testing.assert_close(soft["loss"], expected_soft)
    assert "hard" not in soft and "soft" not in hard
    # alpha = 1 needs no labels at all
    assert torch.equal(kd_loss(S, T_LOGITS, None, temperature=3.0, alpha=1.0)["loss"], soft["loss"])


def test_stable_at_extreme_logits() -> None:
    big_s = torch.tensor([[1e4, -1e4, 0.0]])
    big_t = torch.tensor([[-1e4, 1e4, 0.0]])
    out = kd_loss(big_s, big_t, torch.tensor([0]), temperature=1.0, alpha=0.5)["loss"]
    assert torch.isfinite(out)
    # teacher says class 1 with prob ~1; student log q_1 = -2e4: KL ~ 2e4
    assert float(out) == pytest.approx(0.5 * 2e4, rel=1e-3)


def test_ensemble_average_of_logits_and_probs_by_hand() -> None:
    z = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])  # (N=1, K=3, C=3)
    w = (0.5, 0.25, 0.25)
    temp = 2.0
    mean_logits = [sum(wk * z[0, k, c].item() for k, wk in enumerate(w)) for c in range(3)]
    want_l = [math.log(p) for p in _softmax(mean_logits, temp)]
    got_l = teacher_log_probs(z, temp, "logits", w)[0].tolist()
    assert got_l == pytest.approx(want_l, abs=1e-6)
    probs = [_softmax(z[0, k].tolist(), temp) for k in range(3)]
    want_p = [math.log(sum(wk * probs[k][c] for k, wk in enumerate(w))) for c in range(3)]
    got_p = teacher_log_probs(z, temp, "probs", [2.0, 1.0, 1.0])[0].tolist()  # weights normalised
    assert got_p == pytest.approx(want_p, abs=1e-6)
    assert got_p != pytest.approx(got_l, abs=1e-3)  # the two modes really differ
    # a zero weight drops that teacher (probability mode must not produce nan)
    only_first = teacher_log_probs(z, temp, "probs", [1.0, 0.0, 0.0])
    torch.testing.assert_close(only_first, F.log_softmax(z[:, 0] / temp, -1))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"), ({"combine": "median"}, "combine"),
    ({"weights": (1.0, -1.0)}, "weights"), ({"hint_weight": -1.0}, "hint_weight"),
])
def test_bad_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"KDConfig\.{field}"):
        KDConfig(**kwargs)


def test_config_json_round_trip() -> None:
    cfg = KDConfig(temperature=8.0, alpha=0.7, combine="probs", weights=(2.0, 1.0), cache=False,
                   hints={"2": "3"}, hint_weight=0.5)
    back = KDConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.weights, tuple)
    assert KDConfig.from_dict(KDConfig().to_dict()) == KDConfig()
    listed = KDConfig(weights=[1.0, 2.0])  # type: ignore[arg-type]  # as YAML would give it
    assert listed.weights == (1.0, 2.0) and KDConfig.from_json(listed.to_json()) == listed
