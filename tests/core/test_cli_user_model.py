"""Issue 17: a user's own model (defined in a temporary file) through every command of the CLI,
and each finding of the issue as a test.

The commands run in-process (typer's CliRunner) on the embedded digits data; one short
training makes the model that the rest compress, so the whole file takes well under a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deepshrink
from deepshrink.cli import app
from deepshrink.cli.guards import ratio_text
from deepshrink.data import data_record, load_digits

runner = CliRunner()

USER_CODE = '''
import torch.nn as nn

def build(num_classes, width=8):
    """A user's CNN for 8x8 digits: takes num_classes (offered by the CLI), not in_size."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 64, 32), nn.ReLU(), nn.Linear(32, num_classes))
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory):
    """A folder holding ``usernet.py`` and a model trained from it (module-wide: trained once)."""
    d = tmp_path_factory.mktemp("user")
    (d / "usernet.py").write_text(USER_CODE)
    mp = pytest.MonkeyPatch()
    mp.chdir(d)
    mp.setattr(sys, "path", [p for p in sys.path if p not in ("", str(d))])  # as a console script
    r = runner.invoke(app, ["train", "-m", "usernet:build", "-o", "my.safetensors", "--epochs", "5",
                            "--lr", "0.005", "--model-arg", "width=8"])
    assert r.exit_code == 0, r.output
    yield d
    mp.undo()
    sys.modules.pop("usernet", None)


def run(*args: str, code: int = 0) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    return r.output


def test_train_imports_from_the_current_folder_with_only_the_args_the_factory_takes(user: Path) -> None:
    # before: "No module named 'usernet'", then "rejected arguments {'in_size': 28, ...}"
    meta = deepshrink.checkpoint.read_metadata(user / "my.safetensors")
    assert meta["spec"] == {"name": "usernet:build", "kwargs": {"num_classes": 10, "width": 8},
                            "edits": []}
    assert meta["extra"]["data"] == {"dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10,
                                     "preprocessing": "scale-0-1"}
    assert meta["extra"]["test"]["top1"] > 0.6


def test_loading_user_code_needs_import_and_says_so(user: Path) -> None:
    out = run("info", "my.safetensors", code=2)
    assert "--import usernet" in out  # the hint names the option that follows it
    out = run("evaluate", "my.safetensors", "--import", "nosuchmodule", code=2)
    assert "error: --import nosuchmodule: no module named 'nosuchmodule'" in out and "hint:" in out
    out = run("evaluate", "my.safetensors", "--import", "missing/dir/x.py", code=2)
    assert "no such file" in out


def test_user_model_through_every_command(user: Path) -> None:
    imp = ("--import", "usernet")
    assert "test top-1" in run("evaluate", "my.safetensors", *imp)  # no -d: the file's digits
    assert "MACs" in run("info", "my.safetensors", "--import", str(user / "usernet.py"), "--latency")
    run("prune", "my.safetensors", "-o", "p.safetensors", "--ratio", "0.5", "--epochs", "1", *imp)
    run("prune", "my.safetensors", "-o", "pc.safetensors", "--method", "channel", "--ratio", "0.25",
        "--epochs", "1", "--max-drop", "3", *imp)
    run("quantize", "my.safetensors", "-o", "q.onnx", *imp)
    run("quantize", "my.safetensors", "-o", "q4.safetensors", "--qat", "--epochs", "1", "--bits", "4",
        "--max-drop", "5", *imp)
    run("compress", "my.safetensors", "-o", "c.dsz", "--sparsity", "0.5", "--bits", "6", "--epochs", "1",
        "--max-drop", "5", *imp)
    run("pack", "my.safetensors", "-o", "k.dsz", "--bits", "6", "--max-drop", "5", *imp)
    run("unpack", "c.dsz", "-o", "u.safetensors", *imp)
    assert "sections" in run("dsz-info", "c.dsz", *imp)
    run("distill", "-t", "my.safetensors", "-s", "usernet:build", "--student-arg", "width=4",
        "-o", "s.safetensors", "--epochs", "3", "--lr", "0.005", *imp)
    run("factorize", "my.safetensors", "-o", "f.safetensors", "--budget", "0.7", "--force", *imp)
    run("separable", "my.safetensors", "-o", "sep.safetensors", "--force", *imp)
    run("early-exit", "my.safetensors", "-o", "ee.safetensors", "--epochs", "1", *imp)
    run("run", "int8-ort", "--model", "my.safetensors", "--out", "rec", *imp)
    run("report", "rec/results.json", *imp)
    out = run("shrink", "my.safetensors", "-o", "srch", "--max-drop", "50", "--candidates", "2",
              "--rungs", "1", "--epochs-scale", "0.2", "--json", *imp)
    res = json.loads(out[out.index("{\n"):])  # after the trials' progress lines (stderr)
    assert res["selected"] and (user / "srch" / "report.html").exists()
    run("export", "my.safetensors", "-o", "e.onnx", *imp)
    assert "no save_pretrained form" in run("export", "my.safetensors", "-o", "hf-folder", *imp, code=2)
    for f in ("p.safetensors", "pc.safetensors", "q.onnx", "q4.safetensors", "c.dsz", "k.dsz",
              "u.safetensors", "e.onnx", "s.safetensors", "f.safetensors", "sep.safetensors",
              "ee.safetensors"):
        res = json.loads(run("evaluate", f, "--json", *imp))  # every output, no -d
        assert res["top1"] > 0.3, (f, res)
        run("info", f, *imp)


