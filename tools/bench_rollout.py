#!/usr/bin/env python
"""Benchmark: sampling throughput of the rollout engines (Megatron-native, and through servers) against
``transformers``.

One run, side by side, on the same Hugging Face model (default: the demo's teacher, a small Llama), the
same prompts and sampling (temperature 1, no top-k/top-p, no stop token, ``--new-tokens`` each):

``hf_generate``  ``AutoModelForCausalLM.generate(do_sample=True)``, left-padded batch, this process
                 (PyTorch's default thread count: how its users run it);
``megatron_tp1`` ``MegatronRolloutEngine`` in this process (world size 1, the same thread count);
``megatron_tp2`` the engine at TP=2 on two gloo ranks (one thread each: the cores split between them);
``reference_server`` ``ServerRolloutEngine`` (TP=1, this process) sampling through the reference server
                 (``mopd serve-teacher``, a subprocess, vLLM protocol) on a copy of the model;
``vllm``         the same engine through a real vLLM server (``--dtype float32 --enforce-eager``) on
                 that copy; reported as absent unless ``vllm`` is importable (vLLM's CPU attention
                 refuses the demo teacher's head_dim of 16: pass ``--model`` with head_dim 64).

The server rows time ``generate`` after the warm-up call, which also pushed the weights (the weights
version does not change afterwards, so no timed call pushes).

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
    from megatron_mopd.platform import destroy_parallel, initialize_parallel
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


def server_seconds(model_dir: Path, server: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    """``ServerRolloutEngine``'s median seconds per call through ``server`` ("reference" or "vllm")."""
    import shutil
    import tempfile

    from megatron_mopd.models import GPTArchitecture, load_hf_weights
    from megatron_mopd.platform import destroy_parallel, initialize_parallel
    from megatron_mopd.rollout import SamplingParams
    from megatron_mopd.rollout.server_engine import DiskWeightSync, ServerRolloutEngine
    from megatron_mopd.teachers.server_process import teacher_server_process, vllm_server_process

    length = max(len(p) for p in prompts) + new_tokens
    with tempfile.TemporaryDirectory() as scratch:
        served_dir = Path(scratch) / "served"
        shutil.copytree(model_dir, served_dir)
        start = (vllm_server_process(served_dir, "--enforce-eager", "--max-model-len", str(max(length, 64)),
                                     log_path=Path(scratch) / "vllm.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
                 if server == "vllm" else teacher_server_process(served_dir))
        initialize_parallel(1, 1, seed=0)
        try:
            with start as running:
                arch = GPTArchitecture.from_hf_config(str(model_dir), make_vocab_size_divisible_by=64)
                model = arch.build(1, 1)
                load_hf_weights(model, model_dir, arch)
                sync = DiskWeightSync(served_dir, [running.url], "vllm", arch)
                with ServerRolloutEngine(model, urls=[running.url], protocol="vllm", weight_sync=sync,
                                         weights_version=lambda: 0, vocab_size=arch.vocab_size,
                                         max_sequence_length=length) as engine:
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

    vllm = importlib.util.find_spec("vllm") is not None
    seconds = {"hf_generate": hf_seconds(model_dir, prompts, args.new_tokens, args.repeats),
               "megatron_tp1": megatron_seconds(str(model_dir), 1, prompts, args.new_tokens, args.repeats),
               "megatron_tp2": run_on_ranks(megatron_seconds, 2, (str(model_dir), 2, prompts, args.new_tokens,
                                                                   args.repeats))[0],
               "reference_server": server_seconds(model_dir, "reference", prompts, args.new_tokens, args.repeats)}
    if vllm:
        seconds["vllm"] = server_seconds(model_dir, "vllm", prompts, args.new_tokens, args.repeats)
    rows = [{"variant": name, "seconds": s, "tokens_per_s": generated / s, "x_hf": seconds["hf_generate"] / s}
            for name, s in seconds.items()]
    print(f"{'variant':<18}{'batch':>6}{'new tokens':>11}{'seconds':>9}{'tokens/s':>10}{'x HF':>7}")
    print("-" * 61)
    for row in rows:
        print(f"{row['variant']:<18}{args.batch:>6}{args.new_tokens:>11}{row['seconds']:>9.3f}"
              f"{row['tokens_per_s']:>10.1f}{row['x_hf']:>7.2f}")
    if not vllm:
        print("vllm: not installed (pip install -e '.[vllm]'): no vllm row")
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
