"""One section of BENCHMARKS.md as JSON: how a benchmark adds itself to ``agentattn bench report``.

A section file is JSON:

    {"kind": "section", "title": "Stable Diffusion", "command": "agentattn bench sd ...",
     "environment": {...},                         # optional; e.g. agentattn.measure.environment()
     "markdown": "free markdown: tables, notes",    # optional
     "tables": [{"caption": "...", "columns": ["a", "b"], "rows": [[1, 2]]}],   # optional
     "figures": ["benchmarks/figures/sd.png"],      # optional, paths relative to the repository root
     "goals": [{"goal": "...", "value": "...", "met": true}]}                    # optional

This module is a leaf of ``bench``: every benchmark writes its section through it, and ``bench report`` reads the
sections back and renders them with :func:`environment_line` and :func:`goal_table`.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_json

__all__ = ["environment_line", "goal_table", "write_section"]


def write_section(
    path: str | Path,
    title: str,
    command: str,
    environment: dict | None = None,
    markdown: str = "",
    goals: list[dict] | None = None,
    figures: list[str] | None = None,
) -> None:
    """Write one section JSON (the schema above) atomically; ``bench report`` renders it into BENCHMARKS.md."""
    section = {"kind": "section", "title": title, "command": command, "environment": environment or {},
               "markdown": markdown, "goals": goals or [], "figures": figures or []}  # fmt: skip
    atomic_write_json(path, section, make_parents=True)


def environment_line(env: dict | None) -> str:
    """One line naming the machine and versions; fields a benchmark did not record are left out."""
    if not env:
        return ""
    host = env.get("cpu") or env.get("machine") or "unknown CPU"
    if env.get("cpu_count"):
        host += f" ({env['cpu_count']} CPUs)"
    parts = [f"Machine: {'GPU ' + env['gpu'] + ', host ' if env.get('gpu') else ''}{host}"]
    if env.get("threads"):
        parts[0] += f", {env['threads']} threads"
    versions = [f"{name} {env[key]}" for name, key in (("torch", "torch"), ("timm", "timm"), ("diffusers", "diffusers"),
                ("tomesd", "tomesd"), ("Triton", "triton"), ("Python", "python")) if env.get(key)]  # fmt: skip
    line = "; ".join([parts[0], ", ".join(versions)]) if versions else parts[0]
    return line + (f"; measured {env['date']}." if env.get("date") else ".")


def goal_table(goals: list[dict]) -> str:
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for g in goals:
        met = g.get("met")
        mark = "yes" if met is True else "no" if met is False else "not measured"
        lines.append(f"| {g['goal']} | {g.get('value', '–')} | {mark} |")
    return "\n".join(lines)
