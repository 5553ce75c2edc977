"""The suite's forked commands (tests/forked_cli.py) behave as the real processes they stand for: the
same argv, path, working directory, environment, output and exit status, and for launched ranks the
same variables and `--local_rank` that the deepspeed launcher gives each rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import forked_cli
from conftest import REPO_ROOT, launcher, run_cli, run_ranks

REPORT = """
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR")
print("report " + json.dumps({"argv": sys.argv[1:], "path0": sys.path[0], "cwd": os.getcwd(),
                              "env": {key: os.environ.get(key) for key in keys}}))
print("to stderr", file=sys.stderr)
sys.exit(3 if f"--fail={os.environ.get('RANK')}" in sys.argv else 0)
"""


def reports(text: str) -> list[dict]:
    return [json.loads(line[len("report "):]) for line in text.splitlines() if line.startswith("report ")]


def test_a_forked_command_is_the_real_one(tmp_path):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    env = {**os.environ, "RANK": "0", "MASTER_ADDR": "check"}
    for args in ([sys.executable, str(script), "--fail=0", "a b"], [sys.executable, "-c", REPORT, "--fail=0"]):
        assert forked_cli.eligible(args, env)
        forked = forked_cli.run(args, REPO_ROOT, env, timeout=60)
        real = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr) \
            == (3, forked.stdout, "to stderr\n")
        assert reports(forked.stdout)[0]["env"]["MASTER_ADDR"] == "check"
    # An error on bad input: the same one line and status as `python rw_eval.py` gives
    args = [sys.executable, "rw_eval.py", "--model_path", str(tmp_path / "missing")]
    forked = run_cli(args)
    real = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert forked.returncode == real.returncode == 2
    assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1] and forked.stdout == real.stdout


def test_an_environment_read_at_import_is_started_afresh():
    assert not forked_cli.eligible([sys.executable, "rw_eval.py"], {**os.environ, "OMP_NUM_THREADS": "7"})
    assert not forked_cli.eligible(["bash", "script.sh"], dict(os.environ))


def test_forked_ranks_get_what_the_launcher_gives_them(tmp_path):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    env = dict(os.environ)  # (outside pytest-xdist, launcher_env(2)'s threads differ: a real launch)
    assert forked_cli.eligible([sys.executable, str(script)], env)
    forked = run_ranks([*launcher(2), str(script), "--flag"], env=env)
    real = run_cli([*launcher(2), str(script), "--flag"], env=env)
    assert "launch.py" in real.stdout + real.stderr and "launch.py" not in forked.stdout + forked.stderr
    assert forked.returncode == real.returncode == 0, real.stdout[-2000:] + real.stderr[-2000:]
    assert sorted(json.dumps(r, sort_keys=True) for r in reports(forked.stdout)) == \
        sorted(json.dumps(r, sort_keys=True) for r in reports(real.stdout))
    assert sorted(r["env"]["RANK"] for r in reports(forked.stdout)) == ["0", "1"]
    assert forked.args[:2] == [launcher(2)[0], "--num_gpus"]
    # A rank that fails ends the run with its status, as under the launcher
    failed = run_ranks([*launcher(2), str(script), "--fail=1"], env=env)
    assert failed.returncode == 3
