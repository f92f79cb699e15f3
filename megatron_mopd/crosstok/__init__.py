"""Cross-tokenizer distillation (docs/design.md §4): canonical token bytes, the vocabulary projection, span
alignment, and the text and offsets of sampled ids."""

from megatron_mopd.crosstok.alignment import (
    AlignmentError,
    BatchAlignment,
    SequenceAlignment,
    align_batch,
    align_offsets,
    align_texts,
)
from megatron_mopd.crosstok.canonical import CanonicalVocabulary, TokenConvention, vocabulary_fingerprint
from megatron_mopd.crosstok.detokenize import decode_with_offsets
from megatron_mopd.crosstok.projection import ProjectionShard, ProjectionStats, VocabProjection

__all__ = [
    "AlignmentError",
    "BatchAlignment",
    "SequenceAlignment",
    "align_batch",
    "align_offsets",
    "align_texts",
    "decode_with_offsets",
    "CanonicalVocabulary",
    "ProjectionShard",
    "ProjectionStats",
    "TokenConvention",
    "VocabProjection",
    "vocabulary_fingerprint",
]
