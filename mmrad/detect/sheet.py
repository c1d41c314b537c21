"""``index.html``: a contact sheet of the detections, most suspicious first.

One card per file, sorted by score (P(Yes)) descending, files without a score after the
scored ones, ties in path order: the overlay as thumbnail (a link to the full PNG),
the path below the input, category, score, verdict, labels and error. One file with its
CSS inline and only relative links (``overlays/...``, ``detections.csv``), so the output
folder can be copied, zipped or served as it is. Every text is HTML-escaped and every
link URL-quoted: file names and model answers are not to be trusted.

A notebook or a generated Markdown page were rejected: neither shows a few hundred
images at a glance in any browser without software.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

SHEET_NAME = "index.html"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.summary { color: #555; margin-top: 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr));
        gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin: 0;
        background: #fafafa; }
.card.anomalous { border-color: #d33; background: #fff4f4; }
.card.failed { border-color: #999; background: #eee; }
.card img { width: 100%; height: 200px; object-fit: contain; background: #fff; }
.noimage { height: 200px; display: flex; align-items: center; justify-content: center;
           color: #888; background: #fff; }
.path { font-family: ui-monospace, monospace; font-size: 0.85em; word-break: break-all; }
.verdict { font-weight: bold; }
.anomalous .verdict { color: #c00; }
.error { color: #a00; font-size: 0.85em; word-break: break-word; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 8px; margin: 6px 0 0; }
dt { color: #777; } dd { margin: 0; }
"""


def sort_for_sheet(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Score descending; rows without a score last; ties by path."""
    return sorted(rows, key=lambda r: (r.get("score") is None, -(r.get("score") or 0.0),
                                       str(r.get("path"))))  # fmt: skip


def verdict_text(row: Mapping[str, Any]) -> str:
    if row.get("error"):
        return "error"
    return {True: "anomalous", False: "normal"}.get(row.get("anomalous"), "no answer")


def contact_sheet(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
    details: Mapping[str, str],
) -> str:
    """The whole HTML page. ``rows`` are detection rows plus ``relative`` (the path
    below the input); ``details`` are shown under the title (model, threshold, ...)."""
    counts = _counts(rows)
    files = counts.pop("files")
    summary = f"{files} files: " + ", ".join(f"{n} {what}" for what, n in counts.items())
    facts = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in details.items())
    cards = "\n".join(_card(rank, row) for rank, row in enumerate(sort_for_sheet(rows), 1))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="summary">{_e(summary)}. Sorted by score (P(Yes)), highest first. {facts}</p>
<p><a href="detections.csv">detections.csv</a> ·
<a href="detections.parquet">detections.parquet</a></p>
<div class="grid">
{cards}
</div>
</body>
</html>
"""


def _counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    verdicts = [verdict_text(row) for row in rows]
    return {"files": len(rows), "anomalous": verdicts.count("anomalous"),
            "normal": verdicts.count("normal"), "without an answer": verdicts.count("no answer"),
            "failed": verdicts.count("error")}  # fmt: skip


def _card(rank: int, row: Mapping[str, Any]) -> str:
    verdict = verdict_text(row)
    kind = {"anomalous": " anomalous", "error": " failed"}.get(verdict, "")
    shown = str(row.get("relative") or row.get("path"))
    overlay = row.get("overlay")
    if overlay:
        href = _e(quote(str(overlay)))
        picture = f'<a href="{href}"><img src="{href}" alt="{_e(shown)}" loading="lazy"></a>'
    else:
        picture = '<div class="noimage">no image</div>'
    score = row.get("score")
    facts = {
        "category": _e(row.get("category") or "–"),
        "score": f"{score:.4f}" if score is not None else "–",
        "verdict": f'<span class="verdict">{_e(verdict)}</span>',
        "labels": _e(", ".join(row.get("labels") or []) or "–"),
    }
    items = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts.items())
    error = f'<div class="error">{_e(row["error"])}</div>' if row.get("error") else ""
    return (
        f'<figure class="card{kind}" data-rank="{rank}" data-path="{_e(str(row.get("path")))}" '
        f'data-score="{"" if score is None else score}">{picture}'
        f'<figcaption><div class="path">#{rank} {_e(shown)}</div><dl>{items}</dl>{error}'
        "</figcaption></figure>"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
