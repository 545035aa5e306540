"""Tests of cpool.shared_memory: stdlib interop both ways, errors, cleanup after the program ends."""
import multiprocessing.shared_memory as std_sm
import os
import subprocess
import sys
import textwrap

import pytest

from cpool import shared_memory as sm


def test_attach_both_ways_and_errors():
    a = sm.SharedMemory(create=True, size=16)
    a.buf[:3] = b"abc"
    b = std_sm.SharedMemory(a.name)
    assert bytes(b.buf[:3]) == b"abc"
    b.close()
    c = std_sm.SharedMemory(create=True, size=8)
    c.buf[0] = 7
    d = sm.SharedMemory(c.name)
    assert d.buf[0] == 7 and d.size >= 8
    d.close()
    c.close()
    c.unlink()
    with pytest.raises(FileExistsError):
        sm.SharedMemory(a.name, create=True, size=4)
    with pytest.raises(ValueError):
        sm.SharedMemory(create=True, size=0)
    a.close()
    a.unlink()
    with pytest.raises(FileNotFoundError):
        sm.SharedMemory(a.name)


def test_shareable_list_interop():
    values = [1, 2.5, "hi", b"x", None, True, -(2**63)]
    sl = sm.ShareableList(values)
    other = std_sm.ShareableList(name=sl.shm.name)
    assert list(other) == values and other.format == sl.format
    other[2] = "yo"
    assert sl[2] == "yo"
    other.shm.close()
    sl.shm.close()
    sl.shm.unlink()


def test_tracked_segment_unlinked_after_sigkill_of_creator():
    code = textwrap.dedent("""
        import os, signal, sys
        from cpool import shared_memory as sm
        s = sm.SharedMemory(create=True, size=64)
        print(s.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    name = out.stdout.strip()
    assert name.startswith("psm_")
    for _ in range(200):
        if not os.path.exists("/dev/shm/" + name):
            break
        import time
        time.sleep(0.05)
    assert not os.path.exists("/dev/shm/" + name)
