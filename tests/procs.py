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


def stop_head(head: subprocess.Popen, grace: float = 15) -> None:
    """Stop a `ray start --head --block` the test started in its own session. `ray start`
    stops its node on SIGINT (KeyboardInterrupt: every process it started, ~1-2 s) but
    ignores SIGTERM, which would leave the whole wait to run out; what is still alive after
    `grace` seconds is killed with its process group."""
    import os
    import signal

    try:
        head.send_signal(signal.SIGINT)
        head.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass  # the group kill below ends it
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything of this head's group still there
    except ProcessLookupError:
        return  # the group is gone: nothing left
    head.wait(timeout=10)
