"""Peak resident memory of a code snippet, measured in a fresh subprocess.

CPU tensors come from malloc; with a fixed mmap threshold every large tensor is its own
mapping that is returned to the OS when freed, so resident memory follows live tensor bytes
and the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) gives the peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = """
import json
from r1kernels.hardware import proc_status_bytes
def reset_peak():
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return proc_status_bytes('VmRSS')
def peak():
    return proc_status_bytes('VmHWM')
"""


def measure(setup: str, run: str, threads: int = 2) -> dict:
    """Runs ``setup``, resets the peak, runs ``run``; returns {'base', 'peak', 'growth'} in bytes
    plus whatever ``run`` stored in a dict named ``extra``."""
    code = "\n".join([_PRELUDE, textwrap.dedent(setup), "extra = {}", "base = reset_peak()",
                      textwrap.dedent(run),
                      "print('RESULT' + json.dumps(dict(base=base, peak=peak(), growth=peak() - base, **extra)))"])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-4000:]}")
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
