"""Seeded fuzzing of everything deepshrink reads: .dsz files, safetensors checkpoints (crafted
metadata, including specs that name dangerous callables), IDX data directories and CLI
invocations.

Every case ends in one outcome:

* ``clean``: a deepshrink error (the only allowed failure);
* ``loaded``: the input was accepted, and the result is what the file says (a model holding
  exactly the stored tensors with their dtypes; for a file corrupted without re-sealing its
  checksums, identical outputs to the original; a dataset whose splits are consistent; a CLI
  invocation that was meant to work);
* ``other``: any other exception (a traceback for a user), or a CLI run that printed one;
* ``hang``: over the per-case time limit;
* ``memory``: MemoryError / a failed allocation under the worker's memory cap;
* ``different``: accepted, but not what the file says (a silently different model, a CLI run
  that should have failed but exited 0);
* ``code-ran``: a side effect of a callable named by a file was observed (critical).

Run one worker (it caps its own memory with ``resource.setrlimit``)::

    python tests/security/fuzzing.py --family dsz --cases 2000 --seed 1 --out result.json

``tests/security/test_fuzz.py`` runs each family in such a subprocess; ``bench/security_fuzz.py``
runs the large campaign.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MEMORY_CAP = 3 << 30  # address space of a worker: torch needs ~0.7 GB, the rest is headroom
CASE_SECONDS = {"dsz": 10, "safetensors": 10, "idx": 10, "cli": 60}
NASTY: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    7,
    255,
    256,
    1 << 31,
    1 << 40,
    -(1 << 62),
    1.5,
    -0.5,
    1e308,
    "",
    "x",
    "float32",
    "bool",
    "int32",
    "uint8",
    "float16",
    "linear",
    "C",
    "F",
    "raw",
    "shared",
    "dense",
    "relative",
    "csr",
    "__class__",
    "../x",
    [],
    [1],
    [-1],
    [1 << 40],
    [0, 0],
    [3, 4],
    ["x"],
    {},
    {"kind": "x"},
    {"a": {"b": {"c": 1}}},
    list(range(40)),
]


class Hang(BaseException):
    """Raised by the per-case alarm."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


# --------------------------------------------------------------------------- dangerous callables


