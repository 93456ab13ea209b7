"""One self-contained HTML page for a pipeline folder: metrics (embeddings vs raw
pixels), loss curves, sample grids over training, cluster montage, cluster sizes,
and clusters against labels. Every picture is an inline PNG, so the page can be
mailed or archived as one file.

Expected layout (what `distgan pipeline` writes; missing parts are skipped):
  OUT/runs/<name>/metrics.jsonl, samples/*.png   training
  OUT/clusters/embeddings/, OUT/clusters/pixels/ clustering outputs
  OUT/probe/probe.json                           linear probe and baselines
"""
from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from .config import UserError
from .storage import Loc, check_access, loc


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"{w}>'


def _file_b64(path: Loc) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(metrics: list[dict]) -> str:
    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    steps = [m["step"] for m in metrics]
    for key in ("loss/d", "loss/g"):
        axes[0].plot(steps, [m[key] for m in metrics], label=key)
    for key in ("d/real", "d/fake"):
        axes[1].plot(steps, [m[key] for m in metrics], label=f"mean {key} logit")
    axes[2].plot(steps, [m["img_per_s"] for m in metrics], label="images/s")
    for ax, title in zip(axes, ("losses", "D outputs (a collapse shows here first)", "throughput")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _png(fig)


def cluster_sizes(sizes: list[int]) -> str:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar(range(len(sizes)), sizes, color="#4c72b0")
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title("cluster sizes")
    return _png(fig)


def confusion(cont: list[list[int]] | None, class_names: list[str]) -> str | None:
    """Clusters (rows, ordered by their majority class) against labels (columns), from the
    contingency table the clustering stage summed (metrics.json): no per-point read."""
    cont = np.asarray(cont or [[0]], np.int64)
    if not cont.sum():
        return None
    n_cl, n_lab = cont.shape
    order = np.lexsort((-cont.max(axis=1), cont.argmax(axis=1)))
    cont = cont[order]
    plt = _figure()
    fig, ax = plt.subplots(figsize=(0.5 * n_lab + 2, 0.35 * n_cl + 1.5))
    ax.imshow(cont / np.maximum(cont.sum(axis=1, keepdims=True), 1), cmap="Blues", aspect="auto")
    names = class_names if len(class_names) == n_lab else [str(i) for i in range(n_lab)]
    ax.set_xticks(range(n_lab), names, rotation=60, fontsize=8)
    ax.set_yticks(range(n_cl), [str(i) for i in order], fontsize=7)
    ax.set_xlabel("label")
    ax.set_ylabel("cluster")
    ax.set_title("fraction of each cluster per label")
    for i in range(n_cl):
        for j in range(n_lab):
            if cont[i, j]:
                ax.text(j, i, str(cont[i, j]), ha="center", va="center", fontsize=6)
    return _png(fig)


def _metrics_table(clusters: dict[str, dict], probe: list[dict]) -> str:
    rows = ["<tr><th>features</th><th>ACC</th><th>NMI</th><th>ARI</th><th>purity</th><th>k</th><th>n</th></tr>"]
    for name, m in clusters.items():
        vals = [f"{m[k]:.4f}" if k in m else "n/a" for k in ("acc", "nmi", "ari", "purity")]
        rows.append(f"<tr><td>{html.escape(name)}: {html.escape(m['features'])}</td>"
                    + "".join(f"<td>{v}</td>" for v in vals) + f"<td>{m['k']}</td><td>{m['n']}</td></tr>")
    out = "<table>" + "".join(rows) + "</table>"
    if probe:
        out += "<h3>Classification (train split -> test split)</h3><table><tr><th>features</th><th>method</th><th>train</th><th>test</th><th>accuracy</th></tr>"
        out += "".join(f"<tr><td>{html.escape(r['features'])}</td><td>{html.escape(r['method'])}</td><td>{r['train']}</td>"
                       f"<td>{r['test']}</td><td>{r['accuracy']:.4f}</td></tr>" for r in probe)
        out += "</table>"
    return out


def _sweep_section(d: Loc) -> str:
    """The k sweep of `distgan cluster --k LIST`: its plot (k_sweep.png) and table, the suggested k marked."""
    from .cluster.criteria import CRITERIA

    s = (d / "k_sweep.json").read_json()
    names = list(CRITERIA)
    rows = "".join(
        f"<tr><td>{'<b>' if r['k'] == s['suggested_k'] else ''}{r['k']}{' (suggested)</b>' if r['k'] == s['suggested_k'] else ''}</td>"
        + "".join(f"<td>{r[n]:.3f}</td>" for n in names) + "</tr>" for r in s["table"])
    plot = f"<figure>{_img(_file_b64(d / 'k_sweep.png'), 'k sweep', 900)}</figure>" if (d / "k_sweep.png").is_file() else ""
    return (f"<h3>Choosing k without labels: suggested k = {s['suggested_k']} (best {html.escape(s['criterion'])})</h3>"
            + plot + "<table><tr><th>k</th>" + "".join(f"<th>{n}</th>" for n in names) + f"</tr>{rows}</table>")


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}figcaption{font-size:12px;color:#555}"""


def write_report(out_dir) -> Loc:
    out = loc(out_dir)
    check_access(out)
    if not out.is_dir():
        raise UserError(f"report: {out} is not a folder (give the --out of `distgan pipeline`)")
    summary = (out / "pipeline.json").read_json() if (out / "pipeline.json").is_file() else {}
    parts = [f"<h1>distgan report</h1><p>{html.escape(out.uri)}</p>"]
    if summary:
        parts.append("<p>" + html.escape(", ".join(f"{k}: {v}" for k, v in summary.get("headline", {}).items())) + "</p>")

    clusters = {name: (out / "clusters" / name / "metrics.json").read_json()
                for name in ("embeddings", "pixels") if (out / "clusters" / name / "metrics.json").is_file()}
    probe = (out / "probe" / "probe.json").read_json() if (out / "probe" / "probe.json").is_file() else []
    if clusters or probe:
        parts.append("<h2>Metrics: discriminator embeddings vs raw pixels</h2>" + _metrics_table(clusters, probe))

    runs = [r / "metrics.jsonl" for r in (out / "runs").iterdir() if (r / "metrics.jsonl").is_file()]
    for mfile in runs:
        metrics = [json.loads(line) for line in mfile.read_text().splitlines() if line]
        if metrics:
            parts.append(f"<h2>Training ({html.escape(mfile.parent.name)}, {metrics[-1]['step']} steps)</h2>")
            parts.append(_img(loss_curves(metrics), "loss curves"))
        samples = (mfile.parent / "samples").glob("step_*.png")
        if samples:
            pick = samples if len(samples) <= 4 else [samples[i] for i in np.linspace(0, len(samples) - 1, 4).astype(int)]
            figs = "".join(f"<figure>{_img(_file_b64(p), p.stem, 240)}<figcaption>{p.stem.replace('_', ' ')} (G_ema, fixed noise)"
                           f"</figcaption></figure>" for p in pick)
            parts.append(f"<h3>Samples over training</h3><div class='grid'>{figs}</div>")

    manifest = (out / "data" / "dataset.json").read_json() if (out / "data" / "dataset.json").is_file() else {}
    for name, m in clusters.items():
        d = out / "clusters" / name
        parts.append(f"<h2>Clusters of {html.escape(m['features'])}</h2>")
        figs = []
        if (d / "montage.png").is_file():
            figs.append(f"<figure>{_img(_file_b64(d / 'montage.png'), 'montage', 320)}<figcaption>one row per cluster: "
                        "the images nearest its centroid</figcaption></figure>")
        figs.append(f"<figure>{_img(cluster_sizes(m['sizes']), 'cluster sizes')}</figure>")
        conf = confusion(m.get("contingency"), manifest.get("class_names", []))
        if conf:
            figs.append(f"<figure>{_img(conf, 'clusters vs labels')}</figure>")
        parts.append(f"<div class='grid'>{''.join(figs)}</div>")
        if (d / "k_sweep.json").is_file():
            parts.append(_sweep_section(d))
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>distgan report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    path = out / "report.html"
    path.write_text(page)
    return path
