"""`make test`: the suite as two pytest processes at once.

The tests that start Ray clusters of their own (node loss and a killed driver, scale from
zero, `ray job submit` to a loopback head) and the throwaway-virtualenv install test spend
most of their minutes waiting on Ray's failure detection, the autoscaler and pip, not on the
2 cores; run after the rest they made the suite ~35-42 minutes. They run beside the rest, in
their own process (their own local Ray and S3 server), and their report is printed after the
main one. Ctrl-C reaches both (same process group, default SIGINT), so both tear down their
fixtures. Extra arguments go to both pytest runs. Exit status 0 only if both passed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BESIDE = ("test_faults.py", "test_autoscale.py", "test_jobs.py", "test_install.py")


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-q"]
    log = TESTS.parent / ".pytest_cache" / "beside.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        beside = subprocess.Popen([*pytest, "--durations=8", *(str(TESTS / n) for n in BESIDE), *argv],
                                  stdout=out, stderr=subprocess.STDOUT)
        try:
            rc_main = subprocess.call([*pytest, "--durations=15", *(f"--ignore={TESTS / n}" for n in BESIDE),
                                       str(TESTS), *argv])
        finally:
            rc_beside = beside.wait()
    print(f"\n==== {', '.join(BESIDE)} (run beside the rest, exit status {rc_beside})", flush=True)
    print(log.read_text(), flush=True)
    return 0 if rc_main == rc_beside == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