class Canary:
    """Files a hostile spec would touch: a sentinel that must never appear, a file that must
    keep its content, a directory that must stay, and payloads that create the sentinel."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "canary"
        self.dir.mkdir()
        self.sentinel = self.dir / "PWNED"
        self.file = self.dir / "keep.txt"
        self.file.write_text("keep")
        self.subdir = self.dir / "keepdir"
        self.subdir.mkdir()
        touch = f"touch {self.sentinel}"
        self.script = self.dir / "evil.py"
        self.script.write_text(f"open({str(self.sentinel)!r}, 'w').close()\n")
        self.pickle = self.dir / "evil.pkl"
        self.pickle.write_bytes(pickle.dumps(_Evil(touch)))
        (self.dir / "fuzz_evil_mod.py").write_text(f"open({str(self.sentinel)!r}, 'w').close()\n")
        sys.path.insert(0, str(self.dir))

    def dangerous(self) -> list[tuple[str, dict[str, Any]]]:
        s, f, d = str(self.sentinel), str(self.file), str(self.subdir)
        return [
            ("os:system", {"command": f"touch {s}"}),
            ("posix:system", {"command": f"touch {s}"}),
            ("subprocess:run", {"args": ["touch", s]}),
            ("subprocess:call", {"args": ["touch", s]}),
            ("subprocess:Popen", {"args": ["touch", s]}),
            ("subprocess:check_output", {"args": ["touch", s]}),
            ("builtins:open", {"file": f, "mode": "w"}),
            ("io:open", {"file": f, "mode": "w"}),
            ("os:remove", {"path": f}),
            ("os:unlink", {"path": f}),
            ("os:rmdir", {"path": d}),
            ("shutil:rmtree", {"path": d}),
            ("shutil:copy", {"src": f, "dst": s}),
            ("shutil:move", {"src": f, "dst": s}),
            ("os:makedirs", {"name": s}),
            ("os:mkdir", {"path": s}),
            ("runpy:run_path", {"path_name": str(self.script)}),
            ("runpy:run_module", {"mod_name": "fuzz_evil_mod"}),
            ("importlib:import_module", {"name": "fuzz_evil_mod"}),
            ("torch:load", {"f": str(self.pickle), "weights_only": False}),
            ("numpy:load", {"file": str(self.pickle), "allow_pickle": True}),
            ("pickle:load", {"file": str(self.pickle)}),
            ("sys:exit", {"status": 0}),
            ("builtins:exit", {}),
            ("os:abort", {}),
            ("ctypes:string_at", {"ptr": 0, "size": 1}),
            ("tempfile:mkdtemp", {"dir": str(self.dir), "prefix": "PWNED"}),
            ("pathlib:Path.touch", {"self": s}),
            ("builtins:exec", {}),
            ("builtins:eval", {}),
            ("builtins:__import__", {"name": "fuzz_evil_mod"}),
            ("deepshrink.fileio:atomic_write_text", {"path": s, "text": "x"}),
            ("deepshrink.models.reference:mlp", {}),
            ("os.path:join", {}),
            ("torch.hub:load", {"repo_or_dir": "x/y", "model": "z"}),
            ("transformers:AutoModel.from_pretrained", {"pretrained_model_name_or_path": s}),
        ]

    def intact(self) -> bool:
        ok = (
            not self.sentinel.exists()
            and self.file.exists()
            and self.file.read_text() == "keep"
            and self.subdir.is_dir()
            and not any(p.name.startswith("PWNED") for p in self.dir.iterdir())
        )
        return ok

    def restore(self) -> None:
        for p in self.dir.iterdir():
            if p.name.startswith("PWNED"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.file.write_text("keep")
        self.subdir.mkdir(exist_ok=True)


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.cmd,))


# --------------------------------------------------------------------------- base models


def base_models() -> dict[str, torch.nn.Module]:
    """Small models of every kind of spec deepshrink writes (registry, edits, transformers)."""
    import deepshrink
    from deepshrink.pruning import ChannelConfig, UnstructuredConfig, prune, prune_channels
    from deepshrink.quantization import PTQConfig, quantize
    from deepshrink.sharing import KMeansConfig, share

    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {}
    mlp = deepshrink.create_model("mlp", in_size=4, hidden=12, num_classes=3)
    prune(mlp, UnstructuredConfig(ratio=0.5))
    share(mlp, KMeansConfig(bits=3))
    models["mlp-shared"] = mlp
    lenet = deepshrink.create_model("lenet5", in_size=16, num_classes=3)
    models["lenet5-channels"] = prune_channels(lenet, ChannelConfig(ratio=0.5),
                                               example_inputs=torch.rand(2, 1, 16, 16)).model
    q = deepshrink.create_model("mlp", in_size=4, hidden=8, num_classes=3)
    models["mlp-int8"] = quantize(q, PTQConfig(mode="weight-only"))
    try:  # noqa: SIM105 - a multi-line call reads better than suppress()
        models["hf-bert"] = deepshrink.create_model(
            "hf",
            arch="BertForSequenceClassification",
            config={
                "model_type": "bert",
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "vocab_size": 30,
                "max_position_embeddings": 16,
                "num_labels": 2,
            },
        )
    except Exception:
        pass
    for m in models.values():
        m.eval()
    return models


def example_input(name: str) -> torch.Tensor:
    if name.startswith("hf"):
        return torch.tensor([[1, 2, 3, 4]])
    if name.startswith("lenet"):
        return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def outputs(model: torch.nn.Module, name: str) -> torch.Tensor:
    from deepshrink.modeling import forward

    return forward(model, example_input(name))


# --------------------------------------------------------------------------- mutations


def json_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            out += json_paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(rng: random.Random, obj: Any, canary: Canary, prefer: tuple[Any, ...] = ()) -> Any:
    """One structural mutation of a JSON tree (on a copy)."""
    obj = json.loads(json.dumps(obj))
    paths = json_paths(obj)
    if prefer and rng.random() < 0.5:
        paths = [p for p in paths if p[: len(prefer)] == prefer] or paths
    path = rng.choice(paths)
    op = rng.random()
    if not path:
        return rng.choice(NASTY)
    parent, key = _get(obj, path[:-1]), path[-1]
    if op < 0.45:
        parent[key] = rng.choice(NASTY)
    elif op < 0.6 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.7 and isinstance(parent, dict):
        parent[rng.choice(["attrs", "__init__", "kind", "x", "conv", "padding_mode", "weight"])] = rng.choice(
            NASTY
        )
    elif op < 0.8:
        v = parent[key]
        parent[key] = (
            v * rng.choice([-1, 2, 1000, 1 << 20])
            if isinstance(v, int) and not isinstance(v, bool)
            else rng.choice(NASTY)
        )
    elif op < 0.9 and isinstance(parent[key], list) and parent[key]:
        parent[key] = parent[key] * rng.choice([2, 100]) if rng.random() < 0.5 else parent[key][:-1]
    else:
        name, kwargs = rng.choice(canary.dangerous())
        parent[key] = name if rng.random() < 0.5 else {"name": name, "kwargs": kwargs}
    return obj


def dangerous_spec(rng: random.Random, spec: dict[str, Any], canary: Canary) -> dict[str, Any]:
    """The spec with its name (or transformers arch, or an edit kind) replaced by a dangerous one."""
    spec = json.loads(json.dumps(spec))
    name, kwargs = rng.choice(canary.dangerous())
    r = rng.random()
    if r < 0.6:
        spec["name"], spec["kwargs"] = name, kwargs
    elif r < 0.8:
        spec["name"] = "hf"
        spec["kwargs"] = {
            "arch": rng.choice(
                [
                    name.split(":")[-1],
                    "pipeline",
                    "AutoModel",
                    "PreTrainedModel",
                    "AutoConfig",
                    "PretrainedConfig",
                    "TrainingArguments",
                ]
            ),
            "config": {"model_type": "bert", "auto_map": {"AutoModel": name}, **kwargs},
        }
    else:
        spec.setdefault("edits", []).append({"kind": name, **kwargs})
    return spec


def mutate_bytes(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    op = rng.random()
    if op < 0.5 or not b:
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op < 0.65:
        del b[rng.randrange(len(b)) :]
    elif op < 0.75:
        b += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100])))
    elif op < 0.9:
        i = rng.randrange(len(b))
        b[i : i + 8] = bytes(rng.randrange(256) for _ in range(8))
    else:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 64])))
    return bytes(b)


# --------------------------------------------------------------------------- model files


def state_matches(model: torch.nn.Module, stored: dict[str, torch.Tensor]) -> bool:
    """The model holds exactly the stored tensors (same names, dtypes and bits)."""
    state = model.state_dict()
    if set(stored) - set(state):
        return False
    for k, t in stored.items():
        m = state[k]
        if (
            m.dtype != t.dtype
            or m.shape != t.shape
            or not torch.equal(
                m.view(-1).view(torch.uint8) if m.numel() else m,
                t.view(-1).view(torch.uint8) if t.numel() else t,
            )
        ):
            return False
    return True


def check_loaded(
    path: Path,
    name: str,
    sealed: bool,
    reference: torch.Tensor,
    stored: Callable[[], dict[str, torch.Tensor]],
) -> str:
    """Load ``path``; classify an accepted file by whether the model is what the file says."""
    import deepshrink

    with contextlib.redirect_stderr(io.StringIO()), _no_warnings():
        model = deepshrink.load(path)
    if not sealed:  # corrupted without fixing checksums: only the original model is acceptable
        return "loaded" if torch.equal(outputs(model, name), reference) else "different"
    return "loaded" if state_matches(model, stored()) else "different"


@contextlib.contextmanager
def _no_warnings() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class ModelFiles:
    """Valid files of every base model, written once per worker."""

    def __init__(self, root: Path) -> None:
        import deepshrink
        from deepshrink.dsz import pack

        self.root = root
        self.models = base_models()
        self.reference = {n: outputs(m, n) for n, m in self.models.items()}
        self.dsz: dict[str, bytes] = {}
        self.st: dict[str, bytes] = {}
        for n, m in self.models.items():
            pack(m, root / f"{n}.dsz")
            deepshrink.save(m, root / f"{n}.safetensors")
            self.dsz[n] = (root / f"{n}.dsz").read_bytes()
            self.st[n] = (root / f"{n}.safetensors").read_bytes()


def dsz_case(rng: random.Random, files: ModelFiles, canary: Canary, path: Path) -> Callable[[], str]:
    from deepshrink.dsz import read_container, read_dsz, write_container

    name = rng.choice(sorted(files.dsz))
    blob = files.dsz[name]
    r = rng.random()
    sealed = r >= 0.3
    if not sealed:
        path.write_bytes(mutate_bytes(rng, blob))
    else:
        c = read_container(blob)
        manifest = {k: v for k, v in c.manifest.items() if k != "sections"}
        sections = [(bytes(s), t["codec"]) for s, t in zip(c.sections, c.manifest["sections"], strict=True)]
        if r < 0.45:
            i = rng.randrange(len(sections))
            sections[i] = (mutate_bytes(rng, sections[i][0]), sections[i][1])
        elif r < 0.6:
            manifest["spec"] = dangerous_spec(rng, manifest["spec"], canary)
        else:
            prefer = rng.choice([("spec",), ("tensors",), ()])
            manifest = mutate_json(rng, manifest, canary, prefer)
        try:
            write_container(path, manifest if isinstance(manifest, dict) else {"m": manifest}, sections)
        except (ValueError, TypeError):  # not JSON-serialisable (e.g. NaN): a byte-level case instead
            path.write_bytes(mutate_bytes(rng, blob))
            sealed = False
    return lambda: check_loaded(path, name, sealed, files.reference[name], lambda: read_dsz(path).tensors)


def st_rewrite(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def st_split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def st_seal(header: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Recompute the deepshrink digest, as a deliberate forger would."""
    from deepshrink.checkpoint import META_KEY, _digest

    meta = header.get("__metadata__", {})
    try:
        d = json.loads(meta[META_KEY])
        d["digest"] = _digest(header, [data])
        meta[META_KEY] = json.dumps(d)
    except (KeyError, ValueError, TypeError):
        pass
    return header


