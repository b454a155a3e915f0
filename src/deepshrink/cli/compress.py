"""Deep Compression commands: compress, pack, unpack, dsz-info."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from deepshrink.cli.common import JSON_OPTION, emit_json, err, friendly_errors, out
from deepshrink.errors import ConfigError
from deepshrink.fileio import refuse_overwrite
from deepshrink.measure import ResultTable
from deepshrink.sharing.pipeline import CompressConfig


def print_dsz_info(info: dict[str, Any]) -> None:
    """The tensors and sections tables of :func:`deepshrink.dsz.dsz_info`."""
    spec = info.get("spec") or {}
    out.print(f"{info['path']}: {info['bytes']} bytes, .dsz v{info['version']}, "
              f"architecture {spec.get('name', '-')} {spec.get('kwargs', {})} "
              f"({len(spec.get('edits', []))} edits), manifest {info['manifest_bytes']} bytes",
              highlight=False)
    ResultTable("tensors", info["tensors"]).print(out)
    ResultTable("sections", [{"section": s["section"], "codec": s["codec"], "offset": s["offset"],
                              "length": s["length"], "crc32": f"{s['crc32']:08x}"}
                             for s in info["sections"]]).print(out)


def compress_config(cfg: CompressConfig, *, sparsity: float | None, bits: int | None,
                    conv_bits: int | None, epochs: int | None) -> CompressConfig:
    """``cfg`` with the command-line options applied, every part re-validated (no field is
    assigned directly: each change goes through ``override``/``replace``, which run ``validate``)."""
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0:
        cfg = dataclasses.replace(cfg, prune=None)
    elif sparsity is not None:
        cfg = cfg.override(prune=(cfg.prune or CompressConfig().prune).override(ratio=sparsity))
    cfg = cfg.override(sharing=cfg.sharing.override(bits=bits, conv_bits=conv_bits))
    if epochs is not None:
        cfg = cfg.override(prune_train=cfg.prune_train.override(epochs=epochs),
                           finetune=cfg.finetune.override(epochs=epochs) if cfg.finetune else None)
    return cfg


def register(app: typer.Typer) -> None:
    @app.command("compress")
    @friendly_errors
    def compress_cmd(
        path: Path = typer.Argument(..., help="A trained model file (safetensors checkpoint, ...)."),
        output: Path = typer.Option(..., "--output", "-o", help="The .dsz file to write."),
        data: str = typer.Option("digits", "--data", "-d", help="digits, fashion-mnist, mnist or a dir."),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Directory of IDX files."),
        config: Path | None = typer.Option(None, help="CompressConfig as JSON/YAML."),
        sparsity: float | None = typer.Option(None, help="Fraction of weights pruned (0 = no pruning)."),
        bits: int | None = typer.Option(None, help="k-means bits for dense-layer weights."),
        conv_bits: int | None = typer.Option(None, help="k-means bits for conv weights."),
        epochs: int | None = typer.Option(None, help="Epochs per pruning round and for centroid tuning."),
        stage_dir: Path | None = typer.Option(None, help="Keep every stage's .dsz file here."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Prune -> share (k-means) -> fine-tune centroids -> Huffman-code, with a stage table."""
        from deepshrink.checkpoint import load
        from deepshrink.data import load_dataset
        from deepshrink.sharing.pipeline import compress

        cfg = compress_config(CompressConfig.from_file(config) if config else CompressConfig(),
                              sparsity=sparsity, bits=bits, conv_bits=conv_bits, epochs=epochs)
        refuse_overwrite(output, (path,))
        model = load(path)
        bundle = load_dataset(data, data_dir)
        res = compress(model, bundle, cfg, output, stage_dir=stage_dir)
        if as_json:
            emit_json({"input": str(path), "output": str(output), "config": cfg.to_dict(),
                       **res.to_dict()})
        else:
            res.table.print(out)
            err.print(f"wrote {output} in {res.seconds:.0f} s")

    @app.command("pack")
    @friendly_errors
    def pack_cmd(
        path: Path = typer.Argument(..., help="A model file written by deepshrink."),
        output: Path = typer.Option(..., "--output", "-o", help="The .dsz file to write."),
        bits: int | None = typer.Option(None, help="Share weights with k-means first (bits)."),
        entropy: str = typer.Option("huffman", help="huffman or fixed."),
        codebook_dtype: str = typer.Option("float32", help="float32 or float16 codebooks."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Store a model as a .dsz file (shared weights as coded indices; others raw/sparse)."""
        from deepshrink.checkpoint import load
        from deepshrink.dsz import PackConfig, pack
        from deepshrink.measure import file_bytes
        from deepshrink.sharing import KMeansConfig, share

        model = load(path)
        if bits is not None:
            share(model, KMeansConfig(bits=bits, conv_bits=bits, bias_bits=bits))
        rep = pack(model, output, PackConfig(entropy=entropy, codebook_dtype=codebook_dtype),
                   protect=(path,))
        res = {"input": str(path), "output": str(output), "input_bytes": file_bytes(path),
               "bytes": rep.bytes, "ratio": file_bytes(path) / rep.bytes, **rep.entropy_summary()}
        if as_json:
            emit_json({**res, "tensors": rep.tensors})
        else:
            out.print(f"{path} ({res['input_bytes']} B) -> {output} ({rep.bytes} B, "
                      f"{res['ratio']:.2f}x); coded/entropy {res['payload_over_entropy']:.4f}",
                      highlight=False)

    @app.command("unpack")
    @friendly_errors
    def unpack_cmd(
        path: Path = typer.Argument(..., help="A .dsz file."),
        output: Path = typer.Option(..., "--output", "-o", help="The safetensors file to write."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Decode a .dsz file into a safetensors checkpoint."""
        from deepshrink.dsz import unpack
        from deepshrink.measure import file_bytes

        refuse_overwrite(output, (path,))
        unpack(path, output)
        if as_json:
            emit_json({"input": str(path), "output": str(output), "bytes": file_bytes(output)})
        else:
            out.print(f"{path} -> {output} ({file_bytes(output)} B)", highlight=False)

    @app.command("dsz-info")
    @friendly_errors
    def dsz_info_cmd(
        path: Path = typer.Argument(..., help="A .dsz file."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Manifest and sections table of a .dsz file (checksums verified)."""
        from deepshrink.dsz import dsz_info

        info = dsz_info(path)
        if as_json:
            emit_json(info)
        else:
            print_dsz_info(info)
