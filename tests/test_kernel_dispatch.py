"""The dispatch to the Triton kernels: CUDA tensors only, never on CPU, Triton never required.

These run without Triton; the kernels themselves are tested in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_mopd import kernels
from megatron_mopd.losses import (
    generalized_jsd,
    linear_generalized_jsd,
    linear_topk_generalized_jsd,
    topk_generalized_jsd,
    vocab_parallel_token_logprobs,
)
from megatron_mopd.parallel.chunking import local_logsumexp
from megatron_mopd.parallel.vocab import VocabShard

KERNEL_MODULES = tuple(f"megatron_mopd.kernels.{name}" for name in ("logsumexp", "softmax_gradient", "jsd"))


def test_cpu_tensors_take_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not kernels.use_triton(torch.zeros(2, 3))
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.use_triton(cuda)
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.use_triton(cuda) == kernels.triton_available()
    # the device type decides: torch_npu's transfer_to_npu makes an NPU tensor answer is_cuda with True
    npu_tensor = SimpleNamespace(is_cuda=True, device=SimpleNamespace(type="npu"))
    assert not kernels.use_triton(npu_tensor)  # type: ignore[arg-type]


def test_the_losses_on_cpu_never_load_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every kernel module made unimportable, the losses' forward and backward still run on CPU."""
    for name in KERNEL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 40, generator=gen) * 2).requires_grad_(True)
    top_logp, top_ids = torch.log_softmax(torch.randn(2, 3, 36, generator=gen), -1).topk(4, dim=-1)
    labels = torch.randint(0, 36, (2, 3), generator=gen)
    loss = topk_generalized_jsd(logits, top_logp, top_ids, temperature=0.7, vocab_size=36).sum()
    loss = loss + vocab_parallel_token_logprobs(logits, labels, temperature=0.7, vocab_size=36).sum()
    loss = loss + generalized_jsd(logits, torch.randn(2, 3, 40, generator=gen), vocab_size=36).sum()
    hidden, weight = torch.randn(2, 3, 8, generator=gen).requires_grad_(True), torch.randn(40, 8, generator=gen)
    loss = loss + linear_topk_generalized_jsd(hidden, weight, top_logp, top_ids, vocab_size=36).sum()
    loss = loss + linear_generalized_jsd(hidden, weight, hidden.detach(), weight, vocab_size=36).sum()
    loss.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert hidden.grad is not None and bool(torch.isfinite(hidden.grad).all())


def test_fused_gather_and_logsumexp_on_cpu_equal_the_two_separate_calls() -> None:
    """``VocabShard.gather_columns_and_logsumexp`` (the top-k and token-logprob forwards) gives, bit for
    bit, what ``gather_columns`` and ``logsumexp(local_logsumexp(...))`` gave before it existed."""
    gen = torch.Generator().manual_seed(1)
    shard = VocabShard.of(50, 45)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(9, 50, generator=gen) * 3).to(dtype)
        logits[2] = -torch.inf
        ids = torch.randint(0, 45, (9, 6), generator=gen)
        present = torch.rand(9, 6, generator=gen) > 0.2
        for tau in (1.0, 0.7):
            values, lse = shard.gather_columns_and_logsumexp(logits, ids, present, tau, 4)
            assert torch.equal(values, shard.gather_columns(logits, ids, present))
            assert torch.equal(lse, shard.logsumexp(local_logsumexp(logits, shard.num_valid, tau, 4)))


def test_importing_the_package_does_not_need_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, megatron_mopd.losses, megatron_mopd.parallel.chunking\n"
        "from megatron_mopd.kernels import triton_available, use_triton\n"
        "assert not triton_available() and not use_triton(torch.zeros(1))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