def st_case(rng: random.Random, files: ModelFiles, canary: Canary, path: Path) -> Callable[[], str]:
    from safetensors.torch import load_file

    name = rng.choice(sorted(files.st))
    header, data = st_split(files.st[name])
    meta = json.loads(header["__metadata__"]["deepshrink"])
    r = rng.random()
    sealed = True
    if r < 0.2:
        blob, sealed = mutate_bytes(rng, files.st[name]), False
    elif r < 0.35:  # data bytes changed, digest re-computed: a different but self-consistent file
        data = mutate_bytes(rng, data) if rng.random() < 0.3 else _flip(rng, data)
        blob = st_rewrite(st_seal(header, data), data)
    elif r < 0.6:
        meta["spec"] = dangerous_spec(rng, meta["spec"], canary)
        header["__metadata__"]["deepshrink"] = json.dumps(meta)
        blob = st_rewrite(st_seal(header, data) if rng.random() < 0.8 else header, data)
    elif r < 0.85:
        meta = mutate_json(rng, meta, canary, rng.choice([("spec",), ("spec", "edits"), ()]))
        header["__metadata__"]["deepshrink"] = json.dumps(meta, allow_nan=True)
        blob = st_rewrite(st_seal(header, data) if rng.random() < 0.8 else header, data)
    else:  # the tensor table itself (dtype, shape, offsets)
        table = {k: v for k, v in header.items() if k != "__metadata__"}
        table = mutate_json(rng, table, canary)
        header = {
            **(table if isinstance(table, dict) else {"x": table}),
            "__metadata__": header["__metadata__"],
        }
        blob = st_rewrite(st_seal(header, data) if rng.random() < 0.8 else header, data)
    path.write_bytes(blob)
    return lambda: check_loaded(path, name, sealed, files.reference[name], lambda: load_file(str(path)))


