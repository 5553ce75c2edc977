"""Shared fixtures: tiny models, tokenizers and data built by the tests themselves, offline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT))
# Commands the tests start import rw_eval and step2_reward_model from this checkout too. utils/ and
# benchmarks/ install as rlhf_reward.utils and rlhf_reward.benchmarks (pyproject.toml), a mapping
# only an install makes: the suite refuses to run against another checkout's install.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def cpu_share() -> int:
    """The cores this pytest process may keep busy: all of them, or its share when pytest-xdist
    runs several processes side by side."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


# Under pytest-xdist (`make test` runs it) torch would start a thread per core in every worker, and
# workers that outnumber the cores would spin waiting on each other: each worker, and every process
# it starts, takes its share. Set before torch is first imported, which reads it.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(cpu_share())
# DeepSpeed compiles its CPU ops (the shared-memory collectives of two ranks) into one cache per user,
# named by the Python and torch versions only: a second checkout's virtualenv has other include
# paths, so each would rebuild the op (a minute of compiling) after every run of the other's.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
# Every command the tests start finds this virtualenv's tools first, as under `make test`: it builds
# those ops with the virtualenv's ninja, and a build by the system's ninja, whose log it cannot
# read, would make the next one compile them again.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
# The commands the tests start print as they go, and never reach for the Hugging Face hub (there is
# none here: every model and data set is built by the tests or lies beside the repository).
os.environ.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
_INSTALLED = importlib.util.find_spec("rlhf_reward.utils")
if _INSTALLED is None or Path(_INSTALLED.origin).resolve().parent != REPO_ROOT / "utils":
    raise pytest.UsageError(f"rlhf_reward.utils is {_INSTALLED and _INSTALLED.origin}, not this checkout's "
                            f"utils/: run `pip install --no-deps -e {REPO_ROOT}` (make install does)")

import forked_cli  # noqa: E402
from rlhf_reward.utils.data.synthetic import make_pairs, write_dataset  # noqa: E402
from rlhf_reward.utils.runtime import SINGLE_PROCESS_ENV  # noqa: E402
from rlhf_reward.utils.tiny import save_tiny_model, train_tokenizer  # noqa: E402

FAMILIES = ("opt", "gpt2", "gpt_neox", "llama")
# Two computations of the same float32 values that round differently (another batch layout, another
# code path, another CPU's kernels) agree to a few float32 epsilons of the magnitudes involved; 64
# leaves room for sums over a tiny model's widths and lengths, and is far below any real error.
ROUNDING_SLACK = 64


@pytest.fixture(autouse=True)
def no_process_group_left():
    """A test that runs main() in this process leaves no process group and no rendezvous variables
    behind: every later command this worker starts would inherit the port, which another worker's run
    may hold by then (EADDRINUSE, seen in CI)."""
    before = {key: os.environ.get(key) for key in SINGLE_PROCESS_ENV}
    yield
    import torch.distributed as dist

    after = {key: os.environ.get(key) for key in SINGLE_PROCESS_ENV}
    assert after == before and not dist.is_initialized(), f"left behind: {after}, group {dist.is_initialized()}"


def rounding_tolerance(*values, dtype=None, slack: int = ROUNDING_SLACK) -> float:
    """Absolute tolerance for comparing values computed in `dtype` (float32 unless given) by two
    different routes: `slack` epsilons of the largest magnitude among `values` (at least 1)."""
    import torch

    largest = max([1.0, *(torch.as_tensor(value).detach().double().abs().max().item() for value in values)])
    return slack * torch.finfo(dtype or torch.float32).eps * largest


def objective_forward(model, batch, objective=None) -> dict:
    """A collated batch through the model and the objective's loss (default: the preference loss the
    model was made for), as `training.train_step` runs it: `loss` and `scores` (one per response or
    step); for responses, each example's best and worst row's score (`chosen_mean_scores`,
    `rejected_mean_scores`); for rated responses, the predicted `attributes`."""
    import torch
    from rlhf_reward.utils.data.batch import Ranking

    from step2_reward_model.objectives.preference import Preference

    objective = objective or Preference()
    rows = model(batch.inputs, batch.layout)
    out = objective.loss(model, rows, batch)
    result = {"loss": out.loss, "scores": out.scores}
    if isinstance(batch.targets, Ranking):
        group, prompts = batch.targets.group.to(out.scores.device), len(batch.targets.margin)
        last = torch.full((prompts,), -1, device=group.device).scatter_reduce(
            0, group, torch.arange(len(group), device=group.device), "amax")
        result.update(chosen_mean_scores=out.scores[:prompts], rejected_mean_scores=out.scores[last])
    if out.attributes is not None:
        result["attributes"] = out.attributes
    return result


