"""``mmrad eval table RUN...``: evaluation runs as the paper's table.

Rows are models (runs), columns the source data sets (their union, first seen first)
and the average over sources; each cell is detection/localisation (``det/loc``) in %,
accuracy and optionally precision and recall. The best value of each column is bold.
Rendered as Markdown, as LaTeX (booktabs) and as a figure of grouped bars.

The average is the mean over sources (``source_mean`` in ``metrics.json``), not the
overall mean over categories: a source with many categories would otherwise weigh more.
Runs written before ``source_mean`` existed get it computed from ``per_source``, and the
table says so in a footnote.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from mmrad.eval.compare import read_metrics, run_label
from mmrad.eval.report import MISSING, _pct, markdown_row, png_bytes
from mmrad.storage import Storage, join
from mmrad.task.metrics import RATE_KEYS, mean_defined

AVERAGE = "Average"
TABLE_MD, TABLE_TEX, TABLE_PNG = "table.md", "table.tex", "table.png"
PARTS = ("det", "loc")
ACCURACY_ONLY = ("accuracy",)
WITH_PR = ("accuracy", "precision", "recall")
RATE_HEADERS = {"accuracy": "Acc", "precision": "Prec", "recall": "Rec"}
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}  # fmt: skip
COMPUTED_NOTE = "Average computed from the per-source values (metrics.json without source_mean)"


@dataclass(frozen=True)
class PaperRow:
    label: str
    cells: tuple[Mapping[str, Any] | None, ...]  # one per column; None: source not in run
    average_computed: bool  # the run has no source_mean


@dataclass(frozen=True)
class PaperTable:
    columns: tuple[str, ...]  # the sources, then AVERAGE
    rows: tuple[PaperRow, ...]

    @property
    def computed_average(self) -> list[str]:
        """Labels of the runs whose average was computed here."""
        return [row.label for row in self.rows if row.average_computed]


def paper_rows(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> PaperTable:
    """The table's content from ``(label, metrics)`` pairs, in that order."""
    sources = list(dict.fromkeys(s for _, m in runs for s in m.get("per_source", {})))
    rows = []
    for label, metrics in runs:
        per_source = metrics.get("per_source", {})
        average, computed = source_average(metrics)
        cells = (*(per_source.get(source) for source in sources), average)
        rows.append(PaperRow(label, cells, computed))
    return PaperTable((*sources, AVERAGE), tuple(rows))


def source_average(metrics: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """The mean over sources, and whether it had to be computed (no ``source_mean``)."""
    if "source_mean" in metrics:
        return metrics["source_mean"], False
    parts = list(metrics.get("per_source", {}).values())
    return {key: mean_defined([part.get(key) for part in parts]) for key in RATE_KEYS}, True


# ------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _Style:
    bold: Callable[[str], str]
    missing: str
    escape: Callable[[str], str]


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def _markdown_escape(text: str) -> str:
    return text.replace("|", r"\|")


MARKDOWN = _Style(lambda text: f"**{text}**", MISSING, _markdown_escape)
LATEX = _Style(lambda text: rf"\textbf{{{text}}}", "--", latex_escape)


def _rates(with_pr: bool) -> tuple[str, ...]:
    return WITH_PR if with_pr else ACCURACY_ONLY


def _shown(value: float | None) -> float | None:
    """The value as the table shows it (% to one decimal): ties are judged on that."""
    return None if value is None else round(100 * value, 1)


def _best(table: PaperTable, rates: Sequence[str]) -> dict[tuple[int, str], float]:
    """The highest shown value per (column, metric key) that at least two runs have:
    bold on a lone value would compare it with nothing."""
    shown: dict[tuple[int, str], list[float]] = {}
    for row in table.rows:
        for column, cell in enumerate(row.cells):
            for key in (f"{part}_{rate}" for rate in rates for part in PARTS):
                value = _shown((cell or {}).get(key))
                if value is not None:
                    shown.setdefault((column, key), []).append(value)
    return {where: max(values) for where, values in shown.items() if len(values) > 1}


def _cell(
    cell: Mapping[str, Any] | None,
    column: int,
    rate: str,
    best: Mapping[tuple[int, str], float],
    style: _Style,
) -> str:
    """``det/loc`` of one rate, each part bold where it is the column's best."""
    if cell is None:
        return style.missing
    texts = []
    for key in (f"{part}_{rate}" for part in PARTS):
        value = cell.get(key)
        if value is None:
            texts.append(style.missing)
        else:
            is_best = best.get((column, key)) == _shown(value)
            texts.append(style.bold(_pct(value)) if is_best else _pct(value))
    return "/".join(texts)


def _body(table: PaperTable, with_pr: bool, style: _Style) -> list[list[str]]:
    """One list of cell texts per row, the (escaped) label first."""
    rates = _rates(with_pr)
    best = _best(table, rates)
    return [
        [style.escape(row.label)]
        + [_cell(cell, c, rate, best, style) for c, cell in enumerate(row.cells) for rate in rates]
        for row in table.rows
    ]


def _notes(table: PaperTable, with_pr: bool) -> list[str]:
    rates = ", ".join(_rates(with_pr))
    notes = [
        f"Detection/localisation (det/loc) {rates} in %; {AVERAGE} = mean over sources; "
        "bold = best per column; missing or undefined values are dashes."
    ]
    if table.computed_average:
        notes.append(f"{COMPUTED_NOTE}: {', '.join(table.computed_average)}.")
    return notes


# ---------------------------------------------------------------------------- renderers


def markdown_table(runs: Sequence[tuple[str, Mapping[str, Any]]], *, with_pr: bool = False) -> str:
    """The table in Markdown, its notes underneath."""
    table = paper_rows(runs)
    rates = _rates(with_pr)
    header = ["Model"] + [
        _markdown_escape(column if not with_pr else f"{column} {RATE_HEADERS[rate]}")
        for column in table.columns
        for rate in rates
    ]
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    lines += [markdown_row(cells) for cells in _body(table, with_pr, MARKDOWN)]
    return "\n".join(lines) + "\n\n" + "\n\n".join(_notes(table, with_pr)) + "\n"


def latex_table(runs: Sequence[tuple[str, Mapping[str, Any]]], *, with_pr: bool = False) -> str:
    """The table as a LaTeX ``table`` float (needs ``\\usepackage{booktabs}``)."""
    table = paper_rows(runs)
    width = len(_rates(with_pr))
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\begin{{tabular}}{{l{'c' * width * len(table.columns)}}}",
        r"\toprule",
        *_latex_header(table.columns, with_pr),
        r"\midrule",
        *(_latex_row(cells) for cells in _body(table, with_pr, LATEX)),
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{' '.join(latex_escape(note) for note in _notes(table, with_pr))}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def _latex_header(columns: Sequence[str], with_pr: bool) -> list[str]:
    names = [latex_escape(column) for column in columns]
    if not with_pr:
        return [_latex_row(["Model", *names])]
    width = len(WITH_PR)
    spans = [rf"\multicolumn{{{width}}}{{c}}{{{name}}}" for name in names]
    rules = [
        rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(columns))
    ]
    rates = [RATE_HEADERS[rate] for rate in WITH_PR] * len(columns)
    return [_latex_row(["Model", *spans]), "".join(rules), _latex_row(["", *rates])]


