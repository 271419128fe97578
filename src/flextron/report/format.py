"""Formatting helpers of the reports: numbers, Markdown tables, durations, figures (matplotlib, Agg)
and atomic writes of report files; reading ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

from flextron.files import atomic_write_file

log = logging.getLogger(__name__)
DASH = "—"


# --------------------------------------------------------------------------- small helpers


def as_number(x: Any) -> float | None:
    """``x`` as a finite float, else ``None`` (missing keys, nulls, NaN, strings)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt(x: Any, digits: int = 2, scale: float = 1.0) -> str:
    v = as_number(x)
    return DASH if v is None else f"{v * scale:.{digits}f}"


def fmt_scalar(x: Any) -> str:
    """Training-summary values: ints as ints, floats with 4 significant digits, rest as text."""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    if x is None:
        return DASH
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt_scalar(v) for v in x)
    if isinstance(x, dict):
        return json.dumps(x, sort_keys=True)
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> None:
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file; blank or malformed lines are skipped (a run killed
    mid-write may leave a partial last line)."""
    out: list[dict] = []
    if not path.is_file():
        return out
    with path.open() as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is not valid JSON; skipped", path, i)
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


# --------------------------------------------------------------------------- plots


def new_figure(**kw: Any) -> Any:
    from matplotlib.figure import Figure  # Agg canvas by default; no pyplot, no display

    kw.setdefault("layout", "constrained")  # titles and colour bars never overlap
    return Figure(**kw)


def finish_axes(fig, ax, path: Path, ylabel: str, title: str, xlabel: str = "timed latency (ms)") -> bool:
    """Label a latency plot, add grid and legend, save it; returns True."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def fmt_duration(s: Any) -> str:
    v = as_number(s)
    if v is None:
        return DASH
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.2f} h"


def disk_usage(run_dir: Path) -> dict:
    """Bytes a run directory takes on disk (file sizes, links not followed): ``total``, per
    top-level entry (``entries``), ``exported`` (``exported/``, the exports evaluation writes) and
    ``weights``, the size of one full copy of the model's weights (``final/*.safetensors``, else
    ``ranked/*.safetensors``; 0 when neither exists)."""
    run_dir = Path(run_dir)

    def size(p: Path) -> int:
        if p.is_symlink():
            return 0
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())

    entries = {p.name: size(p) for p in sorted(run_dir.iterdir())} if run_dir.is_dir() else {}
    weights = 0
    for name in ("final", "ranked"):
        files = sorted((run_dir / name).glob("*.safetensors"))
        if files:
            weights = sum(f.stat().st_size for f in files)
            break
    return {
        "total": sum(entries.values()),
        "exported": entries.get("exported", 0),
        "weights": weights,
        "entries": entries,
    }
