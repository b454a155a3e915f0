"""`deepshrink export`: the same model in another format — fp32 ONNX, a `transformers`
``save_pretrained`` folder, safetensors or .dsz — carrying its data record where the format can."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from deepshrink.cli.common import JSON_OPTION, emit_json, friendly_errors, out
from deepshrink.cli.core import DATASET
from deepshrink.cli.guards import commit, staged
from deepshrink.cli.modelio import data_extra, load_model, model_data, onnx_with_record
from deepshrink.cli.options import SESSION
from deepshrink.errors import OutputError

FORMATS = ("onnx", "safetensors", "dsz", "save_pretrained")


def format_of(output: Path, fmt: str | None) -> str:
    """``--format``, else the output's suffix; a path without one is a save_pretrained folder."""
    if fmt is None:
        fmt = output.suffix.lstrip(".") or "save_pretrained"
    if fmt not in FORMATS:
        raise OutputError(f"cannot export to {output} ({fmt!r}): formats are {list(FORMATS)}",
                          hint="name the output .onnx, .safetensors or .dsz, a folder, or give --format")
    return fmt


def _onnx(model: torch.nn.Module, tmp: Path, bundle: Any) -> float:
    """Write fp32 ONNX; returns the largest |difference| between ONNX Runtime and torch outputs."""
    from deepshrink.modeling import forward, output_tensor
    from deepshrink.quantization import OrtModel, export_onnx

    example = bundle.test.tensors[0][:2]
    data = onnx_with_record(export_onnx(model, None, example), bundle)
    tmp.write_bytes(data)
    with torch.no_grad():
        ref = output_tensor(forward(model, example))
    return float((OrtModel(data, threads=SESSION.threads)(example) - ref).abs().max())


def write(model: torch.nn.Module, path: Path, tmp: Path, fmt: str, bundle: Any) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` to ``tmp``; what the format's check measured."""
    from deepshrink.checkpoint import save
    from deepshrink.dsz import PackConfig, pack
    from deepshrink.models.hf import save_pretrained_dir
    from deepshrink.pruning.sparse import to_dense_layers

    if fmt == "onnx":
        return {"onnx_max_abs_diff": _onnx(model, tmp, bundle)}
    if fmt == "save_pretrained":  # plain tensors: packed sparse layers back to dense ones
        save_pretrained_dir(to_dense_layers(model), tmp)  # refuses what a config cannot express
    elif fmt == "dsz":
        pack(model, tmp, PackConfig(), extra=data_extra(bundle), protect=(path,))
    else:
        save(model, tmp, extra=data_extra(bundle), protect=(path,))
    return {}


def register(app: typer.Typer) -> None:
    @app.command("export")
    @friendly_errors
    def export_cmd(
        path: Path = typer.Argument(..., help="A model file or save_pretrained folder."),
        output: Path = typer.Option(..., "--output", "-o", help="What to write: .onnx (fp32), "
                                    ".safetensors, .dsz, or a folder (transformers save_pretrained)."),
        fmt: str | None = typer.Option(None, "--format", help=f"One of {FORMATS} (default: from -o)."),
        data: str | None = DATASET,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Write a model unchanged in another format; never overwrites the input."""
        from deepshrink.measure import file_bytes

        kind = format_of(output, fmt)
        if kind == "save_pretrained" and output.exists():
            raise OutputError(f"{output} exists", hint="export a save_pretrained folder to a new path")
        model = load_model(path)
        bundle = model_data(path, data, None)
        with staged(output, (path,)) as tmp:
            res = {"input": str(path), "output": str(output), "format": kind,
                   **write(model, path, tmp, kind, bundle)}
            commit(tmp, output)
        res["bytes"] = file_bytes(output)
        if as_json:
            emit_json(res)
            return
        diff = f"; ONNX Runtime vs torch max |diff| {res['onnx_max_abs_diff']:.2e}" if kind == "onnx" else ""
        out.print(f"{path} -> {output} ({kind}, {res['bytes']:,} B){diff}", highlight=False)
