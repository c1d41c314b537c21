"""The paper's table (``mmrad eval table``) from hand-built ``metrics.json`` contents."""

import json
import re

import pytest
from matplotlib.container import BarContainer
from typer.testing import CliRunner

from mmrad.cli import app
from mmrad.eval.paper_table import (
    latex_escape,
    latex_table,
    markdown_table,
    paper_rows,
    run_labels,
    table_figure,
    write_table_files,
)
from mmrad.storage import Storage


def part(det, loc, *, det_p=0.5, det_r=0.9, loc_p=None, loc_r=0.3):
    return {"det_accuracy": det, "det_precision": det_p, "det_recall": det_r, "det_f1": None,
            "loc_accuracy": loc, "loc_precision": loc_p, "loc_recall": loc_r, "loc_f1": None,
            "auroc": None, "n_images": 10, "n_anomalous": 5}  # fmt: skip


# base: mvtec and visa, with source_mean; the top level (mean over categories) differs
BASE = {
    **part(0.95, 0.95),
    "per_source": {"mvtec": part(0.8, 0.6), "visa": part(0.6, 0.2, det_p=0.25)},
    "source_mean": part(0.7, 0.4, det_p=0.375),
}
# grpo: visa and real_iad, written before source_mean: its average is computed, and the
# mean over sources (0.6 / 0.1) differs from its mean over categories (0.9 / 0.9)
GRPO = {
    **part(0.9, 0.9),
    "per_source": {"visa": part(0.7, 0.1, loc_p=0.4), "real_iad": part(0.5, None)},
}
RUNS = [("base", BASE), ("grpo", GRPO)]
COLUMNS = ["mvtec", "visa", "real_iad", "Average"]


