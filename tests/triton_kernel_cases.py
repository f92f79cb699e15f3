"""The Triton kernels against the PyTorch path, run by Triton's interpreter on CPU tensors.

Run as a script in its own process with ``TRITON_INTERPRET=1`` (tests/test_triton_kernels.py does):
the variable must be set before any kernel is defined, which another test module of the same pytest
process may already have done without it (e.g. through ``torch._inductor``). Prints one JSON line:
``{case: "ok" | the failure}`` and the seconds each case took. Importing this module defines the
case names only; nothing here imports Triton until ``main`` runs.

References: the PyTorch functions the kernels replace (``parallel.chunking``, ``gather_columns``,
``losses.divergence.generalized_jsd_terms``), evaluated on the float32 values of the inputs: the
kernels do their math in float32 on the loaded values (the PyTorch path on bfloat16 logits with
τ ≠ 1 rounds z/τ to bfloat16 first, so it is not the reference there). Tolerances: float32 results
1e-6 relative to the size of their operands (``assert_close``); bfloat16 / float16 outputs the
dtype's ``torch.testing`` tolerance (Triton's interpreter truncates float32 → bfloat16 where the GPU
rounds to nearest, so bit equality is not the test here).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable, Optional

import torch

Case = Callable[[], None]
CASES: dict[str, Case] = {}

SHAPES = ((37, 30), (64, 64), (300, 250))  # (V_local, num_valid)
TEMPERATURES = (1.0, 0.7)
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
NUM_ROWS = 7
# (logits dtype, gradient dtype, τ) of the gradient kernels (the loss modules write the logits' dtype)
GRADIENT_DTYPES = (
    (torch.float32, torch.float32, 1.0),
    (torch.float32, torch.float32, 0.7),
    (torch.float32, torch.bfloat16, 0.7),
    (torch.float32, torch.float16, 1.0),
    (torch.bfloat16, torch.bfloat16, 0.7),
)


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, magnitude: Optional[torch.Tensor] = None, what: str = ""
) -> None:
    """float32: 1e-6 relative to the magnitude of the operands; lower precision: the dtype's tolerance.

    Non-finite entries must match exactly (NaN for NaN, ±inf for ±inf). The float32 bound is
    ``1e-6 · (|expected| + magnitude)`` per element, ``magnitude`` being the size of the operands an
    entry was computed from (default: ``max|expected|``): a gradient entry like p·c + g or g − p·Σg
    may cancel far below its operands, and no float32 evaluation order (nor this reference) gets it
    closer than a few of its operands' ulps to the exact value.
    """
    expected = expected.float()
    if actual.dtype != torch.float32:
        rtol, atol = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}[actual.dtype]
        torch.testing.assert_close(
            actual.float(), expected.to(actual.dtype).float(), rtol=rtol, atol=atol, equal_nan=True,
            msg=lambda m: f"{what}: {m}",
        )
        return
    finite = torch.isfinite(expected)
    same_non_finite = torch.equal(actual.isnan(), expected.isnan()) and torch.equal(
        torch.where(finite, 0.0, actual.nan_to_num(0.0)), torch.where(finite, 0.0, expected.nan_to_num(0.0))
    )
    assert same_non_finite, f"{what}: non-finite entries differ:\n{actual}\n{expected}"
    if magnitude is None:
        magnitude = expected[finite].abs().max() if finite.any() else torch.tensor(0.0)
    bound = torch.where(finite, 1e-6 * (expected.abs() + magnitude).nan_to_num(0.0), torch.inf)
    error = torch.where(finite, (actual - expected).abs(), 0.0)
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (
        f"{what}: |actual - expected| = {error.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g} at flat "
        f"index {worst} (actual {actual.flatten()[worst]:.9g}, expected {expected.flatten()[worst]:.9g})"
    )


def make_logits(num_cols: int, num_valid: int, dtype: torch.dtype, seed: int, *, wide: bool = False) -> torch.Tensor:
    """``[NUM_ROWS, num_cols]`` logits with the awkward rows: only -inf, valid columns -inf but padding
    finite, a few -inf, large values. ``wide``: a column slice of a wider tensor (row stride >
    num_cols), left a view, so float32 only."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(NUM_ROWS, num_cols + 5, generator=gen) * 4.0)[:, :num_cols]
    z[1] = -torch.inf
    z[2, :num_valid] = -torch.inf  # the padded columns stay finite: they must be ignored
    z[3, ::3] = -torch.inf
    z[4] += 40.0
    if wide:
        assert dtype == torch.float32
        return z
    return z.to(dtype).contiguous()