def test_a_bare_state_dict_goes_into_the_arch_model(user: Path) -> None:
    """A ``torch.save(model.state_dict())`` file: weights only, architecture named by --arch."""
    model = deepshrink.load(user / "my.safetensors", trust=["usernet"])
    torch.save(model.state_dict(), user / "sd.pt")
    out = run("evaluate", "sd.pt", "-d", "digits", code=2)
    assert "state_dict file" in out and "--arch" in out  # the hint names the option
    arch = ("--arch", "usernet:build", "--arch-arg", "num_classes=10", "--arch-arg", "width=8")
    res = json.loads(run("evaluate", "sd.pt", "-d", "digits", "--json", *arch, "--import", "usernet"))
    ref = json.loads(run("evaluate", "my.safetensors", "--json", "--import", "usernet"))
    assert res["top1"] == pytest.approx(ref["top1"])  # the same weights, the same accuracy
    run("quantize", "sd.pt", "-d", "digits", "-o", "sdq.onnx", *arch, "--import", "usernet")
    assert json.loads(run("evaluate", "sdq.onnx", "--json"))["top1"] > 0.3
    out = run("evaluate", "sd.pt", "-d", "digits", "--arch", "usernet:build", "--arch-arg", "num_classes=10",
              "--arch-arg", "width=4", "--import", "usernet", code=2)
    assert "weights do not match the model" in out  # a wrong architecture is one line, not a traceback


def test_every_command_takes_import_threads_and_compressing_ones_max_drop() -> None:
    compressing = {"prune", "quantize", "compress", "pack", "factorize", "separable"}
    for cmd in app.registered_commands:
        text = runner.invoke(app, [cmd.name, "--help"], terminal_width=200).output
        assert "--import" in text and "--threads" in text and "--arch" in text, cmd.name
        if cmd.name in compressing:
            assert "--max-drop" in text and "--force" in text, cmd.name


def _digits_lenet300(path: Path) -> Path:
    model = deepshrink.create_model("lenet300", in_size=8)
    return deepshrink.save(model, path, extra={"data": data_record(load_digits()).to_dict()})


def test_info_and_channel_prune_of_a_digits_model_use_its_recorded_shape(tmp_path: Path) -> None:
    # before: info -> "mat1 and mat2 shapes cannot be multiplied (1x784 and 64x300)"
    base = _digits_lenet300(tmp_path / "baseline.safetensors")
    assert "baseline.safetensors" in run("info", base)
    run("prune", base, "-o", tmp_path / "ch.safetensors", "--method", "channel", "--force")
    assert deepshrink.load(tmp_path / "ch.safetensors")[2].out_features == 150