def _flip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    if b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


# --------------------------------------------------------------------------- IDX directories


def _idx_bytes(arr: np.ndarray) -> bytes:
    codes = {
        np.dtype(np.uint8): 8,
        np.dtype(np.int8): 9,
        np.dtype(">i2"): 11,
        np.dtype(">i4"): 12,
        np.dtype(">f4"): 13,
        np.dtype(">f8"): 14,
    }
    dt = {
        np.dtype(np.int16): np.dtype(">i2"),
        np.dtype(np.int32): np.dtype(">i4"),
        np.dtype(np.float32): np.dtype(">f4"),
        np.dtype(np.float64): np.dtype(">f8"),
    }.get(arr.dtype, arr.dtype)
    return (
        bytes([0, 0, codes[dt], arr.ndim])
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.astype(dt).tobytes()
    )


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_BOMB: list[bytes] = []


def _bomb() -> bytes:
    """A ~100 KB gzip file whose header declares 1 x 10000 x 10000 bytes (100 MB of zeros)."""
    if not _BOMB:
        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        out = [z.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 10000, 10000))]
        chunk = bytes(1 << 20)
        for _ in range(100):
            out.append(z.compress(chunk))
        out.append(z.flush())
        _BOMB.append(b"".join(out))
    return _BOMB[0]