def local_ids_and_owned(num_cols: int, num_valid: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local ids over the whole shard (padding included) and the owned mask ``owned_local_ids`` gives."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_cols, (NUM_ROWS, k), generator=gen)
    owned = (torch.rand(NUM_ROWS, k, generator=gen) > 0.3) & (ids < num_valid)
    return ids, owned


@case
def logsumexp_and_gather_match_local_logsumexp_and_gather_columns() -> None:
    from megatron_mopd.kernels.logsumexp import triton_local_logsumexp, triton_logsumexp_and_gather
    from megatron_mopd.parallel.chunking import local_logsumexp

    for seed, (num_cols, num_valid) in enumerate(SHAPES):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for tau in TEMPERATURES:
                z = make_logits(num_cols, num_valid, dtype, seed)
                expected = local_logsumexp(z.float(), num_valid, tau, 3)
                what = f"lse V={num_cols} valid={num_valid} {dtype} tau={tau}"
                assert_close(triton_local_logsumexp(z, num_valid, tau, block_size=32), expected, what=what)
                if dtype == torch.float32:  # the default block (one block per row at these sizes)
                    assert_close(triton_local_logsumexp(z, num_valid, tau), expected, what=what + " default block")
                for k in (1, 20):
                    ids, owned = local_ids_and_owned(num_cols, num_valid, k, seed + k)
                    lse, values = triton_logsumexp_and_gather(z, num_valid, tau, ids, owned, block_size=32)
                    assert_close(lse, expected, what=what + f" K={k}")
                    assert torch.equal(values, torch.where(owned, z.gather(-1, ids).float(), 0.0)), what
        # no valid column at all (a rank holding only padding): -inf everywhere, ids never owned
        z = make_logits(num_cols, num_valid, torch.float32, seed)
        ids, owned = local_ids_and_owned(num_cols, 0, 4, seed)
        lse, values = triton_logsumexp_and_gather(z, 0, 1.0, ids, owned)
        assert torch.equal(lse, torch.full((NUM_ROWS,), -torch.inf)) and not values.any()


@case
def logsumexp_of_a_strided_view_and_of_nan_and_inf_rows() -> None:
    from megatron_mopd.kernels.logsumexp import triton_local_logsumexp
    from megatron_mopd.parallel.chunking import local_logsumexp

    z = make_logits(300, 250, torch.float32, 7, wide=True)
    assert z.stride(0) == 305
    assert_close(triton_local_logsumexp(z, 250, 0.7, block_size=64), local_logsumexp(z, 250, 0.7, 2), what="strided")
    z = make_logits(64, 60, torch.float32, 8)
    z[5, 10] = torch.nan
    z[6, 20] = torch.inf
    got = triton_local_logsumexp(z, 60, 1.0, block_size=16)
    assert got[5].isnan() and got[6].isnan(), got
    assert_close(got, local_logsumexp(z, 60, 1.0, 4), what="nan/inf rows")


def _softmax_gradient_inputs(
    num_cols: int, num_valid: int, dtype: torch.dtype, tau: float, k: int, seed: int
) -> tuple[torch.Tensor, ...]:
    from megatron_mopd.parallel.chunking import local_logsumexp

    gen = torch.Generator().manual_seed(100 + seed)
    z = make_logits(num_cols, num_valid, dtype, seed)
    lse = local_logsumexp(z.float(), num_valid, tau, 4)
    lse[1] = 0.0  # a row of only -inf: p = 0 there (with its own lse, -inf, p would be NaN on both paths)
    ids, owned = local_ids_and_owned(num_cols, num_valid, k, seed)
    if k > 1:
        ids[0, 1] = ids[0, 0]  # a repeated id: scatter_add sums
        owned[0, :2] = ids[0, 0] < num_valid
        ids[2, :] = num_valid - 1  # not owned ids clamped onto the last valid column, one owned
        owned[2, :] = False
        owned[2, 0] = True
    ids_grad = torch.where(owned, torch.randn(NUM_ROWS, k, generator=gen), 0.0)
    dense_coef = torch.randn(NUM_ROWS, 1, generator=gen)
    return z, lse, dense_coef, ids, ids_grad


@case
def softmax_gradient_matches_the_pytorch_path() -> None:
    from megatron_mopd.kernels.softmax_gradient import triton_softmax_gradient
    from megatron_mopd.parallel.chunking import softmax_gradient

    for seed, (num_cols, num_valid) in enumerate(SHAPES):
        for in_dtype, out_dtype, tau in GRADIENT_DTYPES:
            # K = 70: two programs per row, each comparing against two blocks of the row's ids
            for k, ids_block in ((1, None), (7, 4)) + (((70, None),) if out_dtype == torch.float32 else ()):
                z, lse, coef, ids, ids_grad = _softmax_gradient_inputs(num_cols, num_valid, in_dtype, tau, k, seed)
                expected = softmax_gradient(z.float(), lse, coef, ids, ids_grad, num_valid, tau, 3, torch.float32)
                got = triton_softmax_gradient(
                    z, lse, coef, ids, ids_grad, num_valid, tau, out_dtype, block_size=128, ids_block_size=ids_block
                )
                what = f"grad V={num_cols} valid={num_valid} {in_dtype}->{out_dtype} tau={tau} K={k}"
                assert got.dtype == out_dtype and got.shape == z.shape, what
                assert not got[:, num_valid:].any(), what + ": padded columns must be 0"
                assert_close(got, expected, what=what)
                if out_dtype == in_dtype == torch.float32 and tau == 1.0:  # the default block sizes too
                    got = triton_softmax_gradient(z, lse, coef, ids, ids_grad, num_valid, tau, out_dtype)
                    assert_close(got, expected, what=what + " default blocks")
                if out_dtype == in_dtype == torch.float32:  # in place over the logits, as the fused chunks do
                    in_place = z.t().contiguous().t()  # position-major view of a vocabulary-major buffer
                    triton_softmax_gradient(in_place, lse, coef, ids, ids_grad, num_valid, tau, out_dtype,
                                            block_size=128, ids_block_size=ids_block, out=in_place)
                    assert_close(in_place, expected, what=what + " in place, strided")


def _jsd_inputs(num_cols: int, num_valid: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher rows: random, equal, nearly equal, -inf on either side or both, and
    padded columns holding garbage (NaN, +inf) that must be ignored."""
    gen = torch.Generator().manual_seed(200 + seed)
    z_s = torch.randn(NUM_ROWS, num_cols, generator=gen) * 3.0
    z_t = torch.randn(NUM_ROWS, num_cols, generator=gen) * 3.0
    z_t[1] = z_s[1]
    z_t[2] = z_s[2] + 1e-3 * torch.randn(num_cols, generator=gen)
    z_s[3, ::4] = -torch.inf  # student 0 where the teacher has mass: KL(T‖S) = +inf
    z_t[4, 1::5] = -torch.inf  # teacher 0 where the student has mass: KL(S‖T) = +inf
    z_s[5, ::3] = -torch.inf
    z_t[5, ::3] = -torch.inf  # both 0
    if num_valid < num_cols:
        z_s[:, num_valid] = torch.nan
        z_t[:, num_valid:] = torch.inf
    return z_s.to(dtype), z_t.to(dtype)


def _jsd_reference(
    z_s: torch.Tensor, z_t: torch.Tensor, num_valid: int, beta: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse_s, lse_t, loss, g_sum, ∂loss/∂z_s without the scale, the magnitude of its operands) from
    ``generalized_jsd_terms``."""
    from megatron_mopd.losses.divergence import generalized_jsd_terms

    x_s, x_t = z_s[:, :num_valid].float() * (1.0 / tau), z_t[:, :num_valid].float() * (1.0 / tau)
    lse_s, lse_t = torch.logsumexp(x_s, -1), torch.logsumexp(x_t, -1)
    s, t = x_s - lse_s[:, None], x_t - lse_t[:, None]
    loss, g = generalized_jsd_terms(s, t, beta)
    g_sum = g.sum(-1)
    grad, magnitude = torch.zeros(z_s.shape), torch.zeros(z_s.shape)
    grad[:, :num_valid] = g - s.exp() * g_sum[:, None]
    # The operands of each entry: g and p_s·Σg, and the rounding that s and t carry into g through
    # d = t − s (both fp32 evaluations of a nearly equal s, t are off by ~ulp(s) in d).
    p_s = s.exp()
    s_abs, t_abs = (torch.where(torch.isfinite(x), x.abs(), 0.0) for x in (s, t))
    operands = g.abs() + (p_s * g_sum[:, None]).abs() + p_s * (s_abs + t_abs)
    magnitude[:, :num_valid] = operands.nan_to_num(0.0)
    return lse_s, lse_t, loss, g_sum, grad, magnitude


@case
def jsd_loss_terms_and_gradient_match_generalized_jsd_terms() -> None:
    from megatron_mopd.kernels.jsd import triton_jsd_gradient, triton_jsd_loss_terms

    scale = torch.linspace(0.5, 2.0, NUM_ROWS)
    for seed, (num_cols, num_valid) in enumerate(SHAPES):
        for in_dtype, out_dtype, tau in GRADIENT_DTYPES:
            # every β in float32; the other dtypes change only the loads and the store
            for beta in BETAS if in_dtype == out_dtype == torch.float32 else (0.0, 0.5):
                z_s, z_t = _jsd_inputs(num_cols, num_valid, in_dtype, seed)
                lse_s, lse_t, loss, g_sum, grad, magnitude = _jsd_reference(z_s, z_t, num_valid, beta, tau)
                what = f"jsd V={num_cols} valid={num_valid} {in_dtype}->{out_dtype} tau={tau} beta={beta}"
                got_loss, got_g_sum = triton_jsd_loss_terms(
                    z_s, z_t, lse_s, lse_t, num_valid, beta, tau, block_size=64
                )
                assert_close(got_loss, loss, what=what + " loss")
                assert_close(got_g_sum, g_sum, what=what + " g_sum")
                out = torch.full(z_s.shape, 7.0, dtype=out_dtype)  # every element must be written
                triton_jsd_gradient(z_s, z_t, lse_s, lse_t, g_sum, num_valid, beta, tau, scale, out, block_size=128)
                assert_close(out, grad * scale[:, None], magnitude=magnitude * scale[:, None], what=f"{what} grad")
                if out_dtype == in_dtype == torch.float32 and tau == 1.0:  # a scalar scale, the default blocks
                    loss_default = triton_jsd_loss_terms(z_s, z_t, lse_s, lse_t, num_valid, beta, tau)[0]
                    assert_close(loss_default, loss, what=what + " loss, default block")
                    triton_jsd_gradient(z_s, z_t, lse_s, lse_t, g_sum, num_valid, beta, tau, 0.25, out)
                    assert_close(out, grad * 0.25, magnitude=magnitude * 0.25, what=what + " grad, default block")


@case
def jsd_kernels_on_two_shards_add_up_to_the_whole_vocabulary() -> None:
    """Tensor parallelism: per-shard partial sums with the global lse and Σg equal the whole row's."""
    from megatron_mopd.kernels.jsd import triton_jsd_gradient, triton_jsd_loss_terms

    vocab_size, local = 270, 150
    z_s, z_t = _jsd_inputs(2 * local, vocab_size, torch.float32, 3)
    for beta in (0.0, 0.5, 1.0):
        lse_s, lse_t, loss, g_sum, grad, magnitude = _jsd_reference(z_s, z_t, vocab_size, beta, 0.7)
        columns = [slice(r * local, (r + 1) * local) for r in range(2)]
        num_valid = (150, 120)  # rank 1 holds the 30 padded ids
        parts = [
            triton_jsd_loss_terms(z_s[:, c], z_t[:, c], lse_s, lse_t, n, beta, 0.7, block_size=32)
            for c, n in zip(columns, num_valid)
        ]
        assert_close(parts[0][0] + parts[1][0], loss, what=f"beta={beta} loss")
        assert_close(parts[0][1] + parts[1][1], g_sum, what=f"beta={beta} g_sum")
        for rank, (c, n) in enumerate(zip(columns, num_valid)):
            out = torch.empty(NUM_ROWS, local)
            triton_jsd_gradient(z_s[:, c], z_t[:, c], lse_s, lse_t, g_sum, n, beta, 0.7, 1.0, out)
            assert_close(out, grad[:, c], magnitude=magnitude[:, c], what=f"beta={beta} grad of rank {rank}")


def _loss_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∂(Σ w·loss)/∂logits) with fixed weights w, so each position's upstream gradient differs."""
    leaf = logits.detach().requires_grad_(True)
    loss = fn(leaf)
    weights = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
    (loss * weights).sum().backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


@case
def losses_through_the_dispatch_match_the_pytorch_path() -> None:
    """topk_generalized_jsd (``tail``: lse + gather and the gradient kernels) and
    vocab_parallel_token_logprobs, forward and backward, with the dispatch switched to the kernels for
    CPU tensors, against the same calls on the PyTorch path (on the float32 values of the logits)."""
    import megatron_mopd.parallel.chunking as chunking
    from megatron_mopd.losses import topk_generalized_jsd, vocab_parallel_token_logprobs

    vocab_size, local = 250, 300
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, local, generator=gen) * 3.0
    logits[0, 1, ::7] = -torch.inf
    teacher = torch.log_softmax(torch.randn(3, 4, vocab_size, generator=gen) * 2.0, -1)
    top_logp, top_ids = teacher.topk(6, dim=-1)
    top_logp[1, 2, 4:] = -torch.inf  # absent entries
    labels = torch.randint(0, vocab_size, (3, 4), generator=gen)
    labels[2, 3] = -100

    def variants(tau: float) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {
            "topk_tail": lambda z: topk_generalized_jsd(
                z, top_logp, top_ids, beta=0.5, temperature=tau, vocab_size=vocab_size, chunk_size=5
            ),
            "token_logprob": lambda z: vocab_parallel_token_logprobs(
                z, labels, temperature=tau, vocab_size=vocab_size, chunk_size=5
            ),
        }

    original = chunking.use_triton
    dispatched: list[torch.Tensor] = []

    def always(tensor: torch.Tensor) -> bool:
        dispatched.append(tensor)
        return True

    for tau in TEMPERATURES:
        for name, fn in variants(tau).items():
            for dtype in (torch.float32, torch.bfloat16):
                values = logits.to(dtype)
                expected_loss, expected_grad = _loss_and_grad(fn, values.float())
                dispatched.clear()
                chunking.use_triton = always
                try:
                    loss, grad = _loss_and_grad(fn, values)
                finally:
                    chunking.use_triton = original
                assert len(dispatched) == 2, f"{name}: the forward and the backward each dispatch once"
                what = f"{name} tau={tau} {dtype}"
                assert grad.dtype == dtype, what
                assert_close(loss, expected_loss, what=what + " loss")
                assert_close(grad, expected_grad, what=what + " grad")


