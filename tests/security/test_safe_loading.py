"""Issue 16: loading never runs code a file names, and every bad input is a deepshrink error.

Each test is one finding of the issue (the reproducer first); each failed on the code before
the fix (see /work/notes/16.md).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import deepshrink
from deepshrink.cli import app
from deepshrink.dsz import dsz_info, pack, read_container, write_container
from deepshrink.errors import ConfigError, DataError, DeepShrinkError, FormatError, ModelError
from deepshrink.models import ModelSpec, register_edit
from deepshrink.models.schema import Int, Obj

runner = CliRunner()
# Crafted files below are written without a digest, as an attacker (or an old deepshrink) would.
pytestmark = pytest.mark.filterwarnings("ignore:.*tensor digest")


def _checkpoint(path: Path, spec: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file with deepshrink metadata, written as an attacker would."""
    tensors = tensors or {"x": torch.zeros(1)}
    meta = {"format": "deepshrink-checkpoint", "version": 1, "spec": spec, "extra": {}}
    save_file(tensors, str(path), metadata={"deepshrink": json.dumps(meta)})
    return path


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return deepshrink.create_model("mlp", in_size=4, hidden=8, num_classes=3)


def test_issue_reproducer_os_system_is_never_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = {"name": "os:system", "kwargs": {"command": "touch PWNED"}, "edits": []}
    p = _checkpoint(tmp_path / "evil.safetensors", spec)
    res = runner.invoke(app, ["info", str(p)])
    assert res.exit_code == 2 and "not a registered model" in res.output
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(FormatError, match="may not name code"):
        deepshrink.load(p)
    assert not (tmp_path / "PWNED").exists()


def _dangerous(tmp: Path) -> list[tuple[str, dict]]:
    s, keep, d = str(tmp / "PWNED"), str(tmp / "keep.txt"), str(tmp / "keepdir")
    return [
        ("os:system", {"command": f"touch {s}"}),
        ("subprocess:run", {"args": ["touch", s]}),
        ("builtins:open", {"file": keep, "mode": "w"}),
        ("os:remove", {"path": keep}),
        ("shutil:rmtree", {"path": d}),
        ("runpy:run_path", {"path_name": str(tmp / "evil.py")}),
        ("torch:load", {"f": keep, "weights_only": False}),
        ("numpy:load", {"file": keep, "allow_pickle": True}),
        ("sys:exit", {"status": 0}),
        ("ctypes:string_at", {"ptr": 0}),
        ("importlib:import_module", {"name": "evil"}),
        ("deepshrink.fileio:atomic_write_text", {"path": s}),
    ]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    (tmp_path / "keep.txt").write_text("keep")
    (tmp_path / "keepdir").mkdir()
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\n")
    return tmp_path


def _intact(tmp: Path) -> bool:
    return (
        not (tmp / "PWNED").exists()
        and (tmp / "keep.txt").read_text() == "keep"
        and (tmp / "keepdir").is_dir()
    )


@pytest.mark.parametrize("fmt", ["safetensors", "dsz"])
def test_no_dangerous_callable_is_ever_called(canary: Path, fmt: str) -> None:
    m = _mlp()
    for i, (name, kwargs) in enumerate(_dangerous(canary)):
        for spec in (
            {"name": name, "kwargs": kwargs, "edits": []},
            {"name": "hf", "kwargs": {"arch": name.split(":")[1], "config": kwargs}},
            {"name": "mlp", "kwargs": {}, "edits": [{"kind": name, **kwargs}]},
        ):
            object.__setattr__(
                m, "deepshrink_spec", ModelSpec(spec["name"], spec["kwargs"], spec.get("edits", []))
            )
            p = canary / f"m{i}.{fmt}"
            deepshrink.save(m, p) if fmt == "safetensors" else pack(m, p)
            with pytest.raises(FormatError):
                deepshrink.load(p)
            assert _intact(canary), name


def test_sys_exit_spec_cannot_end_the_cli_with_status_0(tmp_path: Path) -> None:
    p = _checkpoint(tmp_path / "exit.safetensors", {"name": "sys:exit", "kwargs": {"status": 0}})
    res = runner.invoke(app, ["info", str(p)])
    assert res.exit_code == 2 and "error:" in res.output


