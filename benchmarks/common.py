"""Shared by every benchmark: the machine, and results as JSON + a Markdown table."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DISTGAN_DATASETS", REPO.parent / "shared" / "datasets"))


def machine() -> dict:
    import faiss
    import numpy as np
    import ray
    import sklearn
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
        "gpus": torch.cuda.device_count(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__, "faiss": faiss.__version__,
        "numpy": np.__version__, "sklearn": sklearn.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['gpus']} GPU; "
            f"torch {m['torch']}, ray {m['ray']}, faiss {m['faiss']}, {m['date']}")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_dir(quick: bool) -> Path:
    """Quick runs (small sizes, a check that everything runs) never overwrite measured tables."""
    return RESULTS / "quick" if quick else RESULTS


def write_results(name: str, rows: list[dict], columns: list[str], command: str, notes: str = "",
                  quick: bool = False) -> str:
    """benchmarks/results/[quick/]NAME.json and NAME.md; prints the table and the machine."""
    out = results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    command += " --quick" if quick else ""
    m = machine()
    (out / f"{name}.json").write_text(json.dumps({"machine": m, "command": command, "rows": rows, "notes": notes}, indent=2))
    md = f"### {name}\n\nMachine: {machine_line(m)}  \nCommand: `{command}`\n\n" + markdown_table(rows, columns)
    if notes:
        md += "\n" + notes.strip() + "\n"
    (out / f"{name}.md").write_text(md)
    print(md)
    return md


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
