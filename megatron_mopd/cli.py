"""The ``mopd`` command. Each subcommand is a ``_<name>`` function registered in ``_parser``.

    mopd build-projection --student TOK --teacher TOK -o FILE [--beta --gamma --max-pieces --top-k
                          --reverse --no-special]
    mopd serve-teacher --model DIR [--host --port --max-logprobs --served-model-name --delay-ms --dtype
                       --device]
    mopd demo [--steps --tp --pp --topk --beta --teacher-url ...]   (see megatron_mopd/demo.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence


def _build_projection(args: argparse.Namespace) -> int:
    from megatron_mopd.crosstok import VocabProjection

    began = time.perf_counter()
    projection = VocabProjection.build(
        args.student,
        args.teacher,
        beta=args.beta,
        gamma=args.gamma,
        max_pieces=args.max_pieces,
        top_k=args.top_k,
        reverse=args.reverse,
        match_special=not args.no_special,
        progress=True,
    )
    seconds = time.perf_counter() - began
    projection.save(args.output)
    print(f"student vocabulary {projection.student_vocab_size}, teacher vocabulary {projection.teacher_vocab_size}")
    print(f"rows: {json.dumps(projection.stats.as_dict())}")
    print(f"built in {seconds:.1f} s; wrote {args.output} (fingerprint {projection.fingerprint[:16]})")
    return 0


def _serve_teacher(args: argparse.Namespace) -> int:
    from megatron_mopd.teachers.server import TeacherServer

    logging.getLogger("megatron_mopd.teachers.server").setLevel(logging.INFO)
    TeacherServer(
        args.model,
        args.host,
        args.port,
        max_logprobs=args.max_logprobs,
        served_model_name=args.served_model_name,
        delay_ms=args.delay_ms,
        dtype=args.dtype,
        device=args.device,
    ).serve_forever()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopd", description="Multi-teacher on-policy distillation tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build-projection",
        help="build the cross-tokenizer vocabulary projection (student x teacher) and save it",
        description="Build the CTKD/X-Token vocabulary projection between two Hugging Face tokenizers "
        "(local tokenizer directories) and write it as safetensors.",
    )
    build.add_argument("--student", required=True, metavar="TOK", help="student tokenizer directory")
    build.add_argument("--teacher", required=True, metavar="TOK", help="teacher tokenizer directory")
    build.add_argument("-o", "--output", required=True, metavar="FILE", help="output .safetensors file")
    build.add_argument(
        "--beta", type=float, default=0.9,
        help="β of the piece weights β·γ^i; with --reverse, the forward share of a row (default 0.9)",
    )
    build.add_argument("--gamma", type=float, default=0.1, help="γ, the decay per further piece (default 0.1)")
    build.add_argument("--max-pieces", type=int, default=4, help="teacher pieces kept per token (default 4)")
    build.add_argument("--top-k", type=int, default=8, help="entries kept per row (default 8)")
    build.add_argument("--reverse", action="store_true", help="add the reverse pass (teacher -> student)")
    build.add_argument("--no-special", action="store_true", help="do not match special tokens by content")
    build.set_defaults(run=_build_projection)

    serve = commands.add_parser(
        "serve-teacher",
        help="serve a Hugging Face causal LM as a teacher (vLLM /v1/completions and SGLang /generate subsets)",
        description="Serve a local Hugging Face causal LM directory over HTTP with the subsets of the vLLM "
        "and SGLang protocols that remote teachers use (prompt log-probabilities, top-K, generation), "
        "with the same numbers as running the model in-process. Stops on SIGTERM or Ctrl-C.",
    )
    serve.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind, 0 for a free one (default 8000)")
    serve.add_argument(
        "--max-logprobs", type=int, default=20, metavar="K",
        help="largest prompt_logprobs / top_logprobs_num a request may ask for (default 20)",
    )
    serve.add_argument(
        "--served-model-name", metavar="NAME", help="model name in /v1/models and responses (default: --model)"
    )
    serve.add_argument(
        "--delay-ms", type=float, default=0.0, metavar="MS",
        help="latency added to each scoring/generation request, for overlap tests (default 0)",
    )
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default float32)")
    serve.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default cpu)")
    serve.set_defaults(run=_serve_teacher)

    from megatron_mopd import demo

    demo_parser = commands.add_parser(
        "demo",
        help="CPU demo: distill the reference teacher into a Megatron-Core student (embedded default)",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"mopd {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
