"""Child processes the tests start: how one is finished, pass or fail."""
from __future__ import annotations

import subprocess


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for `proc` (killed if the wait fails), demand exit status 0, return its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out[-3000:]
    return out
