"""Progress: periodic status lines when stderr is not a terminal, nothing when silenced."""

from __future__ import annotations

import time

import pytest

from deepshrink import progress


def test_track_prints_periodic_lines_off_terminal(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSHRINK_NO_PROGRESS", raising=False)
    items = []
    for i in progress.track(range(4), "calibrating", every_s=0.01):
        time.sleep(0.02)
        items.append(i)
    assert items == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "calibrating: 1/4 (25%)" in err and "calibrating: 4/4 (100%)" in err and "done" in err


def test_track_is_silent_when_disabled(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSHRINK_NO_PROGRESS", "1")
    assert list(progress.track(range(3), "x", every_s=0.0)) == [0, 1, 2]
    assert list(progress.track(range(3), "y", enabled=False, every_s=0.0)) == [0, 1, 2]
    with progress.step("z", every_s=0.0):
        pass
    assert capsys.readouterr().err == ""


def test_step_reports_its_duration(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSHRINK_NO_PROGRESS", raising=False)
    with progress.step("k-means", every_s=0.0):
        time.sleep(0.01)
    assert "k-means: 0 s" in capsys.readouterr().err
