"""Loading a tokenizer from a local directory that a user named (a command-line option, a config key).

``AutoTokenizer.from_pretrained`` takes any string that is not an existing directory for a Hugging
Face Hub name: a mistyped path costs a minute of network retries, or ends in an error about repo ids
or about installing ``sentencepiece``/``tiktoken``. Here the path is checked first, so that a mistake
is one immediate error that names the option, the path and the fix, and the Hub is never contacted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# The files that hold a vocabulary in a saved Hugging Face tokenizer directory, one set per format: the
# fast tokenizer, SentencePiece (or tiktoken) models, GPT-2 BPE, WordPiece. tokenizer_config.json alone
# holds none: from it AutoTokenizer builds a tokenizer of the special tokens only, or fails.
VOCABULARY_FILES = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)


def load_local_tokenizer(path: Union[str, os.PathLike], option: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the local directory ``path``, loaded without contacting the Hub.

    ``option`` is how the user gave the path (``--student``, ``model.path``, ...), for the errors.
    Raises ValueError, naming ``option``, the path and the fix, when ``path`` does not exist, is not a
    directory, or is a directory without any of the ``VOCABULARY_FILES`` sets; a directory that has
    one but does not load raises what ``AutoTokenizer.from_pretrained`` raises.
    """
    directory = Path(path).expanduser()
    expected = f"{option} must name a local directory that holds a tokenizer"
    download = "download one from the Hugging Face Hub first: hf download NAME --local-dir DIR"
    if not directory.exists():
        raise ValueError(f"{option} {path}: no such file or directory; {expected}; {download}")
    if not directory.is_dir():
        raise ValueError(f"{option} {path}: is a file, not a directory; {expected} (the directory of "
                         f"tokenizer.json / tokenizer_config.json)")
    if not any(all((directory / name).is_file() for name in files) for files in VOCABULARY_FILES):
        formats = ", ".join(" + ".join(files) for files in VOCABULARY_FILES)
        raise ValueError(f"{option} {path}: no tokenizer in this directory (none of {formats}); {expected}, "
                         f"as written by save_pretrained; {download}")
    return AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
