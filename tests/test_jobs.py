"""`rayq submit` / `rayq jobs` against real Ray heads on loopback, and the cluster files' contents.

The slow tests start their own head (`ray start --head` with its own ports and temp dir, in its own
Unix session) and stop exactly its processes by PID: never `ray stop`, which would also kill the test
session's own Ray and anyone else's.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rayq.launch import jobs
from rayq.launch.cli import main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTERS = REPO / "clusters"
TOKEN = secrets.token_hex(16)


# ------------------------------------------------------------------------------------------- helpers


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: the venv first on PATH, no inherited Ray address."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def rayq(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI as a user types it: ``python -m rayq ...`` in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "rayq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, sid, command line) for every live (non-zombie) process."""
    rows = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue
        rows[int(entry)] = (int(fields[1]), int(fields[3]), cmdline)
    return rows


@dataclass
class Head:
    """A head node this test started: its session id and temp dir find exactly its processes."""

    temp_dir: Path
    session: int
    gcs_port: int
    dashboard_port: int
    env: dict[str, str] = field(repr=False)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def processes(self) -> set[int]:
        table = _proc_table()
        mark = f"{self.temp_dir}/"
        pids = {p for p, (_, sid, cmd) in table.items() if sid == self.session or mark in cmd}
        pids.discard(os.getpid())
        grew = True
        while grew:  # workers' children (job drivers) run in sessions of their own
            new = {p for p, (ppid, _, _) in table.items() if ppid in pids} - pids
            pids |= new
            grew = bool(new)
        return pids

    def stop(self) -> None:
        pids = self.processes()
        for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.processes():
                time.sleep(0.25)
            pids = self.processes()
            if not pids:
                return
        raise AssertionError(f"head processes still alive after SIGKILL: {sorted(pids)}")


