"""Where the work runs: the device a build asks for, the one out-of-memory helper every stage shares
(against a simulated device that runs out of memory above some number of rows), and host memory kept
for reuse."""

import platform
import resource

import pytest
import torch

from atlas import devices
from atlas.devices import chunked, fit, has_bfloat16_units, is_oom, keep_host_memory, resolve_device
from atlas.errors import AtlasError


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_has_mps", lambda: False)


def test_auto_and_cpu_resolve_without_an_accelerator(no_accelerator):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_unavailable_or_unknown_device_is_an_error(no_accelerator):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(AtlasError, match=f"--device {name}: no CUDA device is available; use --device cpu"):
            resolve_device(name)
    with pytest.raises(AtlasError, match="--device mps: MPS is not available on this machine"):
        resolve_device("mps")
    with pytest.raises(AtlasError, match="unknown device 'tpu'; expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")


def test_auto_prefers_cuda_then_mps_and_each_rank_takes_its_gpu(monkeypatch):
    monkeypatch.setattr(devices, "_has_mps", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("mps") == resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)  # ranks beyond the GPUs wrap around
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit number is kept


def small_device(rows: int, calls: list, when=lambda *args: True):
    """A function of a batch size (or a row range) that runs out of memory above `rows` rows, as a small GPU
    would, where `when(*args)` holds; it records every call."""
    def work(*args):
        calls.append(args)
        n = args[0] if len(args) == 1 else args[1] - args[0]
        if n > rows and when(*args):
            raise torch.OutOfMemoryError(f"CUDA out of memory: {n} rows (simulated)")
        return list(range(args[0], args[1])) if len(args) == 2 else f"ran {n}"
    return work


def test_is_oom_knows_every_devices_out_of_memory():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert is_oom(RuntimeError("MPS backend out of memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))  # only the errors devices raise


def test_fit_halves_until_it_fits_and_hands_back_the_size():
    calls, halved = [], []
    assert fit(small_device(3, calls), 16, on_halve=halved.append) == ("ran 2", 2)
    assert calls == [(16,), (8,), (4,), (2,)] and halved == [8, 4, 2]
    calls.clear()
    assert fit(small_device(3, calls), 3) == ("ran 3", 3) and calls == [(3,)]  # fits at once: no halving
    calls.clear()
    assert fit(small_device(3, calls), 0) == ("ran 1", 1) and calls == [(1,)]  # at least one row


def test_fit_raises_when_one_row_does_not_fit_and_passes_other_errors_on():
    calls, halved = [], []
    with pytest.raises(torch.OutOfMemoryError, match="1 rows"):
        fit(small_device(0, calls), 5, on_halve=halved.append)
    assert calls == [(5,), (2,), (1,)] and halved == [2, 1]

    def broken(n):
        calls.append(n)
        raise error
    for error in (ValueError("a bug"), RuntimeError("mat1 and mat2 shapes cannot be multiplied")):
        calls.clear()
        with pytest.raises(type(error), match=str(error)):
            fit(broken, 8)
        assert calls == [8]  # made once: only running out of memory is retried


def test_chunked_covers_every_row_once_and_keeps_the_size_that_fitted():
    calls = []
    results, size = chunked(small_device(3, calls), 10, 8)
    assert [row for chunk in results for row in chunk] == list(range(10)) and size == 2
    assert calls == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # later chunks start small
    calls.clear()
    results, size = chunked(small_device(100, calls), 10, 4)
    assert results == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and size == 4 and calls == [(0, 4), (4, 8), (8, 10)]


def test_chunked_retries_only_the_chunk_that_ran_out():
    """Rows from 6 on are larger: only the chunk holding them is made again, in halves."""
    calls = []
    results, size = chunked(small_device(2, calls, when=lambda a, b: b > 6), 10, 3)
    assert calls == [(0, 3), (3, 6), (6, 9), (6, 7), (7, 8), (8, 9), (9, 10)]
    assert [row for chunk in results for row in chunk] == list(range(10)) and size == 1


def test_chunked_raises_when_one_row_does_not_fit_and_passes_other_errors_on():
    calls = []
    with pytest.raises(torch.OutOfMemoryError):
        chunked(small_device(0, calls, when=lambda a, b: a >= 4), 8, 4)
    assert calls == [(0, 4), (4, 8), (4, 6), (4, 5)]

    def broken(a, b):
        calls.append((a, b))
        raise KeyError("not memory")
    calls.clear()
    with pytest.raises(KeyError):
        chunked(broken, 8, 4)
    assert calls == [(0, 4)]


def test_one_row_that_does_not_fit_becomes_the_message_the_caller_gives():
    def never_fits(n):
        raise torch.OutOfMemoryError(f"out of memory: {n} rows")
    with pytest.raises(AtlasError, match="^one image does not fit; use --device cpu$"):
        fit(never_fits, 4, too_big="one image does not fit; use --device cpu")
    with pytest.raises(AtlasError, match="^one unit does not fit$"):
        chunked(lambda a, b: never_fits(b - a), 3, 2, too_big="one unit does not fit")
    with pytest.raises(torch.OutOfMemoryError):  # without a message the error itself
        fit(never_fits, 4)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_host_memory_is_reused_without_page_faults():
    """Batch after batch, the same large blocks: glibc's default maps each afresh (about 49,000 faults a
    round here); kept, the heap settles within a few rounds and then faults no more."""
    keep_host_memory()
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b = torch.ones(64 << 20, dtype=torch.uint8), torch.ones(100 << 20, dtype=torch.uint8)
        del a
        c = torch.ones(30 << 20, dtype=torch.uint8)
        del b, c
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sum(faults[-3:]) < 1000, f"page faults per round: {faults}"


def test_bfloat16_units_are_read_from_the_cpu_and_absent_elsewhere():
    assert has_bfloat16_units(torch.device("cpu")) == torch.cpu._is_amx_tile_supported()
    assert has_bfloat16_units(torch.device("meta")) is False
