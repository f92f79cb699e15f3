"""Teacher sources (docs/design.md §1, §5): what they return (``TeacherLogprobs``) and how they are reached."""

from megatron_mopd.teachers.colocated import ColocatedTeacher
from megatron_mopd.teachers.placement import (
    PendingTeacherScores,
    cp_slice,
    fetch_teacher_scores,
    submit_teacher_scores,
)
from megatron_mopd.teachers.protocols import (
    TeacherConfigError,
    TeacherError,
    TeacherRequestError,
    TeacherResponseError,
)
from megatron_mopd.teachers.remote import RemoteTeacher
from megatron_mopd.teachers.types import CollectiveTeacher, TeacherLogprobs, TeacherSource

__all__ = [
    "CollectiveTeacher",
    "ColocatedTeacher",
    "PendingTeacherScores",
    "RemoteTeacher",
    "TeacherConfigError",
    "TeacherError",
    "TeacherLogprobs",
    "TeacherRequestError",
    "TeacherResponseError",
    "TeacherSource",
    "cp_slice",
    "fetch_teacher_scores",
    "submit_teacher_scores",
]
