"""The compress pipeline, the CLI commands and the demo stage, on the embedded digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deepshrink
from deepshrink.cli import app
from deepshrink.data import load_digits
from deepshrink.dsz import PackConfig
from deepshrink.models import create_model
from deepshrink.pruning import UnstructuredConfig
from deepshrink.sharing import CompressConfig, KMeansConfig, compress, get_sharing
from deepshrink.train import TrainConfig, train

QUICK = TrainConfig(epochs=1, batch_size=64, lr=5e-4, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    m = create_model("lenet300", in_size=8)
    train(m, load_digits(), TrainConfig(epochs=8, batch_size=64, lr=2e-3, progress=False))
    path = tmp_path_factory.mktemp("m") / "base.safetensors"
    deepshrink.save(m, path)
    return m, path


def test_config_round_trip() -> None:
    cfg = CompressConfig(prune=UnstructuredConfig(ratio=0.8), finetune=None,
                         sharing=KMeansConfig(bits=3), pack=PackConfig(codebook_dtype="float16"))
    assert CompressConfig.from_json(cfg.to_json()) == cfg


def test_compress_stage_table(trained: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CompressConfig(prune=UnstructuredConfig(ratio=0.8), prune_rounds=1, prune_train=QUICK,
                         prune_final=QUICK, sharing=KMeansConfig(bits=4), finetune=QUICK, distill_alpha=0.5)
    res = compress(model, load_digits(), cfg, tmp_path / "out.dsz", stage_dir=tmp_path / "stages")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    rows = res.table.rows
    assert [r["stage"].split(" ")[0] for r in rows] == ["baseline", "pruned", "+", "+", "+"]
    sizes = [r["bytes"] for r in rows]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[4]  # each stage saves bytes
    # Centroid fine-tuning moves codebook values, not assignments: the stored size may differ by
    # the compression of a few changed codebook bytes only.
    assert abs(sizes[3] - sizes[2]) <= 0.01 * sizes[2]
    assert sizes[4] == (tmp_path / "out.dsz").stat().st_size
    assert rows[4]["ratio"] > 15 and rows[4]["top1"] > 0.8
    assert len(list((tmp_path / "stages").glob("*.dsz"))) == 3
    x = load_digits().test.tensors[0][:16]
    reloaded = deepshrink.load(tmp_path / "out.dsz")
    with torch.no_grad():
        assert torch.equal(reloaded(x), res.model(x))
    assert get_sharing(reloaded)


def test_cli_pack_info_unpack(trained: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, base = trained
    runner = CliRunner()
    r = runner.invoke(app, ["pack", str(base), "-o", str(tmp_path / "m.dsz"), "--bits", "4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["bytes"] == (tmp_path / "m.dsz").stat().st_size and res["ratio"] > 5
    r = runner.invoke(app, ["dsz-info", str(tmp_path / "m.dsz"), "--json"])
    info = json.loads(r.output)
    assert info["spec"]["name"] == "lenet300" and len(info["sections"]) >= 8
    r = runner.invoke(app, ["dsz-info", str(tmp_path / "m.dsz")])
    assert r.exit_code == 0 and "sections" in r.output and "huffman" in r.output
    r = runner.invoke(app, ["info", str(tmp_path / "m.dsz"), "--input-shape", "1,8,8"])
    assert r.exit_code == 0 and "sections" in r.output
    r = runner.invoke(app, ["unpack", str(tmp_path / "m.dsz"), "-o", str(tmp_path / "u.safetensors")])
    assert r.exit_code == 0, r.output
    a, b = deepshrink.load(tmp_path / "m.dsz"), deepshrink.load(tmp_path / "u.safetensors")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    (tmp_path / "bad.dsz").write_bytes((tmp_path / "m.dsz").read_bytes()[:-9])
    r = runner.invoke(app, ["dsz-info", str(tmp_path / "bad.dsz")])
    assert r.exit_code == 2 and "truncated" in r.output


def test_cli_compress_json(trained: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, base = trained
    cfg = CompressConfig(prune_rounds=1, prune_train=QUICK, finetune=QUICK)
    (tmp_path / "c.json").write_text(cfg.to_json())
    r = CliRunner().invoke(app, ["compress", str(base), "-o", str(tmp_path / "c.dsz"), "--config",
                                 str(tmp_path / "c.json"), "--sparsity", "0.7", "--bits", "3",
                                 "--max-drop", "5", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["config"]["prune"]["ratio"] == 0.7 and res["config"]["sharing"]["bits"] == 3
    assert res["stages"][-1]["bytes"] == (tmp_path / "c.dsz").stat().st_size
    r = CliRunner().invoke(app, ["compress", str(base), "-o", str(tmp_path / "d.dsz"), "--sparsity", "1.5"])
    assert r.exit_code == 2 and "sparsity" in r.output


def test_self_distill_replaces_the_loss() -> None:
    from deepshrink.distill import kd_loss
    from deepshrink.sharing.pipeline import SelfDistill

    torch.manual_seed(0)
    teacher, student = create_model("mlp", in_size=8), create_model("mlp", in_size=8)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    cb = SelfDistill(teacher, alpha=0.6, temperature=3.0)
    state = type("S", (), {"batch": (x, y), "outputs": student(x)})()
    got = cb.on_loss(state, torch.tensor(123.0))  # type: ignore[arg-type]
    want = kd_loss(student(x), teacher(x), y, temperature=3.0, alpha=0.6)["loss"]
    torch.testing.assert_close(got, want)


def test_cli_options_revalidate_the_config() -> None:
    """Command-line options go through Config.override, so a bad value fails validation there."""
    import pytest

    from deepshrink.cli.compress import compress_config
    from deepshrink.errors import ConfigError

    cfg = compress_config(CompressConfig(), sparsity=0.5, bits=3, conv_bits=None, epochs=2)
    assert cfg.prune.ratio == 0.5 and cfg.sharing.bits == 3 and cfg.prune_train.epochs == 2
    off = compress_config(CompressConfig(), sparsity=0.0, bits=None, conv_bits=None, epochs=None)
    assert off.prune is None
    with pytest.raises(ConfigError, match="bits"):
        compress_config(CompressConfig(), sparsity=None, bits=99, conv_bits=None, epochs=None)
    with pytest.raises(ConfigError, match="epochs"):
        compress_config(CompressConfig(), sparsity=None, bits=None, conv_bits=None, epochs=-1)