def test_user_code_loads_only_when_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mypkg_sec"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text(
        "from torch import nn\n\ndef build(width: int = 3):\n    return nn.Sequential(nn.Linear(2, width))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = deepshrink.create_model("mypkg_sec.models:build", width=4)  # code the caller chose to run
    p = deepshrink.save(m, tmp_path / "mine.safetensors")
    with pytest.raises(FormatError, match=r"trust=\['mypkg_sec.models'\]"):
        deepshrink.load(p)
    with pytest.raises(FormatError):
        deepshrink.load(p, trust=["mypkg"])  # a prefix counts only at a dot
    loaded = deepshrink.load(p, trust=["mypkg_sec"])
    assert torch.equal(loaded[0].weight, m[0].weight)
    with pytest.raises(FormatError, match="kwargs"):  # trusted code still gets only its own parameters
        deepshrink.load(
            _checkpoint(
                tmp_path / "k.safetensors", {"name": "mypkg_sec.models:build", "kwargs": {"evil": 1}}
            ),
            trust=["mypkg_sec"],
        )


def test_a_registry_entry_registered_in_code_loads(tmp_path: Path) -> None:
    @deepshrink.models.register_model("sec_test_tiny")
    def tiny(width: int = 2) -> nn.Module:
        return nn.Sequential(nn.Linear(3, width))

    m = deepshrink.create_model("sec_test_tiny", width=5)
    out = deepshrink.load(deepshrink.save(m, tmp_path / "t.safetensors"))
    assert torch.equal(out[0].weight, m[0].weight)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"name": "mlp", "kwargs": None}, "kwargs"),
        ({"name": "mlp", "edits": ["x"]}, r"edits\[0\]"),
        ({"name": "mlp", "kwargs": {"num_classes": -3}}, "cannot be built"),
        ({"name": "mlp", "kwargs": {"hidden": 1 << 30}}, "architecture expects"),  # checked on meta
        ({"name": "mlp", "kwargs": {"bogus": 1}}, "unknown field"),
        (
            {"name": "mlp", "edits": [{"kind": "packed_sparse", "layers": {"2": {"op": "linear"}}}]},
            "missing field",
        ),
        (
            {
                "name": "mlp",
                "edits": [{"kind": "channel_prune", "slices": {}, "attrs": {"2": {"forward": 1}}}],
            },
            "unknown field",
        ),
        (
            {"name": "mlp", "edits": [{"kind": "channel_prune", "slices": {}, "config": {"__class__": 1}}]},
            "unknown field",
        ),
        (
            {"name": "mlp", "edits": [{"kind": "quantize", "layers": {"2": {"kind": "linear"}}}]},
            "missing field",
        ),
        ({"name": "hf", "kwargs": {"arch": "BertModel", "config": {"num_hidden_layers": 100000}}}, "layers"),
        (
            {"name": "hf", "kwargs": {"arch": "BertModel", "config": {"auto_map": {"AutoModel": "x.y"}}}},
            "not allowed",
        ),
        ("x", "must be an object"),
    ],
)
def test_spec_is_validated_before_anything_is_built(tmp_path: Path, spec: object, needle: str) -> None:
    pytest.importorskip("transformers")
    m = _mlp()
    p = _checkpoint(tmp_path / "s.safetensors", spec, {k: v.contiguous() for k, v in m.state_dict().items()})
    with pytest.raises(FormatError, match=needle):
        deepshrink.load(p)


def test_edit_kinds_register_with_a_schema(tmp_path: Path) -> None:
    @register_edit("sec_test_scale", schema=Obj({"factor": Int(1, 10)}))
    def _replay(model: nn.Module, edit: dict) -> nn.Module:
        return model

    m = _mlp()
    deepshrink.models.record_edit(m, {"kind": "sec_test_scale", "factor": 3})
    assert deepshrink.load(deepshrink.save(m, tmp_path / "a.safetensors")) is not None
    m.deepshrink_spec.edits[-1] = {"kind": "sec_test_scale", "factor": 3, "name": "os:system"}
    with pytest.raises(FormatError, match="unknown field"):
        deepshrink.load(deepshrink.save(m, tmp_path / "b.safetensors"))
    with pytest.raises(TypeError):
        register_edit("sec_test_no_schema")  # type: ignore[call-arg]  # a schema is required


def _reseal(src: Path, dst: Path, change) -> Path:
    """Rewrite a .dsz with a changed manifest and valid checksums (a crafted, not corrupt, file)."""
    c = read_container(src)
    manifest = {k: v for k, v in c.manifest.items() if k != "sections"}
    change(manifest)
    write_container(
        dst,
        manifest,
        [(bytes(s), t["codec"]) for s, t in zip(c.sections, c.manifest["sections"], strict=True)],
    )
    return dst


