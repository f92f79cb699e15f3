"""Cross-tokenizer distillation (DESIGN.md §4): canonical token bytes, the vocabulary projection, span alignment."""

from megatron_mopd.crosstok.alignment import (
    AlignmentError,
    BatchAlignment,
    SequenceAlignment,
    align_batch,
    align_offsets,
    align_texts,
)
from megatron_mopd.crosstok.canonical import CanonicalVocabulary, TokenConvention, vocabulary_fingerprint
from megatron_mopd.crosstok.projection import ProjectionShard, ProjectionStats, VocabProjection

__all__ = [
    "AlignmentError",
    "BatchAlignment",
    "SequenceAlignment",
    "align_batch",
    "align_offsets",
    "align_texts",
    "CanonicalVocabulary",
    "ProjectionShard",
    "ProjectionStats",
    "TokenConvention",
    "VocabProjection",
    "vocabulary_fingerprint",
]
