"""The whole path on a shortened demo, the HTML report in a real browser, and the
demo config staying in step with the pipeline's built-in defaults."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from distgan.cli import PIPELINE_DEFAULTS, main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_dir(ray_running, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "demo"
    assert main(["pipeline", "--dataset", "digits", "--out", str(out), "--smoke-test"]) == 0
    return out


def test_pipeline_writes_every_artifact(pipeline_dir):
    out = pipeline_dir
    expected = [
        "data/dataset.json", "runs/gan/metrics.jsonl", "embeddings/embeddings.json",
        "clusters/embeddings/centroids.npy",
        "clusters/embeddings/metrics.json", "clusters/embeddings/montage.png",
        "clusters/pixels/metrics.json", "clusters/pixels/montage.png",
        "probe/probe.json", "probe/probe.md", "report.html", "pipeline.json",
    ]
    for rel in expected:
        assert (out / rel).is_file(), rel
    assert list((out / "runs" / "gan").glob("checkpoint_*/state.pt"))
    assert list((out / "runs" / "gan" / "samples").glob("step_*.png"))
    headline = json.loads((out / "pipeline.json").read_text())["headline"]
    for key in ("acc (embeddings)", "nmi (embeddings)", "ari (embeddings)", "acc (pixels)", "probe acc (embeddings)"):
        assert 0.0 <= headline[key] <= 1.0, key
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6  # curves, samples, 2 montages, sizes, confusion
    assert "raw pixels" in page and "D embeddings" in page


def test_rerun_resumes_instead_of_starting_over(pipeline_dir, capsys):
    before = sorted(p.name for p in (pipeline_dir / "runs" / "gan").glob("checkpoint_0*"))
    assert main(["pipeline", "--dataset", "digits", "--out", str(pipeline_dir), "--smoke-test"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert sorted(p.name for p in (pipeline_dir / "runs" / "gan").glob("checkpoint_0*")) == before


def test_report_renders_in_headless_chromium(pipeline_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("Chromium not installed (Debian package `chromium`; CI installs it)")
    page = tmp_path / "check.html"
    # After load, count images that decoded to a real size; --dump-dom shows the verdict.
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.dataset.ok=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")
    page.write_text((pipeline_dir / "report.html").read_text().replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-ok="(\d+)/(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(2)) >= 6 and m.group(1) == m.group(2)  # every image rendered
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", (pipeline_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_demo_config_matches_pipeline_defaults():
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "digits.yaml").read_text())
    flat = {f"{section}.{k}": v for section, keys in cfg.items() for k, v in keys.items()}
    assert flat == PIPELINE_DEFAULTS["digits"]
