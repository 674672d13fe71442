"""Resident memory of the current process from the kernel, for the benchmark child processes.

`status_mib("VmRSS")` is the RSS now, `status_mib("VmHWM")` its peak; `reset_peak_rss()`
sets the peak to the current RSS (writing 5 to /proc/self/clear_refs), so that a later
VmHWM is the peak of what ran in between. ru_maxrss cannot do this: it is never lowered
(and the reset lowers it too, so read any whole-run peak first).
"""

from __future__ import annotations


def status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in MiB; NaN where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Start a new VmHWM peak from the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
