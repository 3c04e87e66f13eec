"""CPU memory reuse: blocks freed inside a scope come back for the next allocation of their size, nothing
outside a scope or below the size threshold is kept, tensors keep their values while they live, and the
fused model's results do not change."""

import threading

import pytest
import torch

import icnet_kernels
from icnet_kernels.memory import cached_cpu_bytes, release_cpu_memory, reused_cpu_memory

pytestmark = pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
LARGE = (1 << 20) // 4 + 123  # float32 elements: just over the 1 MiB threshold


@pytest.fixture(autouse=True)
def empty_cache():
    release_cpu_memory()
    yield
    release_cpu_memory()


def test_a_freed_block_serves_the_next_allocation_of_its_size():
    with reused_cpu_memory():
        first = torch.empty(LARGE)
        pointer, nbytes = first.data_ptr(), first.untyped_storage().nbytes()
        del first
        assert cached_cpu_bytes() == nbytes
        second = torch.empty(LARGE)
        assert second.data_ptr() == pointer and cached_cpu_bytes() == 0
        other_size = torch.empty(LARGE + 1024)
        assert other_size.data_ptr() != pointer
    del second, other_size
    assert cached_cpu_bytes() == 2 * LARGE * 4 + 1024 * 4  # freed after the scope: they still return
    assert release_cpu_memory() == 2 * LARGE * 4 + 1024 * 4 and cached_cpu_bytes() == 0


def test_nothing_outside_a_scope_or_below_the_threshold_is_kept():
    large = torch.empty(LARGE)
    with reused_cpu_memory():
        small = torch.empty(1000)
    del large, small
    assert cached_cpu_bytes() == 0


def test_live_tensors_keep_their_values():
    with reused_cpu_memory():
        kept = torch.full((LARGE,), 7.0)
        for _ in range(3):
            scratch = torch.zeros(LARGE)
            del scratch
        assert torch.equal(kept, torch.full((LARGE,), 7.0))


def test_scopes_nest_and_belong_to_their_thread():
    seen = {}

    def other_thread():
        t = torch.empty(LARGE)  # no scope on this thread
        seen["pointer"] = t.data_ptr()

    with reused_cpu_memory():
        with reused_cpu_memory():
            pass
        t = torch.empty(LARGE)  # still inside the outer scope
        del t
        assert cached_cpu_bytes() == LARGE * 4
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert cached_cpu_bytes() == LARGE * 4  # the other thread's block went back to the system


def test_reuse_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ICNET_CPU_MEMORY_REUSE", "0")
    with reused_cpu_memory():
        t = torch.empty(LARGE)
        del t
    assert cached_cpu_bytes() == 0


def test_the_fused_model_gives_the_same_logits_with_reused_memory(monkeypatch):
    from icnet import ICNet
    torch.manual_seed(0)
    model = ICNet(width=0.25).eval()
    images = torch.randn(2, 1, 3, 257, 513) * 60  # maps of more than the 1 MiB threshold
    with torch.inference_mode():
        first = model(images[0])
        kept = first.clone()
        second = model(images[1])  # reuses the first call's freed blocks
        assert cached_cpu_bytes() > 0
        assert torch.equal(first, kept)  # a returned tensor is never a block the next call writes
        monkeypatch.setenv("ICNET_CPU_MEMORY_REUSE", "0")
        assert torch.equal(model(images[0]), first) and torch.equal(model(images[1]), second)