@pytest.mark.parametrize("dtype", ["int32", "bool", "float16"])
def test_dsz_dtype_must_match_the_architecture(tmp_path: Path, dtype: str) -> None:
    m = _mlp()
    src = tmp_path / "m.dsz"
    pack(m, src)

    def change(man: dict) -> None:
        rec = next(r for r in man["tensors"] if r["name"].endswith("bias") and r["values"]["kind"] == "raw")
        item = {"int32": 4, "bool": 1, "float16": 2}[dtype]
        rec["dtype"] = dtype
        rec["shape"] = [rec["shape"][0] * 4 // item]
        rec["index"] = {"kind": "dense"}

    p = _reseal(src, tmp_path / "d.dsz", change)
    with pytest.raises(FormatError):
        deepshrink.load(p)


def test_dsz_size_is_bounded_by_the_file(tmp_path: Path) -> None:
    # A zero-bit code "fills" any declared size: a few hundred bytes declare 2^28 elements.
    from deepshrink.coding.huffman import encode_stream

    data, _ = encode_stream(np.zeros(1, np.int64), 1, "fixed", 4096)
    man = {
        "format": "deepshrink-dsz",
        "version": 1,
        "spec": None,
        "extra": {},
        "tensors": [
            {
                "name": "w",
                "shape": [1 << 14, 1 << 14],
                "dtype": "float32",
                "index": {"kind": "dense"},
                "values": {"kind": "shared", "k": 1, "cb_dtype": "float32", "codebook": 0, "symbols": 1},
            }
        ],
    }
    p = tmp_path / "bomb.dsz"
    write_container(p, man, [(np.zeros(1, np.float32).tobytes(), "raw"), (data, "fixed")])
    with pytest.raises(FormatError, match="more than this"):
        deepshrink.load(p)


def test_dsz_info_reports_bad_manifests_and_corrupt_payloads(tmp_path: Path) -> None:
    src = tmp_path / "m.dsz"
    pack(_mlp(), src)
    for i, change in enumerate(
        [
            lambda m: m.update(tensors=5),
            lambda m: m.update(spec="x"),
            lambda m: m["tensors"][0].update(index="x"),
            lambda m: m["tensors"][0]["values"].update(data=99),
        ]
    ):
        p = _reseal(src, tmp_path / f"bad{i}.dsz", change)
        with pytest.raises(FormatError):
            dsz_info(p)
        res = runner.invoke(app, ["dsz-info", str(p)])
        assert res.exit_code == 2 and "Traceback" not in res.output and "error:" in res.output


def test_safetensors_digest_catches_flipped_data_bytes(tmp_path: Path) -> None:
    m = _mlp()
    p = deepshrink.save(m, tmp_path / "m.safetensors")
    blob = bytearray(p.read_bytes())
    blob[-3] ^= 0x10  # a data byte of the last tensor
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="digest mismatch"):
        deepshrink.load(bad)
    with pytest.raises(FormatError, match="digest mismatch"):
        deepshrink.load(bad, model=_mlp())


def test_old_checkpoints_without_digest_still_load_with_a_warning() -> None:
    old = Path(__file__).resolve().parents[2] / "bench" / "results" / "lenet5.safetensors"
    if not old.exists():
        pytest.skip("bench results not present")
    with pytest.warns(UserWarning, match="without a tensor digest"):
        deepshrink.load(old)


def test_save_anything_you_can_load(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    p = deepshrink.save(model, tmp_path / "bert.safetensors")
    loaded = deepshrink.load(p)
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ModelError, match="weights_only=True"):
        deepshrink.save(plain, tmp_path / "plain.safetensors")
    deepshrink.save(plain, tmp_path / "plain.safetensors", weights_only=True)
    assert torch.equal(
        deepshrink.load(tmp_path / "plain.safetensors", model=nn.Sequential(nn.Linear(2, 2)))[0].weight,
        plain[0].weight,
    )


# --------------------------------------------------------------------------- configs


