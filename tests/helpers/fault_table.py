"""The README's fault table, from the figures the fault tests recorded in their last run:
``python -m tests.helpers.fault_table --write README.md`` keeps ``runs/faults.json`` as
``docs/faults.json`` (committed) and writes the table from it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tests.helpers.faults import LAST_RUN, ROOT

FIGURES = ROOT / "docs" / "faults.json"

START = "<!-- fault table: python -m tests.helpers.fault_table --write README.md -->"
END = "<!-- end of fault table -->"
COLUMNS = (
    ("fault", "fault"),
    ("stage", "stage"),
    ("outcome", "outcome"),
    ("prompts_lost", "prompts lost"),
    ("samples_repeated_or_skipped", "samples repeated or skipped"),
    ("seconds_to_recover", "seconds to recover"),
)


def render(rows: dict[str, dict[str, Any]]) -> str:
    """One Markdown row per fault test, in the order of their names."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for name in sorted(rows):
        cells = [_cell(rows[name].get(key, "")) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def replace_table(text: str, rows: dict[str, dict[str, Any]]) -> str:
    """``text`` with the part between the table's markers rendered from ``rows``."""
    if START not in text or END not in text:
        raise ValueError(f"the README has no fault table markers ({START} ... {END})")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{render(rows)}\n{END}{after}"


def read_figures(path: Path = FIGURES) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="rewrite this file's table in place")
    args = parser.parse_args()
    if args.write is None:
        print(render(read_figures(LAST_RUN if LAST_RUN.exists() else FIGURES)))
        return
    if LAST_RUN.exists():
        FIGURES.write_text(LAST_RUN.read_text())
    args.write.write_text(replace_table(args.write.read_text(), read_figures()))


if __name__ == "__main__":
    main()