def _latex_row(cells: Sequence[str]) -> str:
    return " & ".join(cells) + r" \\"


# ------------------------------------------------------------------------------- figure


def table_figure(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> Figure:
    """Grouped bars, one panel each for detection and localisation accuracy: a group
    per column (sources and the average), a bar per model."""
    table = paper_rows(runs)
    n_columns, n_rows = len(table.columns), len(table.rows)
    width = 0.8 / max(1, n_rows)
    figure = Figure(figsize=(max(6.0, 0.35 * n_columns * n_rows + 2.5), 6.5), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    for ax, part, title in zip(axes, PARTS, ("Detection", "Localisation"), strict=True):
        key = f"{part}_accuracy"
        for i, row in enumerate(table.rows):
            values = [(cell or {}).get(key) for cell in row.cells]
            offsets = [c - 0.4 + width * (i + 0.5) for c in range(n_columns)]
            # a missing value: no bar, but its dash label, so it does not read as 0
            heights = [0.0 if v is None else 100 * v for v in values]
            bars = ax.bar(offsets, heights, width=width, label=row.label)
            ax.bar_label(bars, labels=[_pct(v) for v in values], fontsize=6)
        ax.set_title(f"{title} accuracy")
        ax.set_ylabel("%")
        ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(n_columns), table.columns)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=min(n_rows, 4))
    return figure


# -------------------------------------------------------------------------------- files


def _folder_label(uri: str) -> str:
    label = run_label(uri)
    parent = uri.rstrip("/").rsplit("/", 2)
    return parent[-2] if label == "eval" and len(parent) == 3 else label


def run_labels(run_uris: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """``labels``, one per run, or else each run folder's name (a pipeline's evaluation
    runs are all named ``eval``: theirs is the stage folder's, e.g. ``eval_sft-1a2b…``)."""
    if not labels:
        return [_folder_label(uri) for uri in run_uris]
    if len(labels) != len(run_uris):
        raise ValueError(
            f"{len(labels)} labels for {len(run_uris)} runs: give one label per run or none"
        )
    return list(labels)


def read_runs(
    run_uris: Sequence[str], storage: Storage, labels: Sequence[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """``(label, metrics)`` of the runs at ``run_uris``, in that order."""
    if not run_uris:
        raise ValueError("the table needs at least one run")
    names = run_labels(run_uris, labels)
    return [(name, read_metrics(storage, uri)) for name, uri in zip(names, run_uris, strict=True)]


def write_table_files(
    runs: Sequence[tuple[str, Mapping[str, Any]]],
    out: str,
    storage: Storage,
    *,
    with_pr: bool = False,
) -> dict[str, str]:
    """Write ``table.md``, ``table.tex`` and ``table.png`` into ``out`` (a local folder
    or object-store prefix); returns their URIs by format (markdown, latex, figure)."""
    uris = {"markdown": join(out, TABLE_MD), "latex": join(out, TABLE_TEX),
            "figure": join(out, TABLE_PNG)}  # fmt: skip
    storage.write_text(uris["markdown"], markdown_table(runs, with_pr=with_pr))
    storage.write_text(uris["latex"], latex_table(runs, with_pr=with_pr))
    storage.write_bytes(uris["figure"], png_bytes(table_figure(runs)))
    return uris