def test_configs_reject_bad_values_and_files(tmp_path: Path) -> None:
    from deepshrink.sharing import CompressConfig
    from deepshrink.train import TrainConfig

    with pytest.raises(ConfigError, match="ratio"):
        CompressConfig.from_dict({"prune": {"ratio": 2.0}})
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig.from_json('{"lr": Infinity}')
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig.from_dict({"epochs": 1.5})
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig.from_dict({"epochs": "abc"})
    files = {
        "a.yaml": b"a: [1, 2\n  b: }",
        "b.json": b'{"epochs": ',
        "c.json": '{"x": "\xe9"}'.encode("latin-1"),
        "d.json": b"[1]",
        "e.yml": b"- 1\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=name):
            TrainConfig.from_file(tmp_path / name)
    with pytest.raises(ConfigError, match="no such|No such"):
        TrainConfig.from_file(tmp_path / "missing.json")


def test_non_finite_loss_stops_training() -> None:
    from deepshrink.data import load_digits
    from deepshrink.train import TrainConfig, train

    m = deepshrink.create_model("mlp", in_size=8)
    with torch.no_grad():
        m[-1].weight.fill_(float("nan"))
    with pytest.raises(ModelError, match="diverged"):
        train(m, load_digits(), TrainConfig(epochs=1, max_steps=3, progress=False))


# --------------------------------------------------------------------------- IDX data


def _idx_dir(d: Path, gz: bool = True, **arrays: np.ndarray) -> Path:
    from deepshrink.data.idx import write_idx

    rng = np.random.default_rng(0)
    base = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 6, 6), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 3, 30, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 6, 6), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 3, 10, dtype=np.uint8),
    }
    base.update(
        {
            k.replace("_idx", "-idx").replace("_ubyte", "-ubyte").replace("_", "-"): v
            for k, v in arrays.items()
        }
    )
    d.mkdir(exist_ok=True)
    for k, v in base.items():
        write_idx(d / (k + (".gz" if gz else "")), v)
    return d