@case
def generalized_jsd_through_the_dispatch_matches_the_pytorch_path() -> None:
    """generalized_jsd (the logsumexp, partial-sums and gradient kernels) forward and backward, with the
    dispatch switched to the kernels for CPU tensors, against the PyTorch path on the float32 values."""
    import megatron_mopd.losses.jsd as jsd
    import megatron_mopd.parallel.chunking as chunking
    from megatron_mopd.losses import generalized_jsd

    vocab_size, local = 250, 300
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(3, 4, local, generator=gen) * 3.0
    teacher = torch.randn(3, 4, local, generator=gen) * 3.0
    student[0, 1, ::7] = -torch.inf
    teacher[2, 0, 1::9] = -torch.inf
    originals = (jsd.use_triton, chunking.use_triton)
    dispatched: list[torch.Tensor] = []

    def always(tensor: torch.Tensor) -> bool:
        dispatched.append(tensor)
        return True

    for tau in TEMPERATURES:
        for beta in (0.0, 0.3, 1.0):
            def fn(z: torch.Tensor) -> torch.Tensor:
                return generalized_jsd(z, teacher.to(z.dtype), beta=beta, temperature=tau, vocab_size=vocab_size,
                                       chunk_size=5, validate=False)

            for dtype in (torch.float32, torch.bfloat16):
                values = student.to(dtype)
                expected_loss, expected_grad = _loss_and_grad(
                    lambda z: generalized_jsd(z, teacher.to(dtype).float(), beta=beta, temperature=tau,
                                              vocab_size=vocab_size, chunk_size=5, validate=False), values.float())
                dispatched.clear()
                jsd.use_triton = chunking.use_triton = always
                try:
                    loss, grad = _loss_and_grad(fn, values)
                finally:
                    jsd.use_triton, chunking.use_triton = originals
                assert dispatched, "the kernels were dispatched"
                what = f"generalized_jsd beta={beta} tau={tau} {dtype}"
                assert grad.dtype == dtype, what
                # the two paths evaluate p_s·(g − Σg) in other orders: compare at its operands' size
                magnitude = _jsd_reference(values.float().reshape(-1, local), teacher.to(dtype).float().reshape(
                    -1, local), vocab_size, beta, tau)[5].view(grad.shape) * (1.5 / tau)  # upstream weights <= 1.5
                assert_close(loss, expected_loss, what=what + " loss")
                assert_close(grad, expected_grad, magnitude=magnitude, what=what + " grad")


