"""The ``mmrad`` command line. Every command takes ``--config FILE`` and ``key.sub=value``
overrides (explicit flags win over both) and ``--print-config``. A bad config exits 2 and
another error you cause exits 1, each with one line (as ``python -m ray_jobs.<job>``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from mmrad.config import DataJobConfig, SFTJobConfig, dump_config, load_config
from mmrad.jobs import PRINT_CONFIG_HELP, exits_on_user_errors, print_result


class UserErrorsExit(TyperGroup):
    """The ``mmrad`` group: every command's user errors end as :mod:`mmrad.jobs` says,
    under ``mmrad`` and typer's ``CliRunner`` alike."""

    def invoke(self, ctx):
        with exits_on_user_errors():
            return super().invoke(ctx)


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, cls=UserErrorsExit)
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect data sets.")
s3_app = typer.Typer(no_args_is_help=True, help="A local S3 server for trying things out.")
app.add_typer(data_app, name="data")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(s3_app, name="s3")
app.add_typer(model_app, name="model")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models; reports; compare runs.")
app.add_typer(eval_app, name="eval")
console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides.")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help=PRINT_CONFIG_HELP)]


def _load(model, config: Path | None, overrides: list[str] | None, flags: dict, print_config=False):
    """Config file, then overrides, then explicit flags (those not None); with
    ``print_config`` the resolved config is printed and the command ends here."""
    extra = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    job = load_config(model, config, [*(overrides or []), *extra])
    if print_config:
        _print_and_exit(dump_config(job))
    return job


def _print_and_exit(text: str) -> None:
    typer.echo(text, nl=False)
    raise typer.Exit(0)


def _show_version(value: bool) -> None:
    if value:
        import mmrad

        _print_and_exit(f"mmrad {mmrad.__version__}\n")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True,
                     help="Print mmrad's version and exit."),
    ] = False,
) -> None:  # fmt: skip
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@data_app.command("build")
def data_build(
    config: ConfigOption = None,
    overrides: Overrides = None,
    source: Annotated[str | None, typer.Option(help="synthetic|mvtec|visa|mmrad")] = None,
    input: Annotated[str | None, typer.Option("--input", help="Raw data set folder.")] = None,
    out: Annotated[
        str | None, typer.Option(help="Output folder or object-store URI (s3://, gs://, abfs://).")
    ] = None,
    print_config: PrintConfig = False,
) -> None:
    """Build a data set: images under OUT and OUT/manifest.parquet."""
    from mmrad.data.build import build_dataset
    from mmrad.storage import Storage

    flags = {"data.source": source, "data.input": input, "data.out": out}
    job = _load(DataJobConfig, config, overrides, flags, print_config)
    started = time.perf_counter()
    result = build_dataset(job.data, Storage.from_config(job.storage))
    elapsed = time.perf_counter() - started
    console.print(
        f"wrote {result.records} records to {result.manifest_uri} in {elapsed:.1f} s"
        + (f" ({len(result.skipped)} bad inputs skipped)" if result.skipped else "")
    )


