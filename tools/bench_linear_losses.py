#!/usr/bin/env python
"""Benchmark: the fused output layer + loss against "output layer, then the loss" and Liger-Kernel.

For one tensor-parallel rank's problem — hidden states ``[tokens, H]`` and the output layer's shard
``[V_local, H]`` (TP is emulated by the local vocabulary size) — time forward+backward (gradients of
the hidden states and of the weight) and measure the peak memory of:

  linear+megatron_ce    hidden @ W.T, then megatron.core.tensor_parallel.vocab_parallel_cross_entropy
                        (the baseline, as Megatron runs it: on fp32 logits in place, no copy)
  linear+topk_jsd       hidden @ W.T, then topk_generalized_jsd(tail="tail"), K teacher entries
  linear+full_jsd       hidden @ W.T and the teacher's output layer (no gradient), then generalized_jsd
  linear_cross_entropy  this project's fused cross-entropy
  linear_topk_jsd       linear_topk_generalized_jsd(tail="tail")
  linear_topk_renorm    linear_topk_generalized_jsd(tail="renorm")
  linear_full_jsd       linear_generalized_jsd (colocated teacher: its hidden states and output layer)
  linear_full_jsd_chunkN
                        the same with chunk_size=N positions (--chunk, default 144: both chunk buffers
                        together within 0.1x of one float32 logits tensor)
  liger_fused_jsd       Liger-Kernel's LigerFusedLinearJSDLoss(compiled=False, weight_hard_loss=0,
                        weight_soft_loss=1): the student's and the teacher's output layers, full JSD

Every loss is summed over the tokens (Liger's is its mean, the same work). The teacher has the
student's hidden size; its top-K comes from its own logits. All variants run side by side in one
process, interleaved round-robin (one warm-up round); the table gives the median time and its ratio
to the baseline. Memory is measured in a separate child process per variant, as in
tools/bench_losses.py: ``peak`` is everything allocated during forward+backward beyond the inputs
(it includes the gradients of the hidden states and of the weight, which every variant must return),
``workspace`` is peak minus those gradients; both also as a multiple of one float32 logits tensor
``tokens x V_local x 4`` bytes, which the fused losses never materialize (the colocated-teacher loss
replaces two: the student's and the teacher's).

    python tools/bench_linear_losses.py                      # 4096 tokens, H=1024, V_local=32768, K=64, fp32
    python tools/bench_linear_losses.py --dtype bf16 --only 'megatron|linear_topk'

The targets (printed after the table, "met" only where the measurement says so): linear_topk_jsd
<= 1.2x linear+megatron_ce, linear_full_jsd <= 1.6x linear+megatron_ce, workspace of each fused loss
<= 0.1x the float32 logits it replaces (one tensor; two for linear_full_jsd, whose workspace is also
given against one).
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench_common import (
    finish,
    init_megatron_tp1,
    machine,
    measure_own_peak,
    memory_figures,
    peak_memory,
    time_variants,
)
from megatron_mopd.losses import (
    generalized_jsd,
    linear_cross_entropy,
    linear_generalized_jsd,
    linear_topk_generalized_jsd,
    topk_generalized_jsd,
)

Variant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden leaf, weight leaf) -> scalar loss
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "linear+megatron_ce"
# (what, variant, bound): time(variant) / time(BASELINE) <= bound.
TIME_TARGETS = (
    ("linear_topk_jsd <= 1.2x linear+megatron_ce", "linear_topk_jsd", 1.2),
    ("linear_full_jsd <= 1.6x linear+megatron_ce", "linear_full_jsd", 1.6),
)
# Fused variants with a memory target: (variant, float32 logits tensors it replaces).
FUSED = (("linear_cross_entropy", 1), ("linear_topk_jsd", 1), ("linear_topk_renorm", 1), ("linear_full_jsd", 2))
WORKSPACE_BOUND = 0.1


@dataclass(frozen=True)
class Problem:
    hidden: torch.Tensor  # [tokens, H]
    weight: torch.Tensor  # [V_local, H]
    teacher_hidden: torch.Tensor  # [tokens, H]
    teacher_weight: torch.Tensor  # [V_local, H]
    labels: torch.Tensor  # [tokens]
    teacher_logprobs: torch.Tensor  # [tokens, K]
    teacher_ids: torch.Tensor  # [tokens, K]

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh leaves of the two inputs a variant differentiates: the hidden states and the weight."""
        return self.hidden.detach().requires_grad_(True), self.weight.detach().requires_grad_(True)


