"""CPU training keeps freed host memory for reuse, so large activations stop costing a page fault per page."""

import os
import platform
import subprocess
import sys

import pytest

from fifa_hf.host_memory import retain_freed_memory
from fifa_hf.trainer import script
from fifa_hf.world.synthetic import make_synthetic_pickapic

# A 64 MB activation (above glibc's largest default mmap threshold) made and freed; prints whether the settings
# applied, then glibc's own account (mallinfo2): bytes it mapped apart for the activation, and bytes its heap grew
# by and kept once the activation is freed.
ACTIVATION = """
import ctypes, sys, torch
from fifa_hf.host_memory import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
before = mallinfo2()
activation = torch.ones(16 * 2**20)
mapped = mallinfo2().hblkhd - before.hblkhd
del activation
print(applied, mapped, mallinfo2().arena - before.arena)
"""
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
MB = 2**20


def allocator_account(mode: str) -> tuple[str, int, int]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", ACTIVATION, mode], env=env, capture_output=True, text=True, check=True)
    applied, mapped, kept = out.stdout.split()
    return applied, int(mapped), int(kept)


@glibc
def test_a_large_activation_comes_from_the_heap_and_stays_there_once_freed():
    applied, mapped, kept = allocator_account("default")
    assert mapped >= 64 * MB and kept < 64 * MB  # mapped afresh, unmapped when freed: page faults every time
    applied, mapped, kept = allocator_account("retain")
    # reused by the next activation (the heap grows by the activation less the free space it already had at its top)
    assert applied == "True" and mapped < 64 * MB and kept >= 60 * MB


@glibc
def test_allocator_settings_the_user_chose_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert retain_freed_memory() is False


def test_cpu_training_retains_freed_memory(monkeypatch, tiny_sd_path, tmp_path):
    calls = []
    monkeypatch.setattr(script, "retain_freed_memory", lambda: calls.append(True) or False)  # spy: no change here
    data = tmp_path / "pairs"
    make_synthetic_pickapic(4, seed=0, image_size=40, tie_fraction=0, unlabeled_fraction=0).save_to_disk(data)
    script.main([
        "--model_name_or_path", str(tiny_sd_path), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--resolution", "32", "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
        "--report_to", "none", "--card_sample_steps", "0",
    ])  # fmt: skip
    assert calls == [True]
