"""Triton kernels for the hot passes of the vocab-parallel losses, used on CUDA only.

The chunked PyTorch passes in ``parallel/chunking.py`` are launch- and bandwidth-bound on a GPU: each
chunk runs a dozen elementwise kernels and round-trips a float32 workspace. The kernels here do each
pass in one read of the logits (and one write of the gradient), with the math in float32 registers:

``logsumexp.py``        online logsumexp of the valid columns of each row (``local_logsumexp``),
                        optionally fused with the gather of the logits at given local ids
                        (``local_logsumexp_and_gather``, the top-k and token-logprob forwards).
``softmax_gradient.py`` the gradient ``p_v · dense_coef + ids_grad at local_ids`` written directly in
                        the logits' dtype (``softmax_gradient``).
``jsd.py``              the full-vocabulary generalized JSD's per-chunk epilogue: partial loss and Σg
                        per row, then the gradient ``(g − p_s · Σg) · scale``.

The same kernels are the chunk epilogues of the fused output-layer losses (``losses/linear.py``): on
CUDA their logits chunks are position-major and the gradient kernels write over them in place.

Triton is optional (the ``kernels`` extra): nothing here imports it until a CUDA tensor asks for a
kernel, so CPU and NPU runs never need it. ``use_triton(tensor)`` is the dispatch rule the callers
use; ``MOPD_DISABLE_TRITON=1`` forces the PyTorch path on CUDA too. Every kernel is tested against
the PyTorch path with Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors
(tests/test_triton_kernels.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

DISABLE_ENV = "MOPD_DISABLE_TRITON"


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_disabled() -> bool:
    """Whether ``MOPD_DISABLE_TRITON=1`` asks for the PyTorch path everywhere (read at each call)."""
    return os.environ.get(DISABLE_ENV, "0") == "1"


def use_triton(where: torch.Tensor | torch.device) -> bool:
    """True when the passes over a tensor (or on a device) should run the Triton kernels.

    That is: it is on a CUDA device, Triton is installed, and ``MOPD_DISABLE_TRITON`` is not ``1``.
    CPU and NPU tensors always take the PyTorch path (without even looking for Triton). The device's
    type decides, not ``Tensor.is_cuda``, which answers True for NPU tensors under ``torch_npu``'s
    ``transfer_to_npu`` (MindSpeed's adaptor activates it).
    """
    on_cuda = (where if isinstance(where, torch.device) else where.device).type == "cuda"
    return on_cuda and not triton_disabled() and triton_available()


__all__ = ["DISABLE_ENV", "triton_available", "triton_disabled", "use_triton"]