def idx_case(rng: random.Random, files: Any, canary: Canary, path: Path) -> Callable[[], str]:
    from deepshrink.data import load_idx_dir

    d = path.with_suffix("")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    n_tr, n_te = 30, 10
    g = np.random.default_rng(rng.randrange(1 << 30))
    arrays = {
        "train_images": g.integers(0, 256, (n_tr, 6, 6), dtype=np.uint8),
        "train_labels": g.integers(0, 3, n_tr, dtype=np.uint8),
        "test_images": g.integers(0, 256, (n_te, 6, 6), dtype=np.uint8),
        "test_labels": g.integers(0, 3, n_te, dtype=np.uint8),
    }
    key = rng.choice(sorted(arrays))
    op = rng.random()
    if op < 0.1:
        arrays[key] = arrays[key].astype(np.float32) + 0.5
    elif op < 0.2 and key.endswith("labels"):
        arrays[key] = arrays[key].astype(np.int32)
        arrays[key][rng.randrange(len(arrays[key]))] = rng.choice([10**9, -5, 1000, 2**31 - 1])
    elif op < 0.3:
        arrays[key] = arrays[key][: rng.choice([0, 1, 5])]
    elif op < 0.35 and key.endswith("images"):
        arrays[key] = g.integers(0, 256, (len(arrays[key]), 7, 5), dtype=np.uint8)
    blobs = {k: _idx_bytes(v) for k, v in arrays.items()}
    gz = rng.random() < 0.5
    if 0.35 <= op < 0.75:
        blobs[key] = mutate_bytes(rng, blobs[key])
    elif 0.75 <= op < 0.85:
        b = bytearray(blobs[key])
        b[4 + 4 * rng.randrange(max(1, b[3]) if len(b) > 3 else 1) : 8] = struct.pack(
            ">I", rng.choice([0, 1 << 31, 10**6])
        )
        blobs[key] = bytes(b)
    for k, b in blobs.items():
        if gz:
            b = gzip.compress(b, compresslevel=1)
            if k == key and 0.85 <= op < 0.95:
                b = mutate_bytes(rng, b)
        (d / (IDX_FILES[k] + (".gz" if gz else ""))).write_bytes(b)
    if op >= 0.95:
        (d / (IDX_FILES[key] + ".gz")).write_bytes(_bomb())
        for suffix in ("",):
            (d / (IDX_FILES[key] + suffix)).unlink(missing_ok=True)
    n_val = rng.choice([0, 5, 5, 5, 29, 30, 31, -1, 10**6])
    sane = op >= 0.35 and op < 0.95

    def run() -> str:
        b = load_idx_dir(d, n_val=n_val)
        sizes = b.sizes()
        y = torch.cat([b.train.tensors[1], b.val.tensors[1], b.test.tensors[1]])
        ok = (
            (sizes["train"] + sizes["val"] == len(arrays["train_labels"]) or not sane)
            and sizes["test"] > 0
            and int(y.min()) >= 0
            and int(y.max()) < b.num_classes <= 1000
            and len(b.class_names) == b.num_classes
        )
        return "loaded" if ok else "different"

    return run


