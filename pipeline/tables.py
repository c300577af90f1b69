"""Tables for people (rich): one row per line whatever the terminal, long cells cut with "…".

Scripts read `--json` instead; this is the human view of `memoir queue`, `memoir ledger list`
and the demo's ledger.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click


def render(header: Sequence[str], rows: Iterable[Sequence[Any]], *, max_width: int = 48,
           widths: Mapping[str, int] | None = None, right: Sequence[str] = ()) -> str:
    """The table as text: the header, two spaces between columns, each cell on one line and at
    most `max_width` characters (`widths`: per column), cut with "…"; `right` names
    right-aligned columns."""
    widths = widths or {}
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), show_edge=False, header_style="")
    for name in header:
        table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=widths.get(name, max_width),
                         justify="right" if name in right else "left")
    for row in rows:
        table.add_row(*(Text("" if cell is None else str(cell)) for cell in row))  # text, never markup
    # wide enough that no column is squeezed below its max_width: rows never wrap, in a pipe too
    width = max(shutil.get_terminal_size((200, 24)).columns, sum(widths.get(n, max_width) + 2 for n in header))
    console = Console(width=width, color_system=None, highlight=False, markup=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def echo_table(header: Sequence[str], rows: Iterable[Sequence[Any]], **options: Any) -> None:
    click.echo(render(header, rows, **options))


__all__ = ["echo_table", "render"]