@case
def fused_output_layer_losses_through_the_dispatch_match_the_pytorch_path() -> None:
    """The fused output-layer losses (linear_topk_generalized_jsd tail and renorm, linear_cross_entropy,
    linear_generalized_jsd) with the dispatch switched to the kernels for CPU tensors — position-major
    chunks, the epilogue kernels writing the gradient over the logits in place — against the PyTorch
    path: loss, hidden and weight gradients (norm-wise relative 1e-5), with the gradients computed in
    forward (a masked sum) and recomputed in backward (per-position weights)."""
    import megatron_mopd.losses.jsd as jsd
    import megatron_mopd.losses.linear as linear
    import megatron_mopd.losses.linear_chunk_losses as chunk_losses
    import megatron_mopd.parallel.chunking as chunking
    from megatron_mopd.losses import linear_cross_entropy, linear_generalized_jsd, linear_topk_generalized_jsd

    modules = (jsd, linear, chunk_losses, chunking)
    originals = [module.use_triton for module in modules]
    vocab_size, padded, hidden_size, positions = 150, 160, 12, (6, 2)
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(*positions, hidden_size, generator=gen)
    weight = torch.randn(padded, hidden_size, generator=gen) * 0.7
    teacher_hidden = torch.randn(*positions, hidden_size, generator=gen)
    teacher_weight = torch.randn(padded, hidden_size, generator=gen) * 0.7
    teacher = torch.log_softmax((teacher_hidden @ teacher_weight.T)[..., :vocab_size], -1)
    top_logp, top_ids = teacher.topk(5, dim=-1)
    top_logp[1, 0, 3:] = -torch.inf
    labels = torch.randint(0, vocab_size, positions, generator=gen)
    labels[0, 1] = -100
    mask = labels != -100
    weights = torch.linspace(0.5, 1.5, mask.numel()).view(positions)

    def losses(tau: float) -> dict[str, Callable[..., torch.Tensor]]:
        common = dict(vocab_size=vocab_size, chunk_size=5, validate=False, loss_mask=mask)
        return {
            "topk_tail": lambda h, w, **o: linear_topk_generalized_jsd(h, w, top_logp, top_ids, beta=0.3,
                                                                       temperature=tau, **common, **o),
            "topk_renorm": lambda h, w, **o: linear_topk_generalized_jsd(h, w, top_logp, top_ids, tail="renorm",
                                                                         temperature=tau, **common, **o),
            "cross_entropy": lambda h, w, **o: linear_cross_entropy(h, w, labels, temperature=tau, **common, **o),
            **{f"jsd beta={beta}": (lambda h, w, beta=beta, **o: linear_generalized_jsd(
                h, w, teacher_hidden, teacher_weight, beta=beta, temperature=tau, **common, **o))
               for beta in (0.0, 0.5, 1.0)},
        }

    def run(fn: Callable[..., torch.Tensor], recompute: bool) -> tuple[torch.Tensor, ...]:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w, gradient_in_forward=not recompute)
        (loss * (weights if recompute else mask)).sum().backward()
        return loss.detach(), h.grad, w.grad

    def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
        return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))

    for tau in TEMPERATURES:
        for name, fn in losses(tau).items():
            for recompute in (False, True):
                expected = run(fn, recompute)
                for module in modules:
                    module.use_triton = lambda where: True
                try:
                    got = run(fn, recompute)
                finally:
                    for module, original in zip(modules, originals):
                        module.use_triton = original
                for part, a, e in zip(("loss", "hidden grad", "weight grad"), got, expected):
                    error = rel_err(a, e)
                    assert error <= 1e-5, f"{name} tau={tau} recompute={recompute} {part}: rel err {error:.2e}"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 (tests/test_triton_kernels.py does)", file=sys.stderr)
        return 2
    results: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name, fn in CASES.items():
        start = time.perf_counter()
        error: Optional[str] = None
        try:
            fn()
        except Exception:  # a failing case is reported, the others still run
            error = traceback.format_exc(limit=4)
        seconds[name] = round(time.perf_counter() - start, 2)
        results[name] = error or "ok"
    print(json.dumps({"results": results, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