def test_idx_decoding_errors_are_format_errors(tmp_path: Path) -> None:
    from deepshrink.data import load_idx_dir
    from deepshrink.data.idx import read_idx

    d = _idx_dir(tmp_path / "d")
    f = d / "train-images-idx3-ubyte.gz"
    blob = f.read_bytes()
    seen = 0
    for i in range(10, len(blob) - 8, max(1, len(blob) // 60)):  # flips inside the deflate data
        b = bytearray(blob)
        b[i] ^= 0xFF
        f.write_bytes(bytes(b))
        try:
            read_idx(f)
        except FormatError:
            seen += 1
    assert seen > 0
    f.write_bytes(blob[:-1])
    with pytest.raises(FormatError):
        load_idx_dir(d, n_val=5)


def test_idx_gzip_bomb_is_not_inflated_beyond_its_header(tmp_path: Path) -> None:
    import gzip
    import struct

    from deepshrink.data.idx import read_idx

    # header says 4 bytes; the stream holds 50 MB more
    raw = bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + bytes(4) + bytes(50 << 20)
    p = tmp_path / "bomb.gz"
    p.write_bytes(gzip.compress(raw, 9))
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(FormatError, match="trailing"):
        read_idx(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20


@pytest.mark.parametrize(
    "arrays, n_val, needle",
    [
        ({"train_labels_idx1_ubyte": np.array([0] * 29 + [10**9], np.int32)}, 5, "labels range"),
        ({"train_labels_idx1_ubyte": np.zeros(30, np.float32)}, 5, "not integers"),
        ({"t10k_images_idx3_ubyte": np.zeros((10, 7, 7), np.uint8)}, 5, "must match"),
        ({"t10k_images_idx3_ubyte": np.zeros((10, 6, 6), np.float32)}, 5, "must match"),
        (
            {
                "t10k_images_idx3_ubyte": np.zeros((0, 6, 6), np.uint8),
                "t10k_labels_idx1_ubyte": np.zeros(0, np.uint8),
            },
            5,
            "empty",
        ),
        ({}, 30, "n_val"),
        ({}, -1, "n_val"),
    ],
)
def test_idx_directories_are_checked(tmp_path: Path, arrays: dict, n_val: int, needle: str) -> None:
    from deepshrink.data import load_idx_dir

    d = _idx_dir(tmp_path / "d", **arrays)
    with pytest.raises(DataError, match=needle):
        load_idx_dir(d, n_val=n_val)


# --------------------------------------------------------------------------- CLI


def _cli_error(args: list[str], needle: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output and needle in res.output, res.output


def test_unpack_and_compress_refuse_to_overwrite_their_input(tmp_path: Path) -> None:
    src = tmp_path / "m.dsz"
    pack(_mlp(), src)
    before = src.read_bytes()
    (tmp_path / "link.dsz").symlink_to(src)
    os.link(src, tmp_path / "hard.dsz")
    for out in (src, tmp_path / "link.dsz", tmp_path / "hard.dsz"):
        _cli_error(["unpack", str(src), "-o", str(out)], "refusing to overwrite")
        _cli_error(["compress", str(src), "-o", str(out)], "refusing to overwrite")
    assert src.read_bytes() == before


def test_cli_bad_arguments_give_one_line(tmp_path: Path) -> None:
    m = deepshrink.create_model("mlp", in_size=8)
    good = deepshrink.save(m, tmp_path / "m.safetensors")
    (tmp_path / "broken.json").write_text('{"epochs": ')
    (tmp_path / "type.json").write_text('{"epochs": "abc"}')
    (tmp_path / "note.txt").write_text("x")
    for cmd in (
        ["train", "-m", "mlp", "-o", str(tmp_path / "o.safetensors")],
        ["compress", str(good), "-o", str(tmp_path / "o.dsz")],
        ["prune", str(good), "-o", str(tmp_path / "o.safetensors")],
        ["quantize", str(good), "-o", str(tmp_path / "o.safetensors")],
    ):
        _cli_error([*cmd, "--config", str(tmp_path / "broken.json")], "not valid JSON")
        _cli_error([*cmd, "--config", str(tmp_path / "type.json")], "epochs")
    _cli_error(["train", "-m", "mlp", "-o", str(tmp_path / "o.safetensors"), "--lr", "inf"], "lr")
    _cli_error(["train", "-m", "mlp", "-o", str(tmp_path / "note.txt" / "x"), "--epochs", "0"], "note.txt")
    _cli_error(["info", str(good), "--input-shape", "-1,8,8"], "--input-shape")
    _cli_error(["info", str(good), "--input-shape", "1,28,28"], "cannot take")
    _cli_error(["demo", "--threads", "0"], "--threads")
    rng = np.random.default_rng(0)  # 6x6 images (and the default 5000 validation images) for an 8x8 model
    d = _idx_dir(
        tmp_path / "idx",
        train_images_idx3_ubyte=rng.integers(0, 256, (5010, 6, 6), dtype=np.uint8),
        train_labels_idx1_ubyte=rng.integers(0, 3, 5010, dtype=np.uint8),
    )
    _cli_error(["evaluate", str(good), "-d", str(d)], "cannot take")


def test_cli_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepshrink.checkpoint as ck

    def full(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_model", full)
    _cli_error(
        ["train", "-m", "mlp", "-o", str(tmp_path / "o.safetensors"), "--epochs", "0"],
        "No space left on device",
    )
    assert os.listdir(tmp_path) == []


def test_no_temporary_left_after_kill(tmp_path: Path) -> None:
    from deepshrink.fileio import atomic_write_text, scratch_dir

    dead = 2**22 + 12345  # beyond pid_max on usual systems: never a live process
    stale = tmp_path / f".out.txt.{dead}.abc123.tmp"
    stale.write_text("left by kill -9")
    other = tmp_path / f".out.txt.{os.getpid()}.zzz.tmp"  # a live writer's: kept
    other.write_text("in progress")
    atomic_write_text(tmp_path / "out.txt", "ok")
    assert not stale.exists() and other.exists()
    import tempfile

    stale_dir = Path(tempfile.gettempdir()) / f"deepshrink-{dead}-xyz"
    stale_dir.mkdir(exist_ok=True)
    with scratch_dir() as d:
        assert d.is_dir()
    assert not d.exists() and not stale_dir.exists()


def test_sigterm_removes_temporaries(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    code = (
        "import os, signal, time, sys\n"
        "from deepshrink.cli import main\n"
        "from deepshrink.fileio import atomic_path, scratch_dir\n"
        "import deepshrink.cli as c\n"
        "signal.signal(signal.SIGTERM, c._on_signal)\n"
        f"with scratch_dir() as d, atomic_path({str(tmp_path / 'out.bin')!r}) as t:\n"
        "    t.write_bytes(b'x'); print(d, flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert Path(line.strip()).is_dir()
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []


def test_layering_core_never_imports_techniques() -> None:
    import ast

    src = Path(deepshrink.__file__).parent
    for rel, banned in (
        ("checkpoint.py", ("deepshrink.sharing", "deepshrink.dsz")),
        ("dsz/codec.py", ("deepshrink.sharing",)),
        ("dsz/model.py", ("deepshrink.sharing",)),
        ("models/registry.py", ("deepshrink.pruning", "deepshrink.quantization")),
        ("models/spec.py", ("deepshrink.pruning", "deepshrink.quantization")),
    ):
        tree = ast.parse((src / rel).read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.startswith(banned)], rel
    assert not (src / "sharing" / "loader.py").exists()


def test_errors_are_deepshrink_errors() -> None:
    from deepshrink.errors import OutputError

    assert issubclass(OutputError, DeepShrinkError) and issubclass(OutputError, OSError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert issubclass(FormatError, DeepShrinkError)
