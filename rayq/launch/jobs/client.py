"""The Ray Jobs client behind ``rayq submit`` and ``rayq jobs``: run rayq on a cluster through Ray's Job Submission API.

The project directory is shipped as the job's ``working_dir`` (virtual environments, run outputs and
large binaries excluded) and the job runs ``python -m rayq <command>`` from that copy: Ray makes the
copy the job's working directory and puts it on ``PYTHONPATH``, so the cluster needs a Python with
torch and ray, not rayq. Nothing is pip-installed through the runtime env (clusters may be offline).

Token authentication follows Ray 2.60: with ``RAY_AUTH_MODE=token`` the token comes from
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from rayq.launch.driver import RAY_ENV

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

#: gitwildmatch patterns (Ray's ``runtime_env["excludes"]``) left out of the shipped working_dir. Names
#: without a trailing slash match the directory itself, so Ray does not even walk into it.
EXCLUDES: tuple[str, ...] = (
    ".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache",
    ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", ".devray",
    "runs", "bench_out", "ray_results", "checkpoint_*", "events.out.tfevents.*",
    "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.npz", "*.npy",
    "*.gz", "*.zip", "*.tar", "*.tgz", "*.whl",
)

#: Ray keeps jobs in these states for good.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

#: Where Ray 2.60 looks for the token, in order (its C++ AuthenticationTokenLoader).
TOKEN_ENV, TOKEN_PATH_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"

HOW_TO_START = ("start a head there with `ray start --head --dashboard-host=0.0.0.0` (the dashboard listens on "
                "port 8265), or a local one with `bash clusters/local-cluster.sh start`, and pass its dashboard "
                "address: --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")


class JobsError(RuntimeError):
    """The cluster cannot be reached, refused us, or does not know the job; the message says what to do."""


# --------------------------------------------------------------------------------------------- address


def resolve_address(address: str | None) -> str:
    """The dashboard URL to talk to: ``--address``, else ``RAY_API_SERVER_ADDRESS`` / an http ``RAY_ADDRESS``.

    ``HOST:PORT`` means ``http://HOST:PORT``. A GCS address (port 6379) or a Ray Client address
    (``ray://``) is not the Jobs API: the error says which address to use instead.
    """
    if not address:
        env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    url = urlparse(address)
    if url.scheme not in ("http", "https"):
        raise JobsError(f"--address {address!r} is not the Ray dashboard's HTTP address; expected "
                        "http://HEAD:8265 (the Jobs API lives on the dashboard port, not on ray:// or the GCS port)")
    if not url.hostname or url.port == 6379:
        raise JobsError(f"--address {address!r} is not a dashboard address; expected http://HEAD:8265 "
                        "(6379 is the GCS port, which `rayq train --address` takes)")
    return address


# ------------------------------------------------------------------------------------------------ auth


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it was found, for error messages; never the token itself


def find_token() -> Token | None:
    """The token Ray itself would use: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return Token(os.environ[TOKEN_ENV].strip(), TOKEN_ENV)
    if os.environ.get(TOKEN_PATH_ENV):
        path = Path(os.environ[TOKEN_PATH_ENV]).expanduser()
        value = path.read_text().strip() if path.is_file() else ""
        if not value:
            raise JobsError(f"{TOKEN_PATH_ENV}={str(path)!r} names no file with a token in it")
        return Token(value, f"{TOKEN_PATH_ENV} ({path})")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return Token(default.read_text().strip(), str(default))
    return None


def auth_headers() -> tuple[dict[str, str], Token | None]:
    """HTTP headers for Ray's token authentication, as Ray 2.60 decides it.

    ``RAY_AUTH_MODE=disabled`` sends nothing; ``token`` requires a token; unset sends a token when one
    is found (as ``ray start`` turns token mode on when a token exists).
    """
    mode = os.environ.get(AUTH_MODE_ENV, "").strip().lower()
    if mode == "disabled":
        return {}, None
    if mode not in ("", "token"):
        raise JobsError(f"{AUTH_MODE_ENV}={mode!r} is invalid; choose one of: token, disabled")
    token = find_token()
    if token is None:
        if mode == "token":
            raise JobsError(f"{AUTH_MODE_ENV}=token but no token found: set {TOKEN_ENV}=<token>, or "
                            f"{TOKEN_PATH_ENV}=<file>, or write it to ~/.ray/auth_token (print the cluster's "
                            "token on its head node with `ray get-auth-token`)")
        return {}, None
    return {"Authorization": f"Bearer {token.value}"}, token


# ------------------------------------------------------------------------------------------ connection


def probe(address: str, headers: dict[str, str], token: Token | None, timeout: float) -> str:
    """Ask the dashboard for its Ray version, failing fast with a message that says what to do."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=(timeout, max(timeout, 30.0)))
    except requests.exceptions.Timeout:
        raise JobsError(f"no answer from a Ray dashboard at {address} within {timeout:g} s; {HOW_TO_START}") from None
    except requests.exceptions.ConnectionError as err:
        reason = _reason(err)
        raise JobsError(f"cannot reach a Ray dashboard at {address} ({reason}); {HOW_TO_START}") from None
    if r.status_code == 401:
        raise JobsError(f"the Ray cluster at {address} uses token authentication and no token was sent: export "
                        f"{AUTH_MODE_ENV}=token and {TOKEN_ENV}=<token> (print it on the head node with "
                        f"`ray get-auth-token`), or put it in ~/.ray/auth_token or a file named by {TOKEN_PATH_ENV}")
    if r.status_code == 403:
        where = token.source if token else "the request"
        raise JobsError(f"the Ray cluster at {address} rejected the token from {where}: use the token printed by "
                        "`ray get-auth-token` on its head node")
    try:
        r.raise_for_status()
        return str(r.json()["ray_version"])
    except (ValueError, KeyError, requests.exceptions.HTTPError):
        raise JobsError(f"{address} answered HTTP {r.status_code} but is not a Ray dashboard (GET /api/version); "
                        "expected the head's dashboard address, http://HEAD:8265") from None


def _reason(err: BaseException) -> str:
    text = str(err)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out",
                   "Temporary failure in name resolution", "Network is unreachable"):
        if marker in text:
            return marker.lower()
    return text.split(": ", 1)[-1] or type(err).__name__


@dataclass
class Cluster:
    """A connected Job Submission client plus what we learned while connecting."""

    address: str
    ray_version: str
    client: Any  # ray.job_submission.JobSubmissionClient


@contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its argument; ours wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None, timeout: float = 10.0) -> Cluster:
    """Reach the cluster's Jobs API at ``address`` (see :func:`resolve_address`), with Ray's token auth."""
    url = resolve_address(address)
    headers, token = auth_headers()
    version = probe(url, headers, token, timeout)
    from ray.job_submission import JobSubmissionClient

    with _explicit_address():
        try:
            client = JobSubmissionClient(url, headers=headers)
        except (ConnectionError, RuntimeError) as err:
            raise JobsError(f"cannot use the Jobs API at {url}: {err}") from None
    return Cluster(url, version, client)


# ---------------------------------------------------------------------------------------------- submit


def project_root() -> Path:
    """The rayq project to ship: the checkout this rayq was imported from, else the current directory."""
    import rayq

    for candidate in (Path(rayq.__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "rayq" / "__init__.py").is_file() and (candidate / "pyproject.toml").is_file():
            return candidate
    raise JobsError("cannot find the rayq project to ship as the job's working_dir (a directory with "
                    "pyproject.toml and rayq/); run from it or pass --working-dir")


def command_parser() -> argparse.ArgumentParser:
    """The ``rayq`` command line's parser, which a job's command must satisfy."""
    from rayq.launch.cli import build_parser

    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


#: Commands that make no sense inside a job.
NOT_IN_JOBS = ("submit", "jobs")


def _names_output_dir(args: list[str], ns: argparse.Namespace, working_dir: Path) -> bool:
    """Whether the command says where its outputs go: ``--output-dir`` (or an abbreviation argparse
    accepts), ``--set output_dir=...``, or ``output_dir:`` in its ``-c`` file."""
    for token in args:
        option = token.split("=", 1)[0]
        if option.startswith("--out") and "--output-dir".startswith(option):
            return True
    if any(s.split("=", 1)[0].strip() == "output_dir" for s in getattr(ns, "sets", None) or []):
        return True
    config = getattr(ns, "config", None)
    if config:
        path = Path(config) if Path(config).is_absolute() else working_dir / config
        try:
            data = yaml.safe_load(path.read_text()) if path.is_file() else None
        except yaml.YAMLError:
            data = None  # the job reports the config error itself
        return isinstance(data, dict) and "output_dir" in data
    return False


def job_command(argv: list[str], working_dir: Path, output_dir: str | None = None,
                base: Path | None = None) -> list[str]:
    """Check ``argv`` as rayq would parse it, and give the job's rayq arguments with ``--output-dir`` added.

    A command with an ``--output-dir`` option (train, tune) that does not say where its outputs go gets
    ``output_dir`` or else its own default made absolute against ``base`` (the submitting shell's
    directory), not a path inside the job's temporary copy of the project. Option errors fail here,
    before anything is submitted; config values are checked by the job itself, so a bad value shows up as
    a FAILED job with rayq's own config error in its logs.
    """
    from rayq.config import RunConfig

    if argv and argv[0] == "--":
        argv = argv[1:]
    commands = subcommands(command_parser())
    allowed = [c for c in commands if c not in NOT_IN_JOBS]
    if not argv or argv[0] not in allowed:
        got = repr(argv[0]) if argv else "nothing"
        raise JobsError(f"the job's command is {got}; expected a rayq command after `--`: {', '.join(allowed)} "
                        "(e.g. rayq submit --address http://HEAD:8265 -- train --set workers=2)")
    sub = commands[argv[0]]
    try:
        ns = sub.parse_args(argv[1:])
    except SystemExit as err:  # argparse already printed the usage error
        raise JobsError(f"invalid arguments for `rayq {argv[0]}`: {shlex.join(argv[1:])}") from err
    option = next((a for a in sub._actions if "--output-dir" in a.option_strings), None)
    if option is not None and not _names_output_dir(argv[1:], ns, working_dir):
        default = option.default if isinstance(option.default, str) else RunConfig().output_dir
        target = output_dir or str(((base or Path.cwd()) / Path(default).expanduser()).resolve())
        argv = [*argv, "--output-dir", target]
    return list(argv)


def entrypoint(argv: list[str], python: str = "python") -> str:
    """The shell command the job runs: rayq from the shipped working_dir (cwd), no install needed."""
    return shlex.join([python, "-m", "rayq", *argv])


@dataclass(frozen=True)
class JobSpec:
    """What a submission sends: the shell entrypoint and the runtime env (working_dir, excludes, env vars)."""

    argv: list[str]
    entrypoint: str
    working_dir: Path
    runtime_env: dict[str, Any]

    @property
    def output_dir(self) -> str | None:
        return self.argv[self.argv.index("--output-dir") + 1] if "--output-dir" in self.argv else None


def prepare(argv: list[str], *, working_dir: Path | None = None, output_dir: str | None = None,
            base: Path | None = None, python: str = "python", excludes: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> JobSpec:
    """Check ``rayq <argv>`` and build the job that runs it with the project as its working_dir."""
    root = (working_dir or project_root()).resolve()
    if not root.is_dir():
        raise JobsError(f"--working-dir {str(root)!r} is not a directory")
    argv = job_command(argv, root, output_dir, base)
    if env:
        clash = sorted(set(env) & set(RAY_ENV))
        if clash:
            raise JobsError(f"--env {', '.join(clash)}: rayq sets these in every job itself (rayq.launch.RAY_ENV)")
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": [*EXCLUDES, *excludes]}
    if env:
        runtime_env["env_vars"] = dict(env)
    return JobSpec(argv, entrypoint(argv, python), root, runtime_env)


def submit(cluster: Cluster, spec: JobSpec, submission_id: str | None = None) -> str:
    """Submit the job; Ray zips and uploads the working_dir. Returns the submission id."""
    from rayq import __version__

    with _quiet_ray():
        try:
            return cluster.client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                             submission_id=submission_id,
                                             metadata={"rayq_version": __version__, "rayq_command": spec.argv[0]})
        except (ValueError, RuntimeError) as err:
            raise JobsError(f"the cluster at {cluster.address} did not accept the job: {err}") from None


@contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray's client logs every packaging and log-stream step at INFO: keep its warnings (large files), no more."""
    names = {"ray.dashboard.modules.dashboard_sdk": logging.WARNING,
             "ray.dashboard.modules.job.sdk": logging.WARNING,
             "ray._private.runtime_env.packaging": logging.WARNING,
             "ray._private.runtime_env.working_dir": logging.ERROR}
    saved = {n: logging.getLogger(n).level for n in names}
    for n, level in names.items():
        logging.getLogger(n).setLevel(level)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


# ---------------------------------------------------------------------------------------------- follow


def status(cluster: Cluster, job_id: str) -> Any:
    """The job's details (``JobDetails``: status, message, times, entrypoint)."""
    try:
        return cluster.client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise JobsError(f"no job {job_id!r} on the cluster at {cluster.address} (see `rayq jobs list`)") from None
        raise JobsError(f"cannot read job {job_id!r} at {cluster.address}: {err}") from None


def wait(cluster: Cluster, job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> Any:
    """Poll until the job reaches a terminal state (or ``timeout`` seconds pass); return its details."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = status(cluster, job_id)
        if str(info.status) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)


def follow(cluster: Cluster, job_id: str, write: Callable[[str], None]) -> Any:
    """Stream the job's logs to ``write`` until it ends; return its final details."""

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            write(chunk)

    try:
        with _quiet_ray():
            asyncio.run(tail())
    except RuntimeError as err:  # the stream closed early (head restarted, proxy timeout): poll instead
        log.warning("log stream for %s ended early (%s); waiting for the job to finish", job_id, err)
    return wait(cluster, job_id)


def logs(cluster: Cluster, job_id: str) -> str:
    status(cluster, job_id)  # a clear error for an unknown id
    return cluster.client.get_job_logs(job_id)


def stop(cluster: Cluster, job_id: str) -> bool:
    status(cluster, job_id)
    return bool(cluster.client.stop_job(job_id))


def list_jobs(cluster: Cluster) -> list[Any]:
    return sorted(cluster.client.list_jobs(), key=lambda j: j.start_time or 0)


def job_name(info: Any) -> str:
    return info.submission_id or info.job_id or "?"


def duration_s(info: Any) -> float | None:
    if not info.start_time:
        return None
    end = info.end_time or time.time() * 1000
    return (end - info.start_time) / 1000.0