def markdown_rows(text: str) -> dict[str, list[str]]:
    """Table rows by their first cell (the header under ``Model``)."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_columns_are_the_union_of_sources_then_the_average():
    table = paper_rows(RUNS)
    assert list(table.columns) == COLUMNS
    rows = markdown_rows(markdown_table(RUNS))
    assert rows["Model"] == COLUMNS
    assert rows["base"][2] == "–" and rows["grpo"][0] == "–"  # source not in the run
    assert rows["grpo"][2] == "50.0/–"  # in the run, loc undefined


def test_average_column_is_source_mean():
    rows = markdown_rows(markdown_table(RUNS))
    assert rows["base"][3].replace("*", "") == "70.0/40.0"  # not the 95.0/95.0 overall


def test_average_falls_back_to_mean_over_sources_with_a_footnote():
    text = markdown_table(RUNS)
    assert markdown_rows(text)["grpo"][3].replace("*", "") == "60.0/10.0"  # not 90.0/90.0
    footnote = [line for line in text.splitlines() if "without source_mean" in line]
    assert len(footnote) == 1 and footnote[0].endswith(": grpo.")
    assert "without source_mean" not in markdown_table([("base", BASE)])


def test_best_value_per_column_is_bold_and_a_lone_value_is_not():
    rows = markdown_rows(markdown_table(RUNS))
    assert rows["base"][1] == "60.0/**20.0**" and rows["grpo"][1] == "**70.0**/10.0"
    assert rows["base"][0] == "80.0/60.0"  # mvtec: only base has it
    assert "**" not in markdown_table([("base", BASE)])


def test_with_pr_adds_precision_and_recall():
    rows = markdown_rows(markdown_table(RUNS, with_pr=True))
    assert rows["Model"][:3] == ["mvtec Acc", "mvtec Prec", "mvtec Rec"]
    assert len(rows["Model"]) == 3 * len(COLUMNS) and len(rows["grpo"]) == 3 * len(COLUMNS)
    visa = slice(3, 6)
    assert [c.replace("*", "") for c in rows["base"][visa]] == ["60.0/20.0", "25.0/–", "90.0/30.0"]
    assert [c.replace("*", "") for c in rows["grpo"][visa]] == [
        "70.0/10.0",
        "50.0/40.0",
        "90.0/30.0",
    ]
    # average: grpo's computed precision (50.0) beats 37.5; recall ties, both bold
    assert rows["base"][9:12] == ["**70.0**/**40.0**", "37.5/–", "**90.0**/**30.0**"]
    assert rows["grpo"][9:12] == ["60.0/10.0", "**50.0**/40.0", "**90.0**/**30.0**"]


def latex_rows(text: str) -> list[str]:
    """The lines inside the tabular that are rows (not rules)."""
    body = text.split(r"\begin{tabular}", 1)[1].split(r"\end{tabular}", 1)[0]
    return [line for line in body.splitlines()[1:] if line.endswith(r"\\")]


def row_width(row: str) -> int:
    spans = sum(int(n) - 1 for n in re.findall(r"\\multicolumn\{(\d+)\}", row))
    return len(re.split(r"(?<!\\)&", row)) + spans


@pytest.mark.parametrize("with_pr", [False, True])
def test_latex_is_structurally_sound_and_escaped(with_pr):
    runs = [("base_model 50% & #1", BASE), ("grpo", GRPO)]
    text = latex_table(runs, with_pr=with_pr)
    for env in ("table", "tabular"):
        assert text.count(rf"\begin{{{env}}}") == text.count(rf"\end{{{env}}}") == 1
    assert text.count("{") == text.count("}")
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", text).group(1)
    width = 1 + (3 if with_pr else 1) * len(COLUMNS)
    assert spec == "l" + "c" * (width - 1)
    rows = latex_rows(text)
    assert len(rows) == (3 if with_pr else 2) + 1  # header line(s), then a row per run
    assert all(row_width(row) == width for row in rows)
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert text.count(rule) == 1
    assert rows[-2].startswith(r"base\_model 50\% \& \#1 & ")
    assert r"real\_iad" in text and "without source\\_mean" in text
    assert r"\textbf{70.0}/10.0" in rows[-1]


def test_latex_escape_covers_the_special_characters():
    assert latex_escape(r"a_b%c&d#e$f{g}h~i^j\k") == (
        r"a\_b\%c\&d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
    )


def test_figure_has_a_bar_group_per_column_and_a_bar_per_model():
    rows = paper_rows(RUNS).rows
    axes = table_figure(RUNS).axes
    assert len(axes) == 2
    for ax, key in zip(axes, ("det_accuracy", "loc_accuracy"), strict=True):
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [c.get_label() for c in bars] == ["base", "grpo"]
        for container, row in zip(bars, rows, strict=True):
            centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
            assert [round(x) for x in centres] == list(range(len(COLUMNS)))  # one per group
            expected = [100 * ((cell or {}).get(key) or 0) for cell in row.cells]
            assert [p.get_height() for p in container.patches] == pytest.approx(expected)
    assert [t.get_text() for t in axes[-1].get_xticklabels()] == COLUMNS


def test_write_table_files(tmp_path):
    paths = write_table_files(RUNS, str(tmp_path / "out"), Storage(), with_pr=True)
    assert sorted(paths) == ["figure", "latex", "markdown"]
    out = tmp_path / "out"
    assert (out / "table.md").read_text() == markdown_table(RUNS, with_pr=True)
    assert (out / "table.tex").read_text() == latex_table(RUNS, with_pr=True)
    assert (out / "table.png").read_bytes().startswith(b"\x89PNG")


def test_labels_must_match_the_runs():
    assert run_labels(["runs/eval/a/", "s3://b/eval/b"]) == ["a", "b"]
    pipeline = ["runs/pipeline/local/eval_sft-1a2b3c4d5e/eval", "runs/p/eval-9f8e7d6c5b/eval/"]
    assert run_labels(pipeline) == ["eval_sft-1a2b3c4d5e", "eval-9f8e7d6c5b"]
    assert run_labels(["x", "y"], ["SFT", "GRPO"]) == ["SFT", "GRPO"]
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        run_labels(["x", "y"], ["SFT"])


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture
def run_dirs(tmp_path):
    dirs = []
    for name, metrics in (("eval-base", BASE), ("eval-grpo", GRPO)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics))
        dirs.append(str(folder))
    return dirs


def invoke(*args):
    return CliRunner().invoke(app, ["eval", "table", *args])


def test_cli_prints_the_table(run_dirs):
    result = invoke(*run_dirs)
    assert result.exit_code == 0, result.output
    assert result.stdout == markdown_table([("eval-base", BASE), ("eval-grpo", GRPO)])
    latex = invoke(
        *run_dirs, "--format", "latex", "--with-pr", "--label", "base", "--label", "grpo"
    )
    assert latex.exit_code == 0, latex.output
    assert latex.stdout == latex_table(RUNS, with_pr=True)


def test_cli_out_writes_the_three_files(run_dirs, tmp_path):
    out = tmp_path / "table"
    result = invoke(*run_dirs, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "| eval-base |" in result.stdout
    for name in ("table.md", "table.tex", "table.png"):
        assert (out / name).stat().st_size > 0
        assert f"wrote {out / name}" in result.stderr


def test_cli_missing_run_is_one_line_naming_it(run_dirs, tmp_path):
    missing = str(tmp_path / "eval-nothing")
    result = invoke(run_dirs[0], missing)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0]


def test_cli_label_count_mismatch(run_dirs):
    result = invoke(*run_dirs, "--label", "only-one")
    assert result.exit_code == 2
    assert "1 labels for 2 runs" in result.stderr