def test_a_dataset_of_another_shape_names_both_shapes(tmp_path: Path) -> None:
    base = _digits_lenet300(tmp_path / "b.safetensors")
    idx = tmp_path / "idx28"
    idx.mkdir()
    import numpy as np

    from deepshrink.data import write_idx

    for split, n in (("train", 5020), ("t10k", 20)):  # the loader keeps 5,000 for validation
        write_idx(idx / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(idx / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    out = run("evaluate", base, "-d", str(idx), code=2)
    assert "(1, 28, 28)" in out and "(1, 8, 8)" in out
    # a model trained on an IDX folder finds it again without -d (the record keeps the path)
    run("train", "-m", "lenet300", "-d", str(idx), "-o", tmp_path / "i.safetensors", "--epochs", "1")
    assert "test top-1" in run("evaluate", tmp_path / "i.safetensors")


def test_onnx_files_evaluate_and_info(tmp_path: Path) -> None:
    base = _digits_lenet300(tmp_path / "b.safetensors")
    run("quantize", base, "-o", tmp_path / "q.onnx", "--force")
    assert "test top-1" in run("evaluate", tmp_path / "q.onnx")
    info = json.loads(run("info", tmp_path / "q.onnx", "--json"))
    assert info["params"] > 50_000  # lenet300 on 8x8: 50,610 weights, counted from the graph


def test_compress_refuses_a_result_past_max_drop_and_says_what_it_measured(user: Path) -> None:
    # before: 87.30 % -> 47.67 % written without a word
    out = run("compress", "my.safetensors", "-o", "bad.dsz", "--epochs", "1", "--import", "usernet",
              code=2)
    assert "test top-1 fell" in out and "--max-drop 1" in out and "not written" in out
    assert not (user / "bad.dsz").exists() and not list(user.glob(".bad*"))
    out = run("compress", "my.safetensors", "-o", "bad.dsz", "--epochs", "1", "--import", "usernet",
              "--force")
    assert "written anyway (--force)" in out and (user / "bad.dsz").exists()


def test_warnings_for_wider_storage_and_patterns_matching_no_layer(user: Path) -> None:
    out = run("quantize", "my.safetensors", "-o", "q4.onnx", "--bits", "4", "--force", "--import", "usernet")
    assert "ONNX stores 4-bit weights as int8" in out
    out = run("prune", "my.safetensors", "-o", "po.safetensors", "--override", "nosuch=0.3", "--force",
              "--import", "usernet")
    assert "--override pattern 'nosuch' matches no layer" in out


def test_quantize_times_the_result_and_warns_when_it_is_not_faster(user: Path) -> None:
    out = run("quantize", "my.safetensors", "-o", "qs.safetensors", "--mode", "dynamic", "--json",
              "--import", "usernet")
    res = json.loads(out[out.index("{\n"):])
    sp = res["speedup"]
    assert sp["batch"] == 1 and sp["low"] <= sp["ratio"] <= sp["high"]
    slower = any("slower than the input" in w for w in res["warnings"])
    unclear = any("no measurable speedup" in w for w in res["warnings"])
    assert slower == (sp["high"] < 1.0) and unclear == (sp["low"] <= 1.0 <= sp["high"])


def test_a_ratio_below_one_is_not_printed_as_smaller() -> None:
    assert ratio_text(100, 380) == "3.80x larger" and ratio_text(380, 100) == "3.80x smaller"


def test_threads_option_sets_torch_threads(user: Path) -> None:
    before = torch.get_num_threads()
    try:
        run("evaluate", "my.safetensors", "--import", "usernet", "--threads", "2")
        assert torch.get_num_threads() == 2
        assert "--threads must be between" in run("evaluate", "my.safetensors", "--threads", "0", code=2)
    finally:
        torch.set_num_threads(before)


def test_compress_fine_tunes_show_progress() -> None:
    from deepshrink.cli.compress import compress_config
    from deepshrink.sharing.pipeline import CompressConfig

    cfg = compress_config(CompressConfig(), sparsity=None, bits=None, conv_bits=None, epochs=None,
                          progress=True)
    assert cfg.prune_train.progress and cfg.finetune.progress


# -- a small transformers model (random init, tiny config, local tokenizer: nothing downloaded) --
WORDS = ["good", "great", "fine", "nice", "happy", "bad", "awful", "poor", "sad", "ugly",
         "the", "a", "movie", "film", "plot", "was"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``tiny-bert/`` (save_pretrained model + tokenizer) and ``reviews.tsv``."""
    import random

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d / "tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d / "tiny-bert")
    rng = random.Random(0)
    lines = [f"{i % 2}\t{rng.choice(['the', 'a'])} {rng.choice(['movie', 'film', 'plot'])} was "
             f"{rng.choice(WORDS[:5] if i % 2 else WORDS[5:10])}" for i in range(200)]
    (d / "reviews.tsv").write_text("\n".join(lines) + "\n")
    return d


def test_transformers_model_through_every_command(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: no way in from a save_pretrained folder or text data; info / evaluate / quantize /
    # channel prune crashed with tracebacks on transformers files
    monkeypatch.chdir(bert)
    assert "test top-1" in run("evaluate", "tiny-bert", "-d", "reviews.tsv")  # tokenizer: the folder's
    run("train", "-m", "tiny-bert", "-d", "reviews.tsv", "-o", "b.safetensors", "--epochs", "1")
    rec = deepshrink.checkpoint.read_metadata(bert / "b.safetensors")["extra"]["data"]
    assert rec["preprocessing"] == "tokens" and rec["input_shape"] == [32]
    assert rec["tokenizer"] == str((bert / "tiny-bert").resolve())
    assert "MACs" in run("info", "b.safetensors")  # no -d, no --tokenizer: the record has both
    run("prune", "b.safetensors", "-o", "p.safetensors", "--ratio", "0.5", "--force")
    run("prune", "b.safetensors", "-o", "pc.safetensors", "--method", "channel", "--ratio", "0.25", "--force")
    run("quantize", "b.safetensors", "-o", "q.onnx", "--force")
    run("quantize", "b.safetensors", "-o", "q.safetensors", "--mode", "dynamic", "--force")
    run("compress", "b.safetensors", "-o", "c.dsz", "--epochs", "1", "--force")
    run("pack", "b.safetensors", "-o", "k.dsz")
    run("unpack", "c.dsz", "-o", "u.safetensors")
    run("dsz-info", "c.dsz")
    run("distill", "-t", "b.safetensors", "-s", "p.safetensors", "-o", "s.safetensors", "--epochs", "1")
    run("separable", "b.safetensors", "-o", "sep.safetensors", "--force")
    run("early-exit", "b.safetensors", "-o", "ee.safetensors", "--epochs", "1")
    run("factorize", "b.safetensors", "-o", "f.safetensors", "--rank", "4", "--force")
    run("run", "int8-ort", "--model", "b.safetensors", "--out", "rec")
    run("report", "rec/results.json")
    out = run("shrink", "b.safetensors", "-o", "srch", "--max-drop", "50", "--candidates", "2",
              "--rungs", "1", "--epochs-scale", "0.2", "--json")
    assert json.loads(out[out.index("{\n"):])["selected"]
    for f in ("p.safetensors", "pc.safetensors", "q.onnx", "q.safetensors", "c.dsz", "k.dsz",
              "u.safetensors", "s.safetensors", "sep.safetensors", "ee.safetensors", "f.safetensors"):
        assert json.loads(run("evaluate", f, "--json"))["n"] == 40, f  # the recorded text, no -d
    info = json.loads(run("info", "q.onnx", "--json"))
    assert info["params"] > 10_000
    # out again: a pruned model as a save_pretrained folder that transformers itself reads
    run("export", "p.safetensors", "-o", "p-hf")
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(bert / "p-hf")
    ours = deepshrink.load(bert / "p.safetensors")
    ids = torch.randint(5, len(WORDS) + 5, (2, 8))
    with torch.no_grad():
        assert torch.allclose(hf.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, atol=1e-5)
    out = run("evaluate", "p-hf", "-d", "reviews.tsv", "--tokenizer", "tiny-bert", "--json")
    top1 = json.loads(out[out.index("{"):])["top1"]  # after transformers' own loading bar
    assert top1 == pytest.approx(json.loads(run("evaluate", "p.safetensors", "--json"))["top1"])
    # channel pruning narrowed the pooler below the hidden size: no config states that, so refuse
    out = run("export", "pc.safetensors", "-o", "pc-hf", code=2)
    assert "config cannot express" in out and not (bert / "pc-hf").exists()
    res = json.loads(run("export", "b.safetensors", "-o", "b.onnx", "--json"))  # fp32 ONNX
    assert res["onnx_max_abs_diff"] < 1e-4


def test_text_data_errors_are_one_line(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bert)
    (bert / "nolabel.tsv").write_text("just text\n")
    out = run("evaluate", "tiny-bert", "-d", "nolabel.tsv", code=2)
    assert "nolabel.tsv:1: no label (expected LABEL<TAB>TEXT)" in out
    out = run("train", "-m", "lenet300", "-d", "reviews.tsv", "-o", "x.safetensors", code=2)
    assert "needs a tokenizer" in out and "--tokenizer" in out
