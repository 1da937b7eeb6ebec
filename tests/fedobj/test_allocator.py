"""With the thresholds fixed, memory a step frees stays in the process."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from fedobj.allocator import retain_freed_memory

    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    applied = retain_freed_memory() if sys.argv[1] == "on" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    before = rss_kib()
    size = 16 << 20  # 16 MiB (under the 32 MiB threshold), touched: resident
    buf = libc.malloc(size)
    ctypes.memset(buf, 1, size)
    libc.free(buf)
    print(applied, rss_kib() - before)
    """
)


def _probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_freed_buffers_stay_resident_only_when_retained() -> None:
    applied, kept_kib = _probe("on")
    assert applied
    assert kept_kib > 15 * 1024  # the 16 MiB stayed in the heap
    applied, kept_kib = _probe("off")
    assert not applied
    assert kept_kib < 4 * 1024  # glibc's default: mmap-ed, returned on free
