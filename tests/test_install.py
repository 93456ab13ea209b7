"""cluster.yaml's setup commands, executed for real in a throwaway virtualenv against a clone
of this checkout, and the `gpu` extra resolved by pip: the GPU faiss build, never faiss-cpu.

The throwaway venv sees this environment's packages through a .pth file (so the pinned torch,
torchvision and ray are already satisfied and nothing large is fetched); what the commands
install is distgan itself, from the clone, with the pins of constraints.txt."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
URL = "https://github.com/your-org/distgan.git"


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    site = subprocess.run([str(root / "venv" / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "distgan-test-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _run(cmd: str, home: Path, venv_bin: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PATH": f"{venv_bin}:{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", "-ec", cmd], env=env, cwd=home.parent, capture_output=True, text=True, timeout=600)


def _registry_down(r: subprocess.CompletedProcess) -> bool:
    return any(s in r.stdout + r.stderr for s in ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable"))


@pytest.mark.slow
def test_cluster_yaml_setup_commands_install_distgan(venv):
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    home, bin_ = venv / "home", venv / "venv" / "bin"
    home.mkdir()
    for cmd in cfg["setup_commands"]:
        # the node's `git clone` of the project becomes a clone of this checkout; no GPU wheel
        # installs here, so the `cpu` extra stands in for `gpu` (the resolution of `gpu` is checked below)
        cmd = cmd.replace(URL, str(REPO)).replace("python3", str(bin_ / "python")).replace(".[gpu]", ".[cpu]")
        r = _run(cmd, home, bin_)
        if r.returncode and _registry_down(r):
            pytest.skip(f"the package registry is unreachable: {r.stderr.strip().splitlines()[-1]}")
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    checkout = home / "distgan"
    assert (checkout / "pyproject.toml").is_file()
    # the installed distgan is the clone's (editable), with the pinned stack, and its CLI runs
    code = ("import distgan, faiss, ray, torch; from importlib.metadata import version; "
            "print(distgan.__file__, ray.__version__, torch.__version__, version('faiss-cpu'))")
    out = _run(f"{bin_ / 'python'} -c \"{code}\"", home, bin_)
    assert out.returncode == 0, out.stderr
    where, ray_v, torch_v, _ = out.stdout.split()
    assert where.startswith(str(checkout)), where
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert ray_v == pins["ray"] and torch_v.split("+")[0] == pins["torch"]
    assert _run(f"{bin_ / 'distgan'} --help", home, bin_).returncode == 0


@pytest.mark.slow
def test_gpu_extra_resolves_to_the_gpu_faiss_build_only(venv, tmp_path):
    report = tmp_path / "report.json"
    bin_ = venv / "venv" / "bin"
    r = _run(f"cd {REPO} && {bin_ / 'python'} -m pip install --dry-run --quiet --report {report} "
             f"-c constraints.txt '.[gpu]'", tmp_path, bin_)
    if r.returncode and _registry_down(r):
        pytest.skip(f"the package registry is unreachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    install = {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}
    assert "faiss-gpu-cu12" in install and "faiss-cpu" not in install
    # and in the package's own metadata faiss-cpu belongs to the `cpu` extra alone
    requires = install["distgan"]["metadata"]["requires_dist"]
    faiss = sorted(r for r in requires if r.startswith("faiss"))
    assert len(faiss) == 2 and all(("extra == \"cpu\"" in r) == r.startswith("faiss-cpu") for r in faiss), faiss
