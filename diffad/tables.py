"""Tables: every markdown and HTML table of the library and the book comes from here.

Builders elsewhere (Table 1, ablations, sweeps, the widgets' labels) decide what goes in each
cell; these functions decide how a table is written, once. This module imports nothing else from
diffad.
"""

from __future__ import annotations

import html
from typing import Iterable, Sequence

import numpy as np

__all__ = ["markdown_table", "records_markdown", "html_table"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], notes: Sequence[str] = ()) -> str:
    """A markdown table: ``header`` cells, then one line per row of cells; ``notes`` below, after a blank line."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


MISSING = "-"  # the cell of a column a row lacks


def records_markdown(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """Rows of dicts as a markdown table (floats rounded to ``digits``), for ``IPython.display.Markdown``.

    ``columns`` defaults to the first row's keys. A row without a column shows ``-`` there (MVTec-AD's categories have different defect kinds: a table of kinds by
    category has gaps)."""
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    columns = list(columns or rows[0])

    def cell(value) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)

    return markdown_table(columns, [[cell(row.get(c, MISSING)) for c in columns] for row in rows])


def html_table(header: Sequence[str], rows: Iterable[Sequence], caption: str | None = None,
               cell_attributes: str = "") -> str:
    """An HTML table (cells escaped), e.g. for an ipywidgets label or a static page;
    ``cell_attributes`` go into every ``<th>`` and ``<td>`` (e.g. a style)."""
    head = "".join(f"<th{cell_attributes}>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{cell_attributes}>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    caption = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
