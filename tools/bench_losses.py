#!/usr/bin/env python
"""Benchmark: our vocab-parallel losses against Megatron-Core's cross-entropy on the same logits.

For one local logits shard ``[tokens, V_local]`` (TP is emulated by the local shard size), time
forward+backward and measure peak memory of:

  megatron_ce       megatron.core.tensor_parallel.vocab_parallel_cross_entropy  (the baseline)
  topk_tail         topk_generalized_jsd(tail="tail"),   K teacher entries
  topk_renorm       topk_generalized_jsd(tail="renorm"), K teacher entries
  full_jsd          generalized_jsd (colocated teacher, same vocabulary)
  full_jsd_fused    the same with fused=True (torch.compile'd divergence core; compiled in warm-up)
  *_chunkN          the same with chunk_size=N tokens
  trl_gkd_jsd       TRL's GKDTrainer.generalized_jsd_loss (trl installed), autograd for the gradient
  pkl_tail          projected_kl(tail="tail"): cross-tokenizer P-KL through a real vocabulary projection
  pkl_renorm        projected_kl(tail="renorm")
  gold              gold_loss: JSD on common tokens + ULD on the rest

The cross-tokenizer variants use two tokenizers trained here (``megatron_mopd.demo.tokenizers``,
a byte-level BPE student and a SentencePiece-style teacher of ``--cross-vocab`` tokens), the projection
built between them (its build time is reported), 3 aligned chunks per 4 student positions and 5
teacher rows per 4 student positions, each with the teacher's top-K over its own vocabulary.

Megatron's cross-entropy runs as Megatron's GPT model runs it: on fp32 logits it works in place on
the output layer's result (no copy); on bf16 logits it makes its own float32 copy. Every other
variant gets the same logits. Each dtype (``--dtype``, both by default) gets its own table.

All variants run side by side in one process, interleaved round-robin; the table gives the median
time and its ratio to megatron_ce. Memory is measured in a separate pass (``peak_memory``):
``peak`` counts everything allocated during forward+backward beyond the inputs (so it includes the
logits' gradient, which every variant must produce); ``workspace`` is peak minus that gradient. Both
are also given as a multiple of the local logits in float32 (``x fp32``).

    python tools/bench_losses.py                       # 4096 tokens x 32k local vocab, K=64, fp32 and bf16
    python tools/bench_losses.py --only 'megatron_ce|full_jsd$'   # a subset of the variants
    python tools/bench_losses.py --device cuda --dtype bf16 --tokens 8192 --local-vocab 19008

The targets (printed after the tables, "met" only where the measured ratio says so): top-K JSD
(tail) <= 1.3x the cross-entropy, full JSD <= 2.2x the cross-entropy, full JSD >= 20x faster than
TRL's generalized_jsd_loss on fp32 logits.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from bench_common import (
    finish,
    init_megatron_tp1,
    machine,
    measure_own_peak,
    memory_figures,
    peak_memory,
    time_variants,
)
from megatron_mopd.crosstok import VocabProjection
from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe
from megatron_mopd.losses import generalized_jsd, gold_loss, projected_kl, topk_generalized_jsd

Variant = Callable[[torch.Tensor], torch.Tensor]  # logits (leaf) -> scalar loss


def trl_generalized_jsd() -> Callable[..., torch.Tensor] | None:
    """TRL's GKD loss (``GKDTrainer.generalized_jsd_loss``), or None when trl is not installed."""
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        return None
    return GKDTrainer.generalized_jsd_loss


def build_variants(args: argparse.Namespace, teacher: torch.Tensor, device: torch.device) -> dict[str, Variant]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator(device="cpu").manual_seed(1)
    target = torch.randint(0, args.local_vocab, (args.tokens,), generator=gen).to(device)
    teacher_logp, teacher_ids = torch.log_softmax(teacher.float(), -1).topk(args.k, dim=-1)
    beta = args.beta

    def megatron_ce(logits: torch.Tensor) -> torch.Tensor:
        # Megatron overwrites its input in place (logits - max, then exp): give it its own copy,
        # as the model's output layer does. The copy is part of its cost.
        return vocab_parallel_cross_entropy(logits, target).sum()

    def topk(tail: str, chunk: int | None) -> Variant:
        return lambda z: topk_generalized_jsd(
            z, teacher_logp, teacher_ids, beta=beta, tail=tail, chunk_size=chunk
        ).sum()

    def full(chunk: int | None, fused: bool = False) -> Variant:
        return lambda z: generalized_jsd(z, teacher, beta=beta, chunk_size=chunk, fused=fused).sum()

    variants: dict[str, Variant] = {
        "megatron_ce": megatron_ce,
        "topk_tail": topk("tail", None),
        "topk_renorm": topk("renorm", None),
        "full_jsd": full(None),
        "full_jsd_fused": full(None, fused=True),
        f"topk_tail_chunk{args.chunk}": topk("tail", args.chunk),
        f"full_jsd_chunk{args.chunk}": full(args.chunk),
    }
    if not args.skip_cross_tokenizer:
        variants.update(cross_tokenizer_variants(args, device))
    trl_loss = None if args.skip_trl else trl_generalized_jsd()
    if trl_loss is not None:
        # As TRL's trainer calls it: [batch, seq, vocab] logits of the model's dtype, summed here. Last in
        # each round: its ~15x-the-logits temporaries are freed before the round's next variant.
        variants["trl_gkd_jsd"] = lambda z: trl_loss(z[None], teacher[None], beta=beta, reduction="sum")
    elif not args.skip_trl:
        print("trl_gkd_jsd skipped: trl is not installed (pip install trl)")
    return {name: fn for name, fn in variants.items() if re.search(args.only, name)}