def start_head(**env_extra: str) -> Head:
    """``ray start --head`` on 127.0.0.1 with free ports, its own temp dir and its own Unix session."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))  # short: Unix socket paths are limited to 107
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = free_ports(9)
    env = clean_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **env_extra)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--disable-usage-stats", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
           "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=150000000",
           f"--temp-dir={temp_dir}"]
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    head = Head(temp_dir, proc.pid, gcs, dash, env)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    if proc.returncode != 0:
        head.stop()
        pytest.fail(f"ray start --head failed ({proc.returncode}):\n{out}")
    return head


# ------------------------------------------------------------------------------- fast: no cluster


def test_an_unreachable_address_fails_naming_it_and_how_to_start_a_head(capsys):
    port = free_ports(1)[0]
    rc = main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "train", "--set", "workers=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot reach a Ray dashboard at http://127.0.0.1:{port} (connection refused)" in err
    assert "ray start --head" in err and "clusters/local-cluster.sh start" in err


def test_an_unreachable_address_fails_fast():
    port = free_ports(1)[0]
    started = time.perf_counter()
    with pytest.raises(jobs.JobsError, match="cannot reach"):
        jobs.connect(f"127.0.0.1:{port}", timeout=2)
    assert time.perf_counter() - started < 2.5


@pytest.mark.parametrize("command", [["jobs", "list"], ["jobs", "status", "raysubmit_x"], ["jobs", "logs", "x"],
                                     ["jobs", "stop", "x"]])
def test_every_jobs_command_fails_fast_on_an_unreachable_address(capsys, command):
    port = free_ports(1)[0]
    assert main([*command, "--address", f"127.0.0.1:{port}"]) == 2
    assert f"cannot reach a Ray dashboard at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_train_address_refuses_a_dashboard_url_and_an_unreachable_head_fast():
    from rayq.config import ConfigError
    from rayq.launch import check_address

    with pytest.raises(ConfigError, match="is a dashboard .Jobs API. address; `rayq train --address` takes the GCS"):
        check_address("http://127.0.0.1:8265")
    port = free_ports(1)[0]
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"cannot reach a Ray head at 127.0.0.1:{port}.*ray start --head"):
        check_address(f"127.0.0.1:{port}")
    assert time.perf_counter() - started < 2
    check_address("auto")


@pytest.mark.parametrize("given, expected", [
    ("http://10.0.0.5:8265", "http://10.0.0.5:8265"),
    ("10.0.0.5:8265", "http://10.0.0.5:8265"),
    ("https://ray.example.com/", "https://ray.example.com"),
])
def test_address_forms(given, expected):
    assert jobs.resolve_address(given) == expected


@pytest.mark.parametrize("given, message", [
    ("ray://head:10001", "is not the Ray dashboard's HTTP address"),
    ("10.0.0.5:6379", "6379 is the GCS port"),
])
def test_addresses_that_are_not_the_jobs_api_are_refused_with_the_right_one(given, message):
    with pytest.raises(jobs.JobsError, match=message):
        jobs.resolve_address(given)


def test_the_address_falls_back_to_ray_api_server_address_then_the_local_default(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address: not for the Jobs API
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert jobs.resolve_address(None) == "http://head:8265"
    assert jobs.resolve_address("http://other:8265") == "http://other:8265"


def test_token_auth_headers_follow_ray_2_60(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert jobs.auth_headers() == ({}, None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(jobs.JobsError, match="RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN"):
        jobs.auth_headers()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_headers()[0] == {"Authorization": "Bearer from-home"}
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert jobs.auth_headers()[0] == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    headers, token = jobs.auth_headers()
    assert headers == {"Authorization": "Bearer from-env"} and token.source == "RAY_AUTH_TOKEN"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers() == ({}, None)


def _package(root: Path, excludes: list[str]) -> set[str]:
    """The files Ray's own packaging puts in the working_dir zip (without .gitignore, to test ours alone)."""
    from ray._private.runtime_env.packaging import create_package

    target = root.parent / f"{root.name}.zip"
    create_package(str(root), target, include_gitignore=False, excludes=excludes)
    with zipfile.ZipFile(target) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_the_working_dir_leaves_out_run_outputs_environments_and_large_files(tmp_path):
    root = tmp_path / "proj"
    keep = ["pyproject.toml", "README.md", "rayq/__init__.py", "rayq/jobs.py", "compressors/qsgd.py",
            "trainers/sync.py", "tune_spaces/space.yaml", "clusters/local-cluster.sh", "tests/test_x.py"]
    drop = [".venv/lib/python3.11/site-packages/torch/lib.so", ".git/objects/ab/cdef", "runs/r1/config.yaml",
            "runs/r1/checkpoint_1/model.pt", "bench_out/codecs.json", "model.pt", "weights.safetensors",
            "rayq/__pycache__/jobs.cpython-311.pyc", "rayq.egg-info/PKG-INFO", ".pytest_cache/v/x",
            "out/tensorboard/events.out.tfevents.1.host", "data/train.npz", "data/images.gz", "ray_results/t/x.json"]
    for name in keep + drop:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    spec = jobs.prepare(["train"], working_dir=root, output_dir="/out")
    assert spec.runtime_env["working_dir"] == str(root)
    assert _package(root, spec.runtime_env["excludes"]) == set(keep)


def test_the_real_project_ships_small_and_complete(tmp_path):
    spec = jobs.prepare(["train"], output_dir="/out")
    assert spec.working_dir == REPO
    shutil.copytree(REPO, tmp_path / "proj", ignore=shutil.ignore_patterns(".venv", ".git", "runs", "bench_out"))
    (tmp_path / "proj" / "runs" / "r").mkdir(parents=True)
    (tmp_path / "proj" / "runs" / "r" / "model.pt").write_bytes(b"0" * 1000)
    names = _package(tmp_path / "proj", spec.runtime_env["excludes"])
    assert {"rayq/__main__.py", "rayq/launch/jobs/client.py", "trainers/sync.py", "pyproject.toml"} <= names
    assert not [n for n in names if n.startswith(("runs/", ".venv/")) or n.endswith((".pt", ".pyc"))]
    assert (tmp_path / "proj.zip").stat().st_size < 5_000_000


def test_a_submitted_command_gets_its_default_output_dir_made_absolute_where_it_was_submitted(tmp_path):
    spec = jobs.prepare(["--", "train", "--set", "workers=2"], base=tmp_path)
    assert spec.entrypoint == f"python -m rayq train --set workers=2 --output-dir {tmp_path / 'runs'}"
    assert spec.output_dir == str(tmp_path / "runs")
    spec = jobs.prepare(["tune", "-s", "tune_spaces/rate_thresholds.yaml"], base=tmp_path)
    assert spec.output_dir == str(tmp_path / "runs" / "sweeps")  # tune's own default, runs/sweeps


