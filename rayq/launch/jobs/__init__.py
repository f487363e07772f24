"""``rayq submit`` and ``rayq jobs``: the Ray Jobs client and its commands."""

from rayq.launch.jobs.client import (
    AUTH_MODE_ENV,
    DEFAULT_ADDRESS,
    EXCLUDES,
    HOW_TO_START,
    NOT_IN_JOBS,
    TERMINAL,
    TOKEN_ENV,
    TOKEN_PATH_ENV,
    Cluster,
    JobsError,
    JobSpec,
    Token,
    auth_headers,
    command_parser,
    connect,
    duration_s,
    entrypoint,
    find_token,
    follow,
    job_command,
    job_name,
    list_jobs,
    logs,
    prepare,
    probe,
    project_root,
    resolve_address,
    status,
    stop,
    subcommands,
    submit,
    wait,
)
from rayq.launch.jobs.command import add_commands

__all__ = [
    "AUTH_MODE_ENV", "DEFAULT_ADDRESS", "EXCLUDES", "HOW_TO_START", "NOT_IN_JOBS", "TERMINAL", "TOKEN_ENV",
    "TOKEN_PATH_ENV", "Cluster", "JobSpec", "JobsError", "Token", "add_commands", "auth_headers", "command_parser",
    "connect", "duration_s", "entrypoint", "find_token", "follow", "job_command", "job_name", "list_jobs", "logs",
    "prepare", "probe", "project_root", "resolve_address", "status", "stop", "subcommands", "submit", "wait",
]