# --------------------------------------------------------------------------- CLI


class CliFiles:
    def __init__(self, root: Path, models: ModelFiles) -> None:
        self.root = root
        self.good = [root / "mlp-shared.dsz", root / "mlp-shared.safetensors"]
        c = root / "cfg"
        c.mkdir()
        (c / "broken.json").write_text('{"epochs": ')
        (c / "type.json").write_text('{"epochs": "abc"}')
        (c / "float.json").write_text('{"epochs": 1.5}')
        (c / "inf.json").write_text('{"lr": Infinity}')
        (c / "nested.json").write_text('{"prune": {"ratio": 2.0}}')
        (c / "unknown.json").write_text('{"nope": 1}')
        (c / "list.json").write_text("[1, 2]")
        (c / "latin1.json").write_bytes('{"seed": "\xe9"}'.encode("latin-1"))
        (c / "bad.yaml").write_text("a: [1, 2\n  b: }")
        (c / "tab.yaml").write_text("epochs:\t- 1\n\t")
        (c / "deep.json").write_text("[" * 100000 + "]" * 100000)
        (c / "big.json").write_text('{"epochs": 1e999}')
        self.bad_configs = sorted(c.iterdir())
        (root / "garbage.bin").write_bytes(os.urandom(300))
        (root / "empty.safetensors").write_bytes(b"")
        (root / "adir").mkdir()
        self.bad_files = [root / "garbage.bin", root / "empty.safetensors", root / "adir", root / "nope.dsz"]
        self.models = models


def cli_case(rng: random.Random, files: CliFiles, canary: Canary, path: Path) -> Callable[[], str]:
    """A command line with at least one bad part (a file, an option value, a config, an output)."""
    mutated = path.with_name(path.name + rng.choice([".dsz", ".safetensors"]))
    blob = files.models.dsz if mutated.suffix == ".dsz" else files.models.st
    mutated.write_bytes(mutate_bytes(rng, blob["mlp-shared"]))
    bad_file = rng.choice([*files.bad_files, mutated, mutated])
    good = rng.choice(files.good)
    cfg = rng.choice(files.bad_configs)
    # outputs that would replace the input: itself, a symbolic and a hard link to it; or unwritable
    sym, hard = path.with_name(path.name + ".sym"), path.with_name(path.name + ".hard")
    for p in (sym, hard):
        p.unlink(missing_ok=True)
    sym.symlink_to(good)
    os.link(good, hard)
    out_bad = rng.choice([good, sym, hard, files.root / "garbage.bin" / "x", files.root / "adir"])
    out_ok = path.with_name(path.name + ".out")
    s = rng.choice(["-1,8,8", "0", "a,b", "", "1,,2", "99999,99999,99999", "1," * 20 + "1"])
    cases = [
        ["info", str(bad_file)],
        ["info", str(good), "--input-shape", s],
        ["dsz-info", str(bad_file)],
        ["evaluate", str(bad_file)],
        ["evaluate", str(good), "-d", rng.choice(["nope", str(files.root / "adir"), "mnist"])],
        ["evaluate", str(good), "--split", rng.choice(["train2", "", "TEST"])],
        ["unpack", str(bad_file), "-o", str(out_ok)],
        ["pack", str(bad_file), "-o", str(out_ok)],
        ["pack", str(good), "-o", str(out_bad)],
        ["unpack", str(good), "-o", str(out_bad)],
        ["compress", str(good), "-o", str(out_bad)],
        ["compress", str(good), "-o", str(out_ok), "--config", str(cfg)],
        ["compress", str(good), "-o", str(good)],
        ["compress", str(bad_file), "-o", str(out_ok)],
        ["compress", str(good), "-o", str(out_ok), "--sparsity", rng.choice(["1.5", "-0.1", "nan", "inf"])],
        ["train", "-m", "mlp", "-o", str(out_ok), "--config", str(cfg)],
        [
            "train",
            "-m",
            rng.choice(["nope", "os:system", "mlp"]),
            "-o",
            str(out_ok),
            "--model-args",
            rng.choice(["{", "[1]", '{"hidden": -3}', '{"bogus": 1}', '{"num_classes": 0}']),
        ],
        ["train", "-m", "mlp", "-o", str(out_ok), "--lr", rng.choice(["inf", "nan", "-1", "0"])],
        ["train", "-m", "mlp", "-o", str(out_ok), "--epochs", rng.choice(["-1", "1.5", "x"])],
        ["train", "-m", "mlp", "-o", str(out_bad), "--epochs", "0", "--data", "nope"],
        ["demo", "--threads", rng.choice(["0", "-1", "100000"]), "-o", str(out_ok)],
        ["prune", str(bad_file), "-o", str(out_ok)],
        ["quantize", str(bad_file), "-o", str(out_ok)],
        ["prune", str(good), "-o", str(out_ok), "--config", str(cfg)],
        ["quantize", str(good), "-o", str(out_ok), "--config", str(cfg)],
        ["distill", str(bad_file), "-o", str(out_ok)],
        [rng.choice(["bogus", "--bogus", "info --json"])],
    ]
    args = rng.choice(cases)

    def run() -> str:
        from typer.testing import CliRunner

        from deepshrink.cli import app

        before = {p: p.read_bytes() for p in files.good}
        res = CliRunner().invoke(app, args)
        text = res.output
        for p, b in before.items():
            if p.read_bytes() != b:
                p.write_bytes(b)
                return f"different|input overwritten: {args}"
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            return "memory" if isinstance(res.exception, MemoryError) else "other"
        if "Traceback" in text:
            return "other"
        return "clean" if res.exit_code != 0 else f"different|exit 0: {args} {text[-300:]}"

    return run


