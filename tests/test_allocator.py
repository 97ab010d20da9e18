"""allocator.retain_freed_memory: glibc's malloc tuned once per process, nothing elsewhere."""

from __future__ import annotations

import platform

import pytest

from prefixtune import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_malloc_is_tuned_once_and_torch_still_works():
    import torch

    assert allocator.retain_freed_memory() is True
    assert allocator.retain_freed_memory() is True  # idempotent
    x = torch.ones(160, 49152)  # a block just under the 32 MiB mmap threshold, freed and reused
    del x
    assert float(torch.ones(160, 49152).sum()) == 160 * 49152


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.retain_freed_memory() is False
