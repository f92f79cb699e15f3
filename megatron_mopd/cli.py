"""The ``mopd`` command. Each subcommand is a ``_<name>`` function registered in ``_parser``.

    mopd build-projection --student TOK --teacher TOK -o FILE [--beta --gamma --max-pieces --top-k
                          --reverse --no-special]
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