@data_app.command("stats")
def data_stats(
    uri: Annotated[str, typer.Argument(help="Data set folder or manifest URI.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    print_config: PrintConfig = False,
) -> None:
    """Counts per source, category and split; anomaly ratio; boxes per image."""
    from mmrad.data.manifest import read_manifest, read_split_info
    from mmrad.data.stats import manifest_stats
    from mmrad.storage import Storage

    job = _load(DataJobConfig, config, overrides, {}, print_config)
    storage = Storage.from_config(job.storage)
    stats = manifest_stats(read_manifest(storage, uri), read_split_info(storage, uri))
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    print_stats(stats)


def print_stats(stats: dict) -> None:
    table = Table(title=f"{stats['images']} images, anomaly ratio {stats['anomaly_ratio']:.2f}")
    for column in ("source/category", "train", "val", "test", "anomalous", "boxes/img"):
        table.add_column(column, justify="left" if column == "source/category" else "right")
    for key, row in stats["categories"].items():
        table.add_row(
            key,
            *(str(row[split]) for split in ("train", "val", "test")),
            f"{row['anomaly_ratio']:.2f}",
            f"{row['boxes_per_anomalous_image']:.2f}",
        )
    Console().print(table)
    Console().print(f"split: {split_summary(stats['split'])}")
    if stats["train_test_overlap"]:
        overlap = ", ".join(stats["train_test_overlap"])
        published = (stats["split"] or {}).get("mode") == "published"
        why = "published splits: tested as seen categories" if published else "not unseen"
        Console(soft_wrap=True).print(
            f"[yellow]seen in both train and test ({why}):[/yellow] {overlap}"
        )


def split_summary(split: dict | None) -> str:
    if split is None:
        return "not recorded (a manifest written before split modes)"
    held = [*split.get("test_sources", []), *split.get("test_categories", [])]
    held_out = ", ".join(held) if held else "nothing"
    return f"mode {split['mode']}, held out: {held_out}"


@s3_app.command("local")
def s3_local(
    data_dir: Annotated[Path, typer.Option(help="Where the server keeps objects.")] = Path(
        "runs/s3"
    ),
    port: Annotated[int, typer.Option(help="S3 port on 127.0.0.1.")] = 8333,
    bucket: Annotated[list[str] | None, typer.Option(help="Buckets to create.")] = None,
) -> None:
    """Run SeaweedFS on 127.0.0.1 until Ctrl-C (credentials from AWS_* variables)."""
    from mmrad.s3local import LocalS3, LocalS3Error
    from mmrad.storage import Storage

    server = LocalS3(data_dir, port)
    try:
        server.start()
    except LocalS3Error as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    storage = Storage(endpoint_url=server.endpoint_url)
    for name in bucket or []:
        storage.ensure_bucket(f"s3://{name}")
    console.print(f"S3 ready: export AWS_ENDPOINT_URL={server.endpoint_url}  (Ctrl-C stops it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while server.process and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@model_app.command("tiny")
def model_tiny(
    out: Annotated[Path, typer.Option(help="Folder for the HF model directory.")] = Path(
        "runs/models/tiny"
    ),
    seed: Annotated[int, typer.Option(help="Weights seed (same seed, same bytes).")] = 0,
) -> None:
    """Build the tiny random Qwen2.5-VL-shaped model used by tests and the local demo."""
    from mmrad.model.tiny import build_tiny_model

    console.print(f"tiny model at {build_tiny_model(out, seed)}")


@app.command("sft")
def sft(
    config: ConfigOption = None, overrides: Overrides = None, print_config: PrintConfig = False
) -> None:
    """Supervised fine-tuning on Ray Train (FSDP, LoRA); resumes a run of the same name."""
    from mmrad.sft.job import run_sft

    print_result(run_sft(_load(SFTJobConfig, config, overrides, {}, print_config)))


@eval_app.command("run")
def eval_run(
    config: ConfigOption = None, overrides: Overrides = None, print_config: PrintConfig = False
) -> None:
    """Batch evaluation on Ray Data (vLLM actors or an OpenAI-compatible endpoint): writes
    predictions.parquet and, with labels, metrics.json and report.md to the run directory."""
    from mmrad.eval.config import EvalJobConfig
    from mmrad.eval.job import run_eval

    print_result(run_eval(_load(EvalJobConfig, config, overrides, {}, print_config)))


@eval_app.command("report")
def eval_report(
    run_uri: Annotated[
        str, typer.Argument(help="Evaluation run directory (local or object store).")
    ],
    manifest: Annotated[str | None, typer.Option(help="Manifest (default: the run's).")] = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
    print_config: PrintConfig = False,
) -> None:
    """Render metrics.json and report.md again from predictions.parquet and the manifest."""
    from mmrad.eval.config import EvalJobConfig
    from mmrad.eval.job import rerender_report
    from mmrad.storage import Storage

    job = _load(EvalJobConfig, config, overrides, {}, print_config)
    metrics = rerender_report(run_uri, Storage.from_config(job.storage), manifest)
    console.print(f"report written to {run_uri} ({metrics['n_images']} images)")


@eval_app.command("compare")
def eval_compare(
    run_uris: Annotated[list[str], typer.Argument(help="Evaluation run directories.")],
    out: Annotated[Path | None, typer.Option(help="Also write the table to this file.")] = None,
    config: ConfigOption = None,
    print_config: PrintConfig = False,
) -> None:
    """Several evaluation runs side by side in one markdown table."""
    from mmrad.eval.compare import compare_runs
    from mmrad.eval.config import EvalJobConfig
    from mmrad.storage import Storage

    job = _load(EvalJobConfig, config, [], {}, print_config)
    table = compare_runs(run_uris, Storage.from_config(job.storage))
    if out is not None:
        Storage().write_text(str(out), table)
    typer.echo(table)


class TableFormat(StrEnum):
    markdown = "markdown"
    latex = "latex"


@eval_app.command("table")
def eval_table(
    run_uris: Annotated[list[str], typer.Argument(help="Evaluation run directories (rows).")],
    label: Annotated[
        list[str] | None, typer.Option(help="Row label, once per run (default: folder name).")
    ] = None,
    with_pr: Annotated[bool, typer.Option("--with-pr", help="Add precision and recall.")] = False,
    table_format: Annotated[
        TableFormat, typer.Option("--format", help="What to print.")
    ] = TableFormat.markdown,
    out: Annotated[
        str | None, typer.Option(help="Also write table.md, table.tex, table.png here.")
    ] = None,
    config: ConfigOption = None,
    print_config: PrintConfig = False,
) -> None:
    """The paper's table: a row per run, a column per source and the mean over sources,
    det/loc accuracy in % (bold: best per column)."""
    from mmrad.eval import paper_table
    from mmrad.eval.config import EvalJobConfig
    from mmrad.storage import Storage

    job = _load(EvalJobConfig, config, [], {}, print_config)
    try:
        labels = paper_table.run_labels(run_uris, label)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--label'") from None
    storage = Storage.from_config(job.storage)
    runs = paper_table.read_runs(run_uris, storage, labels)
    render = {TableFormat.markdown: paper_table.markdown_table,
              TableFormat.latex: paper_table.latex_table}[table_format]  # fmt: skip
    typer.echo(render(runs, with_pr=with_pr), nl=False)
    if out is not None:
        for path in paper_table.write_table_files(runs, out, storage, with_pr=with_pr).values():
            typer.echo(f"wrote {path}", err=True)


@app.command("annotate")
def annotate(
    config: ConfigOption = None, overrides: Overrides = None, print_config: PrintConfig = False
) -> None:
    """Chain-of-thought annotation by a teacher model shown the ground truth; writes a new
    manifest (the input is never modified), rejected.parquet, acceptance.json and a report."""
    from mmrad.annotate.config import AnnotateJobConfig
    from mmrad.annotate.job import run_annotate

    print_result(run_annotate(_load(AnnotateJobConfig, config, overrides, {}, print_config)))


@app.command("detect")
def detect(
    path: Annotated[
        str, typer.Argument(help="Folder or object-store prefix of images, or one image.")
    ],
    overrides: Overrides = None,
    config: ConfigOption = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Exported model (local or object store).")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint URL (up to /v1) instead.")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="The endpoint's model name (mmrad).")
    ] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", help="Output folder or object-store URI (s3://, gs://, abfs://)."),
    ] = None,
    category: Annotated[
        str | None, typer.Option(help="Category of every image (else its folder's name).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Normal image for all categories, or a folder of <category>.png."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="anomalous = P(Yes) >= this (else the answer's Yes/No).")
    ] = None,
    print_config: PrintConfig = False,
) -> None:
    """Inspect every image under PATH: writes detections.parquet, detections.csv, overlay
    PNGs and index.html (a contact sheet, most suspicious first) to --out."""
    from mmrad.detect.config import DetectJobConfig, target_overrides
    from mmrad.detect.job import run_detect

    targets = target_overrides(model, endpoint, model_name)
    flags = {"input": path, "output": out, "category": category, "reference": reference,
             "threshold": threshold}  # fmt: skip
    job = _load(DetectJobConfig, config, [*targets, *(overrides or [])], flags, print_config)
    print_result(run_detect(job))