def test_submit_output_dir_is_passed_on_unless_the_command_names_one(tmp_path):
    spec = jobs.prepare(["--", "train", "--set", "workers=2"], output_dir="/abs/runs")
    assert spec.entrypoint == "python -m rayq train --set workers=2 --output-dir /abs/runs"
    for argv in (["train", "--output-dir", "/mine"], ["train", "--output-dir=/mine"], ["train", "--output", "/mine"],
                 ["train", "--set", "output_dir=/mine"]):
        assert "/abs/runs" not in jobs.prepare(argv, output_dir="/abs/runs").entrypoint
    cfg = tmp_path / "run.yaml"
    cfg.write_text("output_dir: /mine\nworkers: 2\n")
    assert "/abs/runs" not in jobs.prepare(["train", "-c", str(cfg)], output_dir="/abs/runs").entrypoint
    assert jobs.prepare(["codecs"], output_dir="/abs/runs", python="/opt/py/bin/python").entrypoint == \
        "/opt/py/bin/python -m rayq codecs"


@pytest.mark.parametrize("argv, message", [
    ([], "the job's command is nothing; expected a rayq command after `--`: train"),
    (["trian"], "the job's command is 'trian'"),
    (["submit", "--", "train"], "the job's command is 'submit'"),
    (["train", "--sett", "x=1"], "invalid arguments for `rayq train`: --sett x=1"),
])
def test_a_job_command_that_rayq_would_not_parse_is_refused_before_submitting(argv, message):
    with pytest.raises(jobs.JobsError, match=re.escape(message)):
        jobs.prepare(argv, output_dir="/abs/runs")


def test_job_env_cannot_override_what_rayq_sets_itself():
    with pytest.raises(jobs.JobsError, match="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        jobs.prepare(["codecs"], env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"})


# ------------------------------------------------------------------------------------- cluster files


def _rayq_argv(command: str) -> list[str]:
    """The rayq arguments of a shell entrypoint like ``cd X && python -m rayq train ...``."""
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if words[1:3] == ["-m", "rayq"]:
            return words[3:]
    raise AssertionError(f"no `python -m rayq` in {command!r}")


def _check_rayq_command(argv: list[str]) -> None:
    """The command parses as rayq parses it and its config is valid (paths on the cluster aside)."""
    from rayq.config import load_config

    spec = jobs.prepare(argv, output_dir=None)
    ns = jobs.subcommands(jobs.command_parser())[argv[0]].parse_args(argv[1:])
    if argv[0] == "train":
        if ns.config:
            assert (REPO / ns.config).is_file(), ns.config
        load_config(ns.config and REPO / ns.config, ns.sets)
    assert spec.argv == argv


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d]


def test_the_aws_cluster_launcher_config_is_valid_for_ray_up():
    import json

    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTERS / "ray-aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    gpu_nodes = [t for t in config["available_node_types"].values()
                 if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_nodes, "no GPU node type"
    import ray

    assert f"ray:{ray.__version__}" in config["docker"]["image"]
    # It mounts and installs this project, and every node runs with the laptop's token.
    assert config["file_mounts"] == {"~/rayq": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert any("pip install" in c and "~/rayq" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in config[key]), key
    assert any("--dashboard-port=8265" in c for c in config["head_start_ray_commands"])
    assert set(config["rsync_exclude"]) >= {"**/.venv", "**/runs", "**/.git"}


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in _containers(g)}
    assert images == {"rayq:0.1.0"}, images  # built from clusters/Dockerfile (README)
    for group in groups:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for c in _containers(group):
            (runs,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/data/runs"]
            # shared run storage: rank 0 may run on any node
            assert volumes[runs["name"]]["persistentVolumeClaim"]["claimName"] == "rayq-runs"


def test_the_kuberay_raycluster_runs_rayq_workers_on_gpus():
    docs = _docs("kuberay-raycluster.yaml")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"])
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["spec"]["workerGroupSpecs"]
            for c in _containers(g)]
    assert gpus and all(int(g) >= 1 for g in gpus)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"] == ["rayq-runs"]