# --------------------------------------------------------------------------- driver


def classify(run: Callable[[], str], seconds: float) -> tuple[str, str]:
    from deepshrink.errors import DeepShrinkError

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        outcome, _, detail = run().partition("|")
        return outcome, detail
    except Hang:
        return "hang", ""
    except DeepShrinkError as exc:
        return "clean", str(exc)[:120]
    except MemoryError:
        return "memory", ""
    except RuntimeError as exc:
        if "alloc" in str(exc).lower() or "memory" in str(exc).lower():
            return "memory", str(exc)[:200]
        return "other", "".join(traceback.format_exception(exc))[-1500:]
    except BaseException as exc:
        return "other", "".join(traceback.format_exception(exc))[-1500:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_family(family: str, cases: int, seed: int, examples: int = 5) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="dsfuzz-"))
    try:
        canary = Canary(root)
        files: Any = ModelFiles(root) if family != "idx" else None
        if family == "cli":
            files = CliFiles(root, files)
        make = {"dsz": dsz_case, "safetensors": st_case, "idx": idx_case, "cli": cli_case}[family]
        counts: Counter[str] = Counter()
        bad: list[dict[str, Any]] = []
        rng = random.Random(seed)
        t0 = time.perf_counter()
        for i in range(cases):
            case_rng = random.Random(rng.getrandbits(64))
            path = root / f"case{i % 4}"
            outcome, detail = classify(
                lambda cr=case_rng, p=path: make(cr, files, canary, p)(), CASE_SECONDS[family]
            )
            if not canary.intact():
                outcome, detail = "code-ran", "a canary file changed"
                canary.restore()
            counts[outcome] += 1
            if outcome not in ("clean", "loaded") and len(bad) < examples:
                bad.append({"case": i, "outcome": outcome, "detail": detail})
        return {
            "family": family,
            "seed": seed,
            "cases": cases,
            "counts": dict(counts),
            "bad": bad,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True, choices=["dsz", "safetensors", "idx", "cli"])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", type=int, default=MEMORY_CAP)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (a.memory, a.memory))
    os.environ.setdefault("DEEPSHRINK_NO_PROGRESS", "1")
    res = run_family(a.family, a.cases, a.seed)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
