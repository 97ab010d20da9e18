"""allocator.retain_freed_memory: glibc's malloc tuned once per process, nothing elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from prefixtune import allocator

MIB = 2**20


@pytest.fixture
def fake_glibc(monkeypatch):
    """A fresh process on a glibc system whose libc records mallopt calls and answers with `result`."""
    libc = type("FakeLibc", (), {})()
    libc.calls, libc.result = [], 1
    libc.mallopt = lambda param, value: (libc.calls.append((param, value)), libc.result)[1]
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    return libc


def test_mallopt_sets_the_largest_mmap_threshold_and_trimming_off_once_per_process(fake_glibc):
    assert allocator.retain_freed_memory() is True
    assert fake_glibc.calls == [(-3, 32 * MIB), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert allocator.retain_freed_memory() is True
    assert len(fake_glibc.calls) == 2  # the second call changes nothing


def test_a_refused_mallopt_is_reported_and_tried_again(fake_glibc):
    fake_glibc.result = 0
    assert allocator.retain_freed_memory() is False
    fake_glibc.result = 1
    assert allocator.retain_freed_memory() is True
    assert fake_glibc.calls[-2:] == [(-3, 32 * MIB), (-1, 2**31 - 1)]


_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, importlib.util, sys

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
    if sys.argv[2] == "tuned":
        spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.retain_freed_memory() is True
    before = libc.mallinfo2()
    block = libc.malloc(31 * 2**20)  # one full-vocabulary beam temporary, as in allocator.py
    held = libc.mallinfo2()
    libc.free(block)
    freed = libc.mallinfo2()
    print(held.hblks - before.hblks, freed.arena - before.arena)
""")


def _glibc_with_mallinfo2() -> bool:
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc 2.33 or later (mallinfo2)")
@pytest.mark.parametrize("setting", ["untuned", "tuned"])
def test_in_a_fresh_process_a_31_mb_block_stays_in_the_heap_only_when_tuned(setting):
    """glibc's mallinfo2: untuned, the block is mmapped (and unmapped on free); tuned, it comes from the heap,
    which keeps it after free."""
    out = subprocess.run([sys.executable, "-c", _PROBE, allocator.__file__, setting], capture_output=True,
                         text=True, check=True).stdout.split()
    mapped, kept = int(out[0]), int(out[1])
    if setting == "tuned":
        assert mapped == 0 and kept >= 31 * MIB, out
    else:
        assert mapped == 1 and kept < 31 * MIB, out


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.retain_freed_memory() is False
