"""The whole path on a shortened demo, the HTML report in a real browser, and the
demo config staying in step with the pipeline's built-in defaults."""
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from distgan.cli import PIPELINE_DEFAULTS, main
from distgan.storage import loc

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
KS = ["--k", "8:12:2"]  # the embeddings choose k among 8, 10, 12 without labels; the pixels get that k


@pytest.fixture(scope="module")
def pipeline_dir(ray_running, bucket, tmp_path_factory):
    """The whole pipeline with its data, run and outputs only in the bucket (a real S3 server),
    run from an empty working folder: what a cluster without a shared disk needs."""
    out = loc(f"{bucket}/pipe/demo")
    cwd = tmp_path_factory.mktemp("cwd")
    repo_before = _untracked()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["pipeline", "--dataset", "digits", "--out", out.uri, "--smoke-test", *KS]) == 0
    finally:
        os.chdir(here)
    # nothing on the local disk: not in the working folder (no "s3:" folder), not in the repository
    assert list(cwd.iterdir()) == [] and _untracked() == repo_before
    return out


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=REPO,
                         capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if not line[3:].startswith((".venv", ".pytest_cache", "distgan.egg-info"))
            and "__pycache__" not in line}


def test_pipeline_writes_every_artifact(pipeline_dir):
    out = pipeline_dir
    expected = [
        "data/dataset.json", "runs/gan/metrics.jsonl", "embeddings/embeddings.json",
        "clusters/embeddings/centroids.npy", "clusters/embeddings/preprocess.npz",
        "clusters/embeddings/metrics.json", "clusters/embeddings/montage.png",
        "clusters/pixels/metrics.json", "clusters/pixels/montage.png",
        "probe/probe.json", "probe/probe.md", "report.html", "pipeline.json",
    ]
    for rel in expected:
        assert (out / rel).is_file(), rel
    run = out / "runs" / "gan"
    assert [(c / "state.pt").is_file() for c in run.glob("checkpoint_0*")] == [True, True]
    assert run.glob("samples/") == [] and (run / "samples").glob("step_*.png")  # rank 0 uploaded them
    assert (run / "tensorboard").glob("events.out.tfevents.*")
    assert (out / "clusters" / "embeddings" / "assignments").glob("part-*.parquet")
    # outputs pandas reads straight from the bucket
    import pandas as pd

    parts = [pd.read_parquet(io.BytesIO(f.read_bytes())) for f in (out / "clusters" / "embeddings" / "assignments").iterdir()]
    assert sum(map(len, parts)) == (out / "data" / "dataset.json").read_json()["count"]
    headline = (out / "pipeline.json").read_json()["headline"]
    for key in ("acc (embeddings)", "nmi (embeddings)", "ari (embeddings)", "acc (pixels)", "probe acc (embeddings)"):
        assert 0.0 <= headline[key] <= 1.0, key
    assert (out / "pipeline.json").read_json()["checkpoint"].startswith(out.uri + "/runs/gan/checkpoint_")
    sweep = (out / "clusters" / "embeddings" / "k_sweep.json").read_json()
    assert sweep["ks"] == [8, 10, 12] and [r["k"] for r in sweep["table"]] == [8, 10, 12]
    k = sweep["suggested_k"]
    assert max(sweep["table"], key=lambda r: r["stability"])["k"] == k  # the default criterion's best
    assert (out / "clusters" / "embeddings" / "metrics.json").read_json()["k"] == k
    assert (out / "clusters" / "pixels" / "metrics.json").read_json()["k"] == k
    assert (out / "pipeline.json").read_json()["k"] == k
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 7  # curves, samples, 2 montages, sizes, confusion, k sweep
    assert "raw pixels" in page and "D embeddings" in page
    assert f"Choosing k without labels: suggested k = {k} (best stability)" in page


def test_rerun_resumes_instead_of_starting_over(pipeline_dir, capsys):
    before = [p.name for p in (pipeline_dir / "runs" / "gan").glob("checkpoint_0*")]
    assert main(["pipeline", "--dataset", "digits", "--out", pipeline_dir.uri, "--smoke-test", *KS]) == 0
    assert "reusing" in capsys.readouterr().out
    assert [p.name for p in (pipeline_dir / "runs" / "gan").glob("checkpoint_0*")] == before


def test_report_renders_in_headless_chromium(pipeline_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("Chromium not installed (Debian package `chromium`; CI installs it)")
    page = tmp_path / "check.html"
    # After load, count images that decoded to a real size; --dump-dom shows the verdict.
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.dataset.ok=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")
    report = tmp_path / "report.html"  # the browser opens a local copy of the page in the bucket
    report.write_bytes((pipeline_dir / "report.html").read_bytes())
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-ok="(\d+)/(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(2)) >= 6 and m.group(1) == m.group(2)  # every image rendered
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_demo_config_matches_pipeline_defaults():
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "digits.yaml").read_text())
    flat = {f"{section}.{k}": v for section, keys in cfg.items() for k, v in keys.items()}
    assert flat == PIPELINE_DEFAULTS["digits"]
