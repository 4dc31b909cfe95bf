"""What the benchmark scripts share: the machine description and writing results as JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where a result was measured: host, CPU, GPU, library versions, date."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count(),
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=False
        ).stdout.strip() or None
    except OSError:  # pragma: no cover
        info["git_commit"] = None
    return info


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` with the machine description to ``<out_dir>/<name>_<device>_<date>.json``."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    device = "h200" if info["gpu"] and "H200" in info["gpu"] else ("gpu" if info["gpu"] else "cpu")
    path = out_dir / f"{name}_{device}_{info['date'][:10]}.json"
    path.write_text(json.dumps({"machine": info, **payload}, indent=2, default=str))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns``."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
