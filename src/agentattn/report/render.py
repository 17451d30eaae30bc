"""One report, two renderings: Markdown (``report.md``, next to its PNGs) and self-contained HTML
(``report.html``, with the PNGs inlined as base64, so the one file can be mailed or archived)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["Report"]


@dataclass
class Report:
    """An ordered list of blocks: headings, paragraphs, tables, figures and preformatted text."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", Path(path), caption))

    def preformatted(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, base: Path) -> str:
        """Markdown with figure links relative to ``base`` (the report's directory)."""
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                lines += [f"## {block[1]}", ""]
            elif kind == "p":
                lines += [block[1], ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                lines.append("| " + " | ".join(header) + " |")
                lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
                lines += ["| " + " | ".join(row) + " |" for row in rows]
                lines.append("")
            elif kind == "img":
                lines += [f"![{block[2]}]({block[1].relative_to(base).as_posix()})", "", f"*{block[2]}*", ""]
            elif kind == "pre":
                lines += ["```", block[1], "```", ""]
        return "\n".join(lines)

    def html(self) -> str:
        """A standalone HTML page; figures are embedded as data URIs."""
        esc = html.escape
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
            "padding:4px 10px;text-align:right}td:first-child,th:first-child{text-align:left}"
            "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:0.9em}"
            "pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}</style>",
            "</head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                parts.append(f"<h2>{esc(block[1])}</h2>")
            elif kind == "p":
                parts.append(f"<p>{esc(block[1]).replace('`', '')}</p>")
            elif kind == "table":
                parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block[1]) + "</tr>")
                for row in block[2]:
                    parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
                parts.append("</table>")
            elif kind == "img":
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block[2])}">'
                    f"<figcaption>{esc(block[2])}</figcaption></figure>"
                )
            elif kind == "pre":
                parts.append(f"<pre>{esc(block[1])}</pre>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` (atomically) into ``out_dir``; return both paths."""
        md = atomic_write_text(out_dir / "report.md", self.markdown(out_dir))
        page = atomic_write_text(out_dir / "report.html", self.html())
        return md, page