def projection_file(args: argparse.Namespace) -> Path:
    return args.out.parent / f"projection_{args.cross_vocab}.safetensors"


def build_projection(args: argparse.Namespace) -> dict:
    """Train the two tokenizers (cached), build and save their projection; its build figures."""
    student, teacher = byte_level_bpe(args.cross_vocab), sentencepiece_bpe(args.cross_vocab)
    start = time.perf_counter()
    projection = VocabProjection.build(student, teacher, progress=True)
    build_s = time.perf_counter() - start
    path = projection_file(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    projection.save(path)
    start = time.perf_counter()
    VocabProjection.load(path, student, teacher)
    load_s = time.perf_counter() - start
    return dict(
        student_vocab=len(student), teacher_vocab=len(teacher), build_s=build_s, load_s=load_s,
        stats=projection.stats.as_dict(),
    )


def cross_tokenizer_variants(args: argparse.Namespace, device: torch.device) -> dict[str, Variant]:
    projection = VocabProjection.load(projection_file(args))
    vocab = projection.student_vocab_size
    if vocab > args.local_vocab:
        raise SystemExit(f"--cross-vocab {args.cross_vocab} must not exceed --local-vocab {args.local_vocab}")
    num_chunks, teacher_rows = args.tokens * 3 // 4, args.tokens * 5 // 4
    student_chunks = (torch.arange(args.tokens) * num_chunks // args.tokens).to(device)
    teacher_chunks = (torch.arange(teacher_rows) * num_chunks // teacher_rows).to(device)
    gen = torch.Generator(device="cpu").manual_seed(2)
    logprobs, ids = [], []
    for rows in range(0, teacher_rows, 512):  # the teacher's top-K, without a [rows, V_teacher] tensor
        logits = torch.randn(min(512, teacher_rows - rows), projection.teacher_vocab_size, generator=gen) * 2
        top = torch.log_softmax(logits, -1).topk(args.k, dim=-1)
        logprobs.append(top.values)
        ids.append(top.indices)
    teacher_logp, teacher_ids = torch.cat(logprobs).to(device), torch.cat(ids).to(device)

    def cross(loss_fn, **options) -> Variant:
        return lambda z: loss_fn(
            z, student_chunks, teacher_logp, teacher_ids, teacher_chunks, projection,
            num_chunks=num_chunks, vocab_size=vocab, **options,
        ).sum()

    return {
        "pkl_tail": cross(projected_kl, tail="tail"),
        "pkl_renorm": cross(projected_kl, tail="renorm"),
        "gold": cross(gold_loss, beta=args.beta),
    }


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (what, dtypes, variant, baseline, bound): time(variant) / time(baseline) <= bound, or, for "faster
# than", time(baseline) / time(variant) >= bound. TRL's loss is compared on fp32 logits, where it
# computes in float32 as this project does (on bf16 logits it computes in bf16).
TARGETS = (
    ("top-K JSD (tail) <= 1.3x CE", ("fp32", "bf16"), "topk_tail", "megatron_ce", 1.3),
    ("full JSD <= 2.2x CE", ("fp32", "bf16"), "full_jsd", "megatron_ce", 2.2),
    ("full JSD >= 20x faster than TRL", ("fp32",), "full_jsd", "trl_gkd_jsd", 20.0),
)


def measure_dtype(args: argparse.Namespace, dtype_name: str, device: torch.device) -> list[dict]:
    """Time and measure every variant on logits of one dtype; one row per variant."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    student = (torch.randn(args.tokens, args.local_vocab, generator=gen) * 2).to(device, dtype)
    teacher = (torch.randn(args.tokens, args.local_vocab, generator=gen) * 2).to(device, dtype)
    variants = build_variants(args, teacher, device)

    def leaves() -> tuple[torch.Tensor]:
        return (student.detach().requires_grad_(True),)

    if args.measure_memory_of:
        print(measure_own_peak(variants[args.measure_memory_of], leaves))
        return []
    times = time_variants(variants, leaves, args.repeats, device)
    grad_bytes = student.numel() * student.element_size()
    baseline = statistics.median(times["megatron_ce"]) if "megatron_ce" in times else math.nan
    rows = []
    for name, loss_fn in tqdm(variants.items(), desc=f"peak memory ({dtype_name})", disable=None):
        peak = peak_memory(name, loss_fn, leaves, device, "--dtype", dtype_name)
        median = statistics.median(times[name])
        rows.append(
            dict(
                dtype=dtype_name,
                variant=name,
                time_ms=median * 1e3,
                time_vs_ce=median / baseline,
                **memory_figures(args, peak, grad_bytes),
            )
        )
    return rows


def print_table(args: argparse.Namespace, dtype_name: str, rows: list[dict], device: torch.device) -> None:
    header = f"{'variant':<22}{'time ms':>10}{'x CE':>8}{'peak MiB':>11}{'peak x fp32':>13}{'workspace x fp32':>18}"
    print(
        f"\nbench_losses: {args.tokens} tokens x {args.local_vocab} local vocab, K={args.k}, beta={args.beta}, "
        f"{dtype_name} logits on {device.type} ({machine(device)}), median of {args.repeats}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['variant']:<22}{r['time_ms']:>10.1f}{r['time_vs_ce']:>8.2f}{r['peak_mib']:>11.1f}"
            f"{r['peak_x_fp32_logits']:>13.2f}{r['workspace_x_fp32_logits']:>18.2f}"
        )


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target of TARGETS per dtype, with the measured ratio; skipped where a variant did not run."""
    times = {(r["dtype"], r["variant"]): r["time_ms"] for r in rows}
    verdicts = []
    for dtype_name in dict.fromkeys(r["dtype"] for r in rows):
        for what, dtypes, variant, baseline, bound in TARGETS:
            if dtype_name not in dtypes or (dtype_name, variant) not in times or (dtype_name, baseline) not in times:
                continue
            ratio = times[(dtype_name, variant)] / times[(dtype_name, baseline)]
            faster = "faster" in what
            measured = 1.0 / ratio if faster else ratio
            met = measured >= bound if faster else measured <= bound
            verdicts.append(dict(dtype=dtype_name, target=what, measured=measured, met=met))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--local-vocab", type=int, default=32768, help="V_local = padded vocab / TP")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk", type=int, default=512, help="chunk_size of the *_chunk variants")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="logits dtypes, one table each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="regular expression: run only the variants it matches")
    parser.add_argument("--skip-trl", action="store_true", help="skip TRL's generalized_jsd_loss (slow)")
    parser.add_argument("--skip-cross-tokenizer", action="store_true", help="skip P-KL and GOLD")
    parser.add_argument("--cross-vocab", type=int, default=32000, help="size of both trained tokenizers")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_losses.json"))
    parser.add_argument("--measure-memory-of", help=argparse.SUPPRESS)  # internal: child process mode
    args = parser.parse_args()

    device = torch.device(args.device)
    init_megatron_tp1(device, cpu_mode=device.type == "cpu" and not args.measure_memory_of)
    if args.measure_memory_of:
        measure_dtype(args, args.dtype[-1], device)
        return
    projection_build = None
    if not args.skip_cross_tokenizer and re.search(args.only, "pkl_tail pkl_renorm gold"):
        projection_build = build_projection(args)
    rows = []
    for dtype_name in args.dtype:
        rows += measure_dtype(args, dtype_name, device)
    for dtype_name in args.dtype:
        print_table(args, dtype_name, [r for r in rows if r["dtype"] == dtype_name], device)
    if projection_build:
        print(
            f"\nvocabulary projection {projection_build['student_vocab']} -> {projection_build['teacher_vocab']}: "
            f"built in {projection_build['build_s']:.1f} s, loaded in {projection_build['load_s'] * 1e3:.0f} ms, "
            f"rows {projection_build['stats']}"
        )
    finish(
        args, device, rows, evaluate_targets(rows), "targets",
        lambda v: (f"  {v['dtype']:<5} {v['target']:<34} measured {v['measured']:6.2f}   "
                   f"{'met' if v['met'] else 'NOT met'}"),
        projection_build=projection_build,
    )


if __name__ == "__main__":
    main()
