"""The reference teacher server as a subprocess (tests): see ``megatron_mopd.teachers.server_process``."""

from megatron_mopd.teachers.server_process import ServerProcess, teacher_server_process

__all__ = ["ServerProcess", "teacher_server_process"]