def pair_batch(input_ids, attention_mask):
    """DeepSpeed-Chat's pair batch as a `Batch`: every chosen row, then as many rejected rows."""
    import torch
    from rlhf_reward.utils.data.batch import Batch, Layout, ModelInputs, Ranking

    pairs = len(input_ids) // 2
    ranking = Ranking(group=torch.arange(pairs).repeat(2), rank=torch.arange(2).repeat_interleave(pairs),
                      margin=torch.zeros(pairs))
    return Batch(ModelInputs(input_ids, attention_mask), ranking, Layout())


def forward_backward(model, batch, objective=None) -> tuple[dict, list]:
    """The outputs of one forward of a collated batch and the gradients of its loss."""
    model.zero_grad()
    out = objective_forward(model, batch, objective)
    out["loss"].backward()
    return ({key: value.detach() for key, value in out.items()},
            [param.grad.clone() for param in model.parameters() if param.grad is not None])


def assert_chunks_change_nothing(model, items: list[dict], pad_token_id: int = 0, objective=None) -> None:
    """A float64 model's loss, scores and gradients on a batch of unpacked rows are the same run in
    the collator's length chunks as in one padded forward, and the rows really are split."""
    import torch
    from rlhf_reward.utils.data.collate import CHUNK_TOKENS, PairCollator

    chunked = PairCollator(pad_token_id, chunk_tokens=CHUNK_TOKENS["cpu"])(items)
    assert len(chunked.layout.chunks or []) > 1, "rows too alike to split"
    (out, grads), (whole, grads_whole) = (forward_backward(model, batch, objective)
                                          for batch in (chunked, PairCollator(pad_token_id)(items)))
    assert len(grads) == len(grads_whole) > 0
    tolerance = rounding_tolerance(whole["loss"], whole["scores"], dtype=torch.float64)
    torch.testing.assert_close(out["loss"], whole["loss"], atol=tolerance, rtol=0)
    torch.testing.assert_close(out["scores"], whole["scores"], atol=tolerance, rtol=0)
    for grad, expected in zip(grads, grads_whole, strict=True):
        torch.testing.assert_close(grad, expected, atol=rounding_tolerance(expected, dtype=torch.float64), rtol=0)


def launcher_env(ranks: int) -> dict[str, str]:
    """Environment for a run of `ranks` processes: DeepSpeed gives each rank a GPU where there are
    enough, and otherwise runs on its CPU accelerator (as on a machine without a GPU). Each rank
    gets its part of this process's cores for its threads: left to their default, every rank would
    start a thread per core, and ranks that outnumber the cores spin waiting for each other."""
    import torch

    env = {"OMP_NUM_THREADS": str(max(1, cpu_share() // ranks))}
    if 0 < torch.cuda.device_count() < ranks:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def launcher(ranks: int) -> list[str]:
    """The deepspeed launcher for `ranks` processes on this machine. Its rendezvous port is a free
    one, not the fixed default, so that runs started side by side (pytest -n) do not meet."""
    from rlhf_reward.utils.runtime import free_port

    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(free_port())]


# The test files that keep a worker busiest (a minute or more each, measured 2026-12-07), in that order. `make
# test` gives whole files to its workers (--dist loadfile) in collection order (--no-loadscope-reorder), so
# starting with these lets the workers finish together instead of one running a long file alone at the end.
SLOWEST_FILES = ("test_train.py", "test_resume.py", "test_quality.py", "test_encoders.py", "test_objectives.py",
                 "test_handoff.py", "test_scripts.py", "test_distributed.py", "test_packing.py", "test_attributes.py",
                 "test_length.py", "test_public_benchmarks.py", "test_benchmark.py")


def pytest_collection_modifyitems(items: list) -> None:
    """The slowest files first, the others after them in their usual order; each file's tests keep theirs."""
    order = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))


