"""What an attempt runs on (DESIGN §11 "What bit for bit means")."""

import functools
import platform


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what `platform` knows, else "cpu"
    (no torch here: the worker's main process names its CPU with it too)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
