"""``mopd build-projection --student TOK --teacher TOK -o FILE``: build and save the vocabulary projection."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "build the cross-tokenizer vocabulary projection (student x teacher) and save it"
DESCRIPTION = ("Build the CTKD/X-Token vocabulary projection between two Hugging Face tokenizers "
               "(local tokenizer directories) and write it as safetensors.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    local = "local directory; download a Hub tokenizer first: hf download NAME --local-dir DIR"
    parser.add_argument("--student", required=True, metavar="TOK", help=f"student tokenizer ({local})")
    parser.add_argument("--teacher", required=True, metavar="TOK", help=f"teacher tokenizer ({local})")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="output .safetensors file (a missing parent directory is created)")
    parser.add_argument(
        "--beta", type=float, default=0.9,
        help="β of the piece weights β·γ^i; with --reverse, the forward share of a row (default 0.9)",
    )
    parser.add_argument("--gamma", type=float, default=0.1, help="γ, the decay per further piece (default 0.1)")
    parser.add_argument("--max-pieces", type=int, default=4, help="teacher pieces kept per token (default 4)")
    parser.add_argument("--top-k", type=int, default=8, help="entries kept per row (default 8)")
    parser.add_argument("--reverse", action="store_true", help="add the reverse pass (teacher -> student)")
    parser.add_argument("--no-special", action="store_true", help="do not match special tokens by content")


def run(args: argparse.Namespace) -> int:
    """Load the tokenizers and check the output path (before the build), build the projection, write it
    (creating the output's missing parent directories) and print its stats."""
    from megatron_mopd.crosstok import VocabProjection
    from megatron_mopd.crosstok.local_tokenizer import load_local_tokenizer

    began = time.perf_counter()
    student = load_local_tokenizer(args.student, "--student")
    teacher = load_local_tokenizer(args.teacher, "--teacher")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"-o {output}: is a directory; -o takes the projection file to write, "
                         f"e.g. -o {output / 'projection.safetensors'}")
    projection = VocabProjection.build(
        student,
        teacher,
        beta=args.beta,
        gamma=args.gamma,
        max_pieces=args.max_pieces,
        top_k=args.top_k,
        reverse=args.reverse,
        match_special=not args.no_special,
        progress=True,
    )
    seconds = time.perf_counter() - began
    if not output.parent.is_dir():
        output.parent.mkdir(parents=True)
        print(f"created directory {output.parent}")
    projection.save(output)
    print(f"student vocabulary {projection.student_vocab_size}, teacher vocabulary {projection.teacher_vocab_size}")
    print(f"rows: {json.dumps(projection.stats.as_dict())}")
    print(f"built in {seconds:.1f} s; wrote {output} (fingerprint {projection.fingerprint[:16]})")
    return 0