@app.command("grpo")
def grpo(
    config: ConfigOption = None, overrides: Overrides = None, print_config: PrintConfig = False
) -> None:
    """GRPO on Ray: vLLM rollout engines, FSDP2 learners (LoRA or full weights); resumes a
    run of the same name."""
    from mmrad.rl.config import GRPOJobConfig
    from mmrad.rl.job import run_grpo

    print_result(run_grpo(_load(GRPOJobConfig, config, overrides, {}, print_config)))


@app.command("tune")
def tune(
    config: ConfigOption = None, overrides: Overrides = None, print_config: PrintConfig = False
) -> None:
    """Sweep GRPO reward weights (and more) on Ray Tune with ASHA; writes results.csv/.md,
    objective.png and best_grpo.yaml; rerunning the same sweep resumes it."""
    from mmrad.tune.config import TuneJobConfig
    from mmrad.tune.job import run_tune

    print_result(run_tune(_load(TuneJobConfig, config, overrides, {}, print_config)))


@app.command("serve")
def serve_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="Serve config (Ray's schema).")],
    overrides: Overrides = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster (default: start one).")] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved Serve file and exit.")
    ] = False,
) -> None:
    """Deploy a Serve config file (as `serve run FILE`) and block until Ctrl-C or SIGTERM
    (then stops within about 10 s, with the local Ray it started). Overrides enter lists by
    index or name: applications.mmrad.args.model_dir=DIR."""
    from mmrad.config import RayConfig
    from mmrad.serve.config import load_serve_file
    from mmrad.serve.deploy import dump_serve_file, run_serve

    serve_file = load_serve_file(config, overrides or [])
    if print_config:
        _print_and_exit(dump_serve_file(serve_file))
    run_serve(serve_file, RayConfig(address=address), announce=console.print)


@app.command("pipeline")
def pipeline(
    config: ConfigOption = None, overrides: Overrides = None, print_config: PrintConfig = False
) -> None:
    """The whole method: tiny model → data → SFT → GRPO → evaluation → serving smoke test;
    stages whose config and inputs are unchanged are skipped."""
    from mmrad.config import PipelineConfig
    from mmrad.pipeline import dump_pipeline, print_summary, run_pipeline

    job = _load(PipelineConfig, config, overrides, {})
    if print_config:
        _print_and_exit(dump_pipeline(job))
    print_summary(run_pipeline(job))


def run() -> None:
    """Console entry point (``mmrad``)."""
    app()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run()
