"""Teacher sources (DESIGN.md §1, §5): what they return (``TeacherLogprobs``) and how they are reached."""

from megatron_mopd.teachers.types import TeacherLogprobs, TeacherSource

__all__ = ["TeacherLogprobs", "TeacherSource"]
