"""A bench run's scratch folder, removed however the run ends: normally, on an error, on Ctrl-C
or on SIGTERM (what `timeout` sends). The models a bench assembles there take hundreds of MB."""

from __future__ import annotations

import atexit
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def scratch_dir(prefix: str, parent: Path | None = None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    atexit.register(shutil.rmtree, path, True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # exit through atexit, not at once
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return path
