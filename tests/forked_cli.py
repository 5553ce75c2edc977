"""Run `python SCRIPT ARGS` (or `python -c CODE ARGS`, or the ranks the deepspeed launcher would start) in
processes forked from one that has already imported torch and transformers, instead of starting Python
afresh: those imports take ~6 s of CPU in every fresh process, and the suite starts about a hundred.

Each command still runs in a process of its own, forked from a server process (Python's "forkserver")
that has imported those libraries and run nothing else, with the command's environment, working
directory, sys.argv and sys.path, its stdout and stderr in files, and its exit status. Its own code,
DeepSpeed included, is imported in the fork as a fresh process imports it, and prints what a fresh
process prints.

Only a command whose environment differs from the server's in variables read after start-up (the
rendezvous ones, PATH) runs here: a variable a library reads while it is imported (OMP_NUM_THREADS,
PYTHONPATH, HF_HUB_OFFLINE, ...) would keep the server's value, so the caller starts any other command
as a real process. So does a test that signals its command, or that is about the launcher itself."""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing import connection, forkserver

PRELOAD = ["torch", "transformers.modeling_utils"]
# Read by this project's code or by Python's own subprocess calls when used, never while importing; pytest's
# name of the running test; and flags that libraries imported by a test put in this process's environment
# for their own use (a fresh process that imports them sets them again).
READ_LATER = {"PATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "LAZY_LEGACY_OP", "RAY_CLIENT_MODE",
              "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}

_server: dict = {}


def _context() -> multiprocessing.context.BaseContext:
    """The fork server's context, started on first use with this process's environment of that moment
    (kept, to compare commands' environments with), and a fresh interpreter's sys.path past its first
    entry (this process's has pytest's additions)."""
    if not _server:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        env = dict(os.environ)
        forkserver.ensure_running()
        probe = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                               capture_output=True, text=True, check=True, env=env)
        _server.update(context=context, env=env, path=json.loads(probe.stdout))
    return _server["context"]


def eligible(args: list[str], env: dict[str, str]) -> bool:
    """Whether `args` is a Python command that a fork of the server runs as a fresh process would."""
    if len(args) < 2 or args[0] != sys.executable or args[1].startswith("-") and args[1] != "-c":
        return False
    _context()
    base = _server["env"]
    return all(env.get(key) == base.get(key) for key in env.keys() | base.keys() if key not in READ_LATER)


def _child(args: list[str], cwd: str, env: dict[str, str], path: list[str], out: str, err: str) -> None:
    """In the fork: become `python ARGS` run from `cwd`, and exit with its status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, name in ((1, out), (2, err)):
        handle = os.open(name, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    code = 0
    try:
        if args[1] == "-c":
            sys.argv, sys.path[:] = ["-c", *args[3:]], ["", *path]
            exec(compile(args[2], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            script = os.path.abspath(args[1])
            sys.argv, sys.path[:] = args[1:], [os.path.dirname(os.path.realpath(script)), *path]
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def run(args: list[str], cwd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`, forked."""
    return _run_all([args], cwd, [env], timeout, args)


def launch(ranks: int, port: int, args: list[str], cwd: str, env: dict[str, str], timeout: float,
           command: list[str]) -> subprocess.CompletedProcess:
    """The `ranks` processes that `deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS` starts on one
    machine, forked: each with the variables and `--local_rank` the launcher gives it. As the launcher
    does, the first rank to fail ends the others and its status is the run's; the output is the ranks'
    in rank order. `command` is the launcher command they stand for."""
    world = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks),
             "LOCAL_SIZE": str(ranks), "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    commands = [[sys.executable, args[0], f"--local_rank={rank}", *args[1:]] for rank in range(ranks)]
    envs = [{**world, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(ranks)]
    return _run_all(commands, cwd, envs, timeout, command)


def _read(name: str) -> str:
    with open(name) as handle:
        return handle.read()


def _run_all(commands: list[list[str]], cwd: str, envs: list[dict[str, str]], timeout: float,
             shown: list[str]) -> subprocess.CompletedProcess:
    """Fork one process per command; wait for all, or end the rest once one fails or time runs out."""
    context = _context()
    with tempfile.TemporaryDirectory() as folder:
        files = [(os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")) for i in range(len(commands))]
        for name in (name for pair in files for name in pair):
            open(name, "w").close()
        processes = [context.Process(target=_child, args=(args, str(cwd), env, _server["path"], *pair))
                     for args, env, pair in zip(commands, envs, files, strict=True)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        while True:
            failed = next((p.exitcode for p in processes if p.exitcode), None)  # a failed one's status
            running = [p.sentinel for p in processes if p.exitcode is None]
            if failed is not None or not running or time.monotonic() >= deadline:
                break
            connection.wait(running, deadline - time.monotonic())
        timed_out = failed is None and bool(running)
        for process in processes:
            if process.exitcode is None:
                process.kill()
            process.join()
        for process in processes:
            process.close()
        stdout, stderr = ("".join(_read(pair[i]) for pair in files) for i in (0, 1))
    if timed_out:
        raise subprocess.TimeoutExpired(shown, timeout, stdout, stderr)
    return subprocess.CompletedProcess(shown, failed or 0, stdout, stderr)