def make_problem(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Problem:
    """Random inputs whose logits have a standard deviation of about 2 (as in bench_losses.py)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    scale = 2.0 / args.hidden**0.5

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    hidden, weight = randn(args.tokens, args.hidden), randn(args.local_vocab, args.hidden, std=scale)
    teacher_hidden, teacher_weight = randn(args.tokens, args.hidden), randn(args.local_vocab, args.hidden, std=scale)
    labels = torch.randint(0, args.local_vocab, (args.tokens,), generator=gen).to(device)
    logprobs, ids = [], []
    for start in range(0, args.tokens, 512):  # the teacher's top-K, without its [tokens, V_local] logits
        logits = (teacher_hidden[start : start + 512] @ teacher_weight.T).float()
        top = torch.log_softmax(logits, -1).topk(args.k, dim=-1)
        logprobs.append(top.values)
        ids.append(top.indices)
    return Problem(hidden, weight, teacher_hidden, teacher_weight, labels, torch.cat(logprobs), torch.cat(ids))


def build_variants(args: argparse.Namespace, p: Problem) -> dict[str, Variant]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    beta = args.beta

    def output_layer(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(hidden, weight.t())  # ColumnParallelLinear's forward (no bias)

    def megatron_ce(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As Megatron's GPT model runs it: on fp32 logits in place (they are the matmul's own output).
        return vocab_parallel_cross_entropy(output_layer(hidden, weight), p.labels).sum()

    def logits_topk(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return topk_generalized_jsd(output_layer(hidden, weight), p.teacher_logprobs, p.teacher_ids, beta=beta).sum()

    def logits_full(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = output_layer(p.teacher_hidden, p.teacher_weight)
        return generalized_jsd(output_layer(hidden, weight), teacher_logits, beta=beta).sum()

    def fused_topk(tail: str) -> Variant:
        return lambda hidden, weight: linear_topk_generalized_jsd(
            hidden, weight, p.teacher_logprobs, p.teacher_ids, beta=beta, tail=tail
        ).sum()

    def fused_full(chunk: int | None) -> Variant:
        return lambda hidden, weight: linear_generalized_jsd(
            hidden, weight, p.teacher_hidden, p.teacher_weight, beta=beta, chunk_size=chunk
        ).sum()

    variants: dict[str, Variant] = {
        BASELINE: megatron_ce,
        "linear+topk_jsd": logits_topk,
        "linear+full_jsd": logits_full,
        "linear_cross_entropy": lambda hidden, weight: linear_cross_entropy(hidden, weight, p.labels).sum(),
        "linear_topk_jsd": fused_topk("tail"),
        "linear_topk_renorm": fused_topk("renorm"),
        "linear_full_jsd": fused_full(None),
        f"linear_full_jsd_chunk{args.chunk}": fused_full(args.chunk),
    }
    liger = liger_jsd(beta)
    if isinstance(liger, str):
        if not args.measure_memory_of:
            print(f"liger_fused_jsd skipped: {liger}")
    else:
        variants["liger_fused_jsd"] = lambda hidden, weight: liger(
            hidden, weight, p.teacher_hidden, p.teacher_weight, p.labels
        )
    return {name: fn for name, fn in variants.items() if re.search(args.only, name)}


def liger_jsd(beta: float) -> Callable[..., torch.Tensor] | str:
    """Liger-Kernel's fused linear JSD (pure PyTorch with compiled=False), or why it is unavailable."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as error:  # liger-kernel is not a dependency of this project
        return f"liger-kernel is not importable ({error}); pip install liger-kernel"
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False)


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    p = make_problem(args, device, DTYPES[args.dtype])
    variants = build_variants(args, p)
    if args.measure_memory_of:
        print(measure_own_peak(variants[args.measure_memory_of], p.leaves))
        return []
    times = time_variants(variants, p.leaves, args.repeats, device)
    grad_bytes = sum(x.numel() * x.element_size() for x in (p.hidden, p.weight))
    baseline = statistics.median(times[BASELINE]) if BASELINE in times else float("nan")
    rows = []
    for name, loss_fn in variants.items():
        peak = peak_memory(name, loss_fn, p.leaves, device)
        median = statistics.median(times[name])
        rows.append(dict(
            variant=name,
            time_ms=median * 1e3,
            time_vs_baseline=median / baseline,
            **memory_figures(args, peak, grad_bytes),
        ))
    return rows


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The time and memory targets with their measured values; skipped where a variant did not run."""
    by_name = {r["variant"]: r for r in rows}
    verdicts = []
    for what, variant, bound in TIME_TARGETS:
        if variant in by_name and BASELINE in by_name:
            ratio = by_name[variant]["time_vs_baseline"]
            verdicts.append(dict(target=what, measured=ratio, met=ratio <= bound))
    for variant, replaced in FUSED:
        if variant in by_name:
            workspace = by_name[variant]["workspace_x_fp32_logits"] / replaced
            what = "the student's + teacher's fp32 logits" if replaced == 2 else "fp32 logits"
            verdicts.append(dict(target=f"{variant} workspace <= {WORKSPACE_BOUND}x {what}",
                                 measured=workspace, met=workspace <= WORKSPACE_BOUND))
    for variant in by_name:
        if variant.startswith("linear_full_jsd_chunk"):
            workspace = by_name[variant]["workspace_x_fp32_logits"]
            verdicts.append(dict(target=f"{variant} workspace <= {WORKSPACE_BOUND}x one fp32 logits tensor",
                                 measured=workspace, met=workspace <= WORKSPACE_BOUND))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024, help="H, the hidden size")
    parser.add_argument("--local-vocab", type=int, default=32768, help="V_local = padded vocab / TP")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk", type=int, default=144, help="chunk_size of the linear_full_jsd_chunkN row")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="regular expression: run the variants whose name matches")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_linear_losses.json"))
    parser.add_argument("--measure-memory-of", help=argparse.SUPPRESS)  # internal: child process mode
    args = parser.parse_args()
    if args.measure_memory_of:
        args.only = f"^{re.escape(args.measure_memory_of)}$"

    device = torch.device(args.device)
    init_megatron_tp1(device, cpu_mode=device.type == "cpu" and not args.measure_memory_of)
    rows = measure(args, device)
    if args.measure_memory_of:
        return

    header = f"{'variant':<26}{'time ms':>10}{'x base':>8}{'peak MiB':>11}{'peak x fp32':>13}{'workspace x fp32':>18}"
    print(
        f"\nbench_linear_losses: {args.tokens} tokens, H={args.hidden}, V_local={args.local_vocab}, K={args.k}, "
        f"beta={args.beta}, {args.dtype} on {device.type} ({machine(device)}), median of {args.repeats}; "
        f"base = {BASELINE}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:<26}{r['time_ms']:>10.1f}{r['time_vs_baseline']:>8.2f}{r['peak_mib']:>11.1f}"
              f"{r['peak_x_fp32_logits']:>13.3f}{r['workspace_x_fp32_logits']:>18.3f}")
    finish(args, device, rows, evaluate_targets(rows), "targets:",
           lambda v: f"  {'met    ' if v['met'] else 'NOT met'}  {v['target']}: measured {v['measured']:.3f}")


if __name__ == "__main__":
    main()
