"""Vocab-parallel primitives: vocabulary shards and their collectives, chunking, top-k, the
sequence-parallel mappings. Where the code runs (devices, CPU mode, Megatron's parallel state) is
``megatron_mopd.platform``."""
