"""Deep Compression commands: compress, pack, unpack, dsz-info."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from deepshrink import distributed
from deepshrink.cli.common import DEVICE_OPTION, JSON_OPTION, emit_json, err, friendly_errors, out
from deepshrink.cli.core import DATASET
from deepshrink.cli.guards import (
    FORCE,
    MAX_DROP,
    Warnings,
    check_drop,
    check_size,
    commit,
    ratio_text,
    staged,
)
from deepshrink.cli.modelio import data_extra, load_model, model_data, recorded_data
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
                    conv_bits: int | None, epochs: int | None,
                    device: str | None = None, progress: bool = False) -> CompressConfig:
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
    if device is not None:  # every fine-tune of the pipeline trains there
        cfg = cfg.override(prune_train=cfg.prune_train.override(device=device),
                           finetune=cfg.finetune.override(device=device) if cfg.finetune else None,
                           prune_final=cfg.prune_final.override(device=device) if cfg.prune_final else None)
    if progress:  # every fine-tune shows its bar / status lines
        cfg = cfg.override(prune_train=cfg.prune_train.override(progress=True),
                           finetune=cfg.finetune.override(progress=True) if cfg.finetune else None,
                           prune_final=cfg.prune_final.override(progress=True) if cfg.prune_final else None)
    return cfg


def _share_guarded(model: Any, path: Path, bits: int | None, data: str | None,
                   max_drop: float | None, force: bool, output: Path, warns: Warnings) -> float | None:
    """k-means weight sharing (lossy) when ``bits`` is given, checked against ``max_drop``."""
    from deepshrink.sharing import KMeansConfig, share
    from deepshrink.train import evaluate

    if bits is None:
        return None
    bundle = model_data(path, data)
    from deepshrink.progress import step

    with step(f"k-means weight sharing ({bits} bits) and evaluation"):
        before = evaluate(model, bundle.loader("test", 512))["top1"]
        share(model, KMeansConfig(bits=bits, conv_bits=bits, bias_bits=bits))
        after = evaluate(model, bundle.loader("test", 512))["top1"]
    return check_drop(before, after, max_drop, force, output, warns)


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``.

    Long only because typer declares each CLI option as a parameter of the nested command
    function (one per option); the work is done by this module's short helpers.
    """
    @app.command("compress")
    @friendly_errors
    def compress_cmd(
        path: Path = typer.Argument(..., help="A trained model file (safetensors checkpoint, ...)."),
        output: Path = typer.Option(..., "--output", "-o", help="The .dsz file to write."),
        data: str | None = DATASET,
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Directory of IDX files."),
        config: Path | None = typer.Option(None, help="CompressConfig as JSON/YAML."),
        sparsity: float | None = typer.Option(None, help="Fraction of weights pruned (0 = no pruning)."),
        bits: int | None = typer.Option(None, help="k-means bits for dense-layer weights."),
        conv_bits: int | None = typer.Option(None, help="k-means bits for conv weights."),
        epochs: int | None = typer.Option(None, help="Epochs per pruning round and for centroid tuning."),
        stage_dir: Path | None = typer.Option(None, help="Keep every stage's .dsz file here."),
        max_drop: float | None = MAX_DROP,
        force: bool = FORCE,
        device: str | None = DEVICE_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Prune -> share (k-means) -> fine-tune centroids -> Huffman-code, with a stage table.
        Fine-tunes data-parallel when launched by torchrun; only rank 0 writes files. Refuses to
        write a result past --max-drop."""
        from deepshrink.sharing.pipeline import compress

        cfg = compress_config(CompressConfig.from_file(config) if config else CompressConfig(),
                              sparsity=sparsity, bits=bits, conv_bits=conv_bits, epochs=epochs,
                              device=device, progress=not as_json)
        model, warns = load_model(path), Warnings()
        bundle = model_data(path, data, data_dir)
        with staged(output, (path,)) as tmp:
            res = compress(model, bundle, cfg, tmp, stage_dir=stage_dir, extra=data_extra(bundle))
            rows = res.table.rows
            drop = check_drop(rows[0]["top1"], rows[-1]["top1"], max_drop, force, output, warns)
            distributed.on_main(commit, tmp, output)
        if as_json:
            emit_json({"input": str(path), "output": str(output), "config": cfg.to_dict(),
                       "drop_pt": drop, "warnings": warns, **res.to_dict()})
        else:
            res.table.print(out)
            if distributed.is_main():  # other torchrun ranks wrote nothing
                err.print(f"wrote {output} in {res.seconds:.0f} s")

    @app.command("pack")
    @friendly_errors
    def pack_cmd(
        path: Path = typer.Argument(..., help="A model file written by deepshrink."),
        output: Path = typer.Option(..., "--output", "-o", help="The .dsz file to write."),
        bits: int | None = typer.Option(None, help="Share weights with k-means first (bits)."),
        entropy: str = typer.Option("huffman", help="huffman or fixed."),
        codebook_dtype: str = typer.Option("float32", help="float32 or float16 codebooks."),
        data: str | None = DATASET,
        max_drop: float | None = MAX_DROP,
        force: bool = FORCE,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Store a model as a .dsz file (shared weights as coded indices; others raw/sparse).
        With --bits (lossy), refuses to write a result past --max-drop."""
        from deepshrink.dsz import PackConfig, pack
        from deepshrink.measure import file_bytes

        model, warns = load_model(path), Warnings()
        rec = recorded_data(path)
        extra = {"data": rec.to_dict()} if rec else {}
        with staged(output, (path,)) as tmp:
            drop = _share_guarded(model, path, bits, data, max_drop, force, output, warns)
            rep = pack(model, tmp, PackConfig(entropy=entropy, codebook_dtype=codebook_dtype),
                       extra=extra, protect=(path,))
            commit(tmp, output)
        res = {"input": str(path), "output": str(output), "input_bytes": file_bytes(path),
               "bytes": rep.bytes, "ratio": file_bytes(path) / rep.bytes, "drop_pt": drop,
               **rep.entropy_summary()}
        check_size(res["input_bytes"], rep.bytes, warns)
        if as_json:
            emit_json({**res, "tensors": rep.tensors, "warnings": warns})
        else:
            out.print(f"{path} ({res['input_bytes']:,} B) -> {output} ({rep.bytes:,} B, "
                      f"{ratio_text(res['input_bytes'], rep.bytes)}); coded/entropy "
                      f"{res['payload_over_entropy']:.4f}", highlight=False)

    @app.command("unpack")
    @friendly_errors
    def unpack_cmd(
        path: Path = typer.Argument(..., help="A .dsz file."),
        output: Path = typer.Option(..., "--output", "-o", help="The safetensors file to write."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Decode a .dsz file into a safetensors checkpoint."""
        from deepshrink.checkpoint import save
        from deepshrink.dsz import unpack
        from deepshrink.measure import file_bytes

        refuse_overwrite(output, (path,))
        rec = recorded_data(path)
        if rec is None:
            unpack(path, output)
        else:  # keep the data record (a rebuildable model: the file records its spec)
            save(load_model(path), output, extra={"data": rec.to_dict(), "unpacked_from": path.name},
                 protect=(path,))
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
