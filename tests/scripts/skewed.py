"""Run a Python module with this process's wall clock off by some seconds, as on a host whose
clock is wrong.

Usage: ``skewed.py SECONDS -m MODULE [ARGS...]`` or ``skewed.py SECONDS SCRIPT [ARGS...]``.
``time.time`` (which engage-async's wall clock reads) is shifted by SECONDS before anything
else is imported; the monotonic clock is left alone, as a clock step leaves it.
"""

from __future__ import annotations

import runpy
import sys
import time

_real_time = time.time
_offset = float(sys.argv[1])


def _skewed() -> float:
    return _real_time() + _offset


time.time = _skewed
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