def test_the_kuberay_rayjob_runs_a_valid_rayq_training_job():
    docs = _docs("kuberay-rayjob.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = _rayq_argv(job["spec"]["entrypoint"])
    assert argv[0] == "train"
    _check_rayq_command(argv)
    assert argv[argv.index("--output-dir") + 1] == "/data/runs"
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"] == ["rayq-runs"]


def test_the_image_copies_only_what_exists_and_installs_rayq():
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    import ray

    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    copied = [w for line in dockerfile.splitlines() if line.startswith("COPY")
              for w in line.split()[1:-1] if not w.startswith("--")]
    assert {"pyproject.toml", "rayq", "compressors", "trainers"} <= set(copied)
    for path in copied:
        assert (REPO / path).exists(), path
    assert "pip install" in dockerfile


def test_the_local_cluster_script_is_valid_bash_and_names_no_ray_stop():
    script = CLUSTERS / "local-cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not re.search(r"^\s*ray stop", script.read_text(), re.M)


def test_the_readme_gives_the_commands_for_every_cluster_file():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Clusters and jobs"):]
    for needle in ("ray up clusters/ray-aws-gpu.yaml", "kubectl apply -f clusters/kuberay-raycluster.yaml",
                   "kubectl apply -f clusters/kuberay-rayjob.yaml", "bash clusters/local-cluster.sh start",
                   "bash clusters/local-cluster.sh stop", "rayq submit --address", "RAY_AUTH_MODE=token",
                   "docker build -f clusters/Dockerfile"):
        assert needle in section, needle


# ------------------------------------------------------------------------ slow: a real head on loopback


@pytest.fixture(scope="class")
def head():
    head = start_head()
    try:
        yield head
    finally:
        head.stop()
        assert not head.processes()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.mark.slow
class TestOnARealHead:
    """One head for the class (2 CPUs): train jobs with 2 workers × 0.5 CPU."""

    def test_a_submitted_training_job_succeeds_and_leaves_tensorboard_logs_and_checkpoints(self, head, tmp_path):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        r = rayq("submit", "--address", head.address, "--follow", "--", "train", "--set", "max_steps=30",
                 "--set", "workers=2", "--set", "cpus_per_worker=0.5", "--set", "report_every=10",
                 "--set", "eval_every=30", "--set", "checkpoint_every=30", "--name", "job-run",
                 cwd=tmp_path, env=head.env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"rayq: job raysubmit_\w+ SUCCEEDED after", r.stdout), r.stdout
        assert "rayq summary" in r.stdout and "step 30/30" in r.stdout
        # By default the job writes to ./runs of the submitting shell, as an absolute path.
        run = tmp_path / "runs" / "job-run"
        assert f"--output-dir {tmp_path / 'runs'}" in r.stdout
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [10, 20, 30]
        checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
        assert checkpoints and (checkpoints[-1] / "model.pt").is_file()
        # The job ran from the shipped copy of the project, which has no virtualenv or run outputs in it.
        shipped = {p.resolve().parents[3] for p in head.temp_dir.glob(
            "session_*/runtime_resources/working_dir_files/*/rayq/launch/jobs/client.py")}
        assert shipped
        for copy in shipped:
            assert (copy / "trainers" / "sync.py").is_file()
            assert not (copy / ".venv").exists() and not (copy / "runs").exists()

    def test_a_bad_config_job_reports_failed_with_the_config_error_and_exits_non_zero(self, head, tmp_path):
        r = rayq("submit", "--address", head.address, "--follow", "--", "train", "--set", "compression.codec=nope",
                 cwd=tmp_path, env=head.env)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "rayq: config error: compression.codec='nope' is not a codec; choose one of:" in r.stdout
        assert re.search(r"rayq: job raysubmit_\w+ FAILED after .*exit code 2", r.stderr), r.stderr

    @pytest.mark.extended
    def test_jobs_list_status_and_logs_show_a_finished_job(self, head, tmp_path):
        r = rayq("submit", "--address", head.address, "--submission-id", "rayq-codecs-1", "--", "codecs",
                 cwd=tmp_path, env=head.env)
        assert r.returncode == 0, r.stderr
        assert "rayq jobs logs rayq-codecs-1 --follow" in r.stdout
        r = rayq("jobs", "logs", "rayq-codecs-1", "--follow", "--address", head.address, cwd=tmp_path, env=head.env)
        assert r.returncode == 0 and "qsgd" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout + r.stderr
        r = rayq("jobs", "status", "rayq-codecs-1", "--address", head.address, cwd=tmp_path, env=head.env)
        assert r.stdout.startswith("rayq-codecs-1: SUCCEEDED"), r.stdout
        r = rayq("jobs", "logs", "rayq-codecs-1", "--address", head.address, cwd=tmp_path, env=head.env)
        assert "compression.error_feedback: true wraps any codec" in r.stdout
        r = rayq("jobs", "list", "--address", head.address, cwd=tmp_path, env=head.env)
        assert re.search(r"^rayq-codecs-1\s+SUCCEEDED\s", r.stdout, re.M), r.stdout
        r = rayq("jobs", "status", "raysubmit_nope", "--address", head.address, cwd=tmp_path, env=head.env)
        assert r.returncode == 2 and "no job 'raysubmit_nope'" in r.stderr

    @pytest.mark.extended
    def test_jobs_stop_stops_a_running_job(self, head, tmp_path):
        r = rayq("submit", "--address", head.address, "--submission-id", "rayq-long-1", "--", "train",
                 "--set", "max_steps=100000", "--set", "workers=2", "--set", "cpus_per_worker=0.5",
                 cwd=tmp_path, env=head.env)
        assert r.returncode == 0, r.stderr
        r = rayq("jobs", "stop", "rayq-long-1", "--address", head.address, cwd=tmp_path, env=head.env)
        assert r.returncode == 0 and "rayq: job rayq-long-1 STOPPED" in r.stdout, r.stdout + r.stderr

    @pytest.mark.extended
    def test_train_with_address_drives_the_existing_head_directly(self, head, tmp_path):
        r = rayq("train", "--address", f"127.0.0.1:{head.gcs_port}", "--set", "max_steps=10", "--set", "workers=2",
                 "--set", "report_every=10", "--set", "eval_every=10", "--set", "checkpoint_every=10",
                 "--output-dir", str(tmp_path / "runs"), "--name", "direct", cwd=tmp_path, env=head.env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "rayq summary" in r.stdout
        assert (tmp_path / "runs" / "direct" / "summary.json").is_file()


@pytest.fixture(scope="class")
def local_cluster():
    """clusters/local-cluster.sh with a head and one worker node, token auth on; `stop` must end them all."""
    state = Path(tempfile.mkdtemp(prefix="rqc", dir="/tmp"))
    gcs, dash = free_ports(2)
    env = clean_env(RAYQ_CLUSTER_DIR=str(state), RAYQ_GCS_PORT=str(gcs), RAYQ_DASHBOARD_PORT=str(dash),
                    RAYQ_HEAD_CPUS="1", RAYQ_WORKERS="1", RAYQ_WORKER_CPUS="1", RAYQ_OBJECT_STORE_MB="100",
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    script = ["bash", str(CLUSTERS / "local-cluster.sh")]
    r = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=300)
    sessions = [int(s) for s in (state / "sessions").read_text().split()] if (state / "sessions").exists() else []
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(sessions) == 2, sessions  # head + one worker node, each its own session
        assert f"rayq submit --address http://127.0.0.1:{dash}" in r.stdout
        yield Head(state, sessions[0], gcs, dash, env)
    finally:
        stop = subprocess.run([*script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = [p for p, (_, sid, cmd) in _proc_table().items() if sid in sessions or f"{state}/" in cmd]
        assert stop.returncode == 0 and not left, (stop.stdout, stop.stderr, left)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.extended
class TestLocalClusterScriptWithTokenAuth:
    """clusters/local-cluster.sh: a head and a worker node with Ray token auth on; `stop` ends only them."""

    def test_without_a_token_the_cluster_refuses_and_rayq_says_how_to_send_one(self, local_cluster, tmp_path):
        env = {k: v for k, v in local_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
        r = rayq("jobs", "list", "--address", local_cluster.address, cwd=tmp_path,
                 env={**env, "RAY_AUTH_MODE": "disabled"})
        assert r.returncode == 2
        assert "uses token authentication and no token was sent: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" \
            in r.stderr

    def test_a_wrong_token_is_rejected_naming_where_it_came_from(self, local_cluster, tmp_path):
        r = rayq("jobs", "list", "--address", local_cluster.address, cwd=tmp_path,
                 env={**local_cluster.env, "RAY_AUTH_TOKEN": "not-the-token"})
        assert r.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in r.stderr

    def test_with_the_token_a_job_runs_to_success(self, local_cluster, tmp_path):
        r = rayq("submit", "--address", local_cluster.address, "--follow", "--", "codecs", cwd=tmp_path,
                 env=local_cluster.env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "qsgd" in r.stdout and "SUCCEEDED" in r.stdout