def shared_memory_left(command: list[str]) -> list[str]:
    """DeepSpeed all-reduce buffers in /dev/shm left behind by the `launcher` run `command` (named after
    its rendezvous port); main.py removes its ranks' names as soon as they have joined."""
    port = command[command.index("--master_port") + 1]
    if not os.path.isdir("/dev/shm"):
        return []
    return [name for name in os.listdir("/dev/shm")
            if name.startswith("deepspeed_allreduce_buffer_") and name.split("_")[-2] == port]


def training_device(ranks: int = 1) -> str:
    """Where a training subprocess of `ranks` processes runs: 'cuda' or 'cpu' (see launcher_env)."""
    import torch

    return "cuda" if torch.cuda.device_count() >= ranks else "cpu"


def corpus() -> list[str]:
    return [" ".join(row.values()) for row in make_pairs(600, seed=0)]


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    """A trained tokenizer per model family (OPT's `</s>` prefix, GPT-2's pad-less eos, ...)."""
    texts = corpus()
    return {family: train_tokenizer(texts, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """A saved tiny random model folder per family, loadable by `--model_name_or_path`."""
    root = tmp_path_factory.mktemp("models")
    texts = corpus()
    dirs = {}
    for family in FAMILIES:
        dirs[family] = str(root / family)
        save_tiny_model(dirs[family], texts, family=family, hidden=64, layers=2)
    return dirs


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("synthetic")
    write_dataset(str(folder), train=3000, evaluation=300)
    return str(folder)


def run_ranks(command: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `command`, a `launcher` command, from the repository root as the ranks it starts: forked as
    run_cli forks a Python command, where the environment allows, else through the launcher itself.
    (test_train.py's two-rank test and the SIGTERM tests always run the launcher.)"""
    ranks = int(command[command.index("--num_gpus") + 1])
    port_at = command.index("--master_port") + 1
    args = command[port_at + 1:]
    full_env = {**os.environ, **(env or {})}
    if forked_cli.eligible([sys.executable, args[0]], full_env):
        return forked_cli.launch(ranks, int(command[port_at]), args, REPO_ROOT, full_env, timeout, command)
    return run_cli(command, timeout, env)


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root, as a user would, and capture its output. A Python
    command runs in a fresh process forked from one that has imported torch and transformers
    (tests/forked_cli.py), where its environment allows."""
    full_env = {**os.environ, **(env or {})}
    if forked_cli.eligible(args, full_env):
        return forked_cli.run(args, REPO_ROOT, full_env, timeout)
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def rw_eval_output(args: list[str], capsys) -> str:
    """Run rw_eval.py's main in this process, as `python rw_eval.py ARGS` runs it without starting
    Python, torch and transformers again; it must exit 0. Its stdout. (The command line's own exit
    status and stderr on bad input are tested as subprocesses, in tests/test_handoff.py.)"""
    import rw_eval

    status = rw_eval.main(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    return captured.out


def needs_shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (the shared sample data is only beside the repository)")
    return path


def save_random_reward_model(folder: str, model_dir: str, seed: int = 0) -> str:
    """A step-2 OUTPUT folder without training: the backbone in `model_dir` and a random value head,
    saved exactly as training saves (for tests of loading, exports, evaluation and serving)."""
    import torch
    from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer

    from step2_reward_model.model import create_reward_model
    from step2_reward_model.output import save_reward_model

    tokenizer = load_hf_tokenizer(model_dir)
    torch.manual_seed(seed)
    model = create_reward_model(model_dir, tokenizer)
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    meta = {"base_model": model_dir, "end_of_conversation_token": END_OF_CONVERSATION_TOKEN, "max_seq_len": 128}
    save_reward_model(model.eval(), tokenizer, folder, meta=meta)
    return folder


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, model_dirs) -> dict[str, str]:
    """A saved (untrained) step-2 OUTPUT folder per family."""
    root = tmp_path_factory.mktemp("saved")
    return {family: save_random_reward_model(str(root / family), model_dirs[family]) for family in FAMILIES}
