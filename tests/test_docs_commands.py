"""Every command that README.md's shell blocks and `train.py --help` show runs as shown, on this CPU.

The commands are read from the documents themselves, so a new or changed command is tested without editing this
file. Each runs in a fresh working directory with small flags appended (argparse keeps the last value of a flag),
so a training command runs two steps; torchrun runs at most two processes (`--standalone`, gloo). A command that
continues a run (`--resume out`, `--ckpt out`) finds a finished run in `out/`. Commands that cannot run here are
left out by the rules in NOT_RUN_HERE, each with its reason, and each rule must match at least one command.
"""

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# (what marks the command, why it is not run here).
NOT_RUN_HERE = [
    ("pip install", "installing is what .ci/run proves, in a fresh virtualenv"),
    ("pytest", "the test command is the one running this test"),
    ("HOST", "multi-node needs a second machine"),
    ("fineweb10B", "FineWeb is 21 GB from the Hub: tests/test_fineweb.py runs these commands against a local fake"),
]
SHORT = {
    "train.py": ["--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2"],
    "nanogpt2.sample": ["--max-new-tokens", "4"],
}


def split_commands(lines: list[str]) -> list[str]:
    """Shell lines -> commands: backslash continuations joined, `&&` chains split, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    commands = []
    for line in joined.splitlines():
        line = " ".join(shlex.split(line, comments=True))
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return split_commands([line for block in blocks for line in block.splitlines()])


def help_commands() -> list[str]:
    """What `python train.py --help` prints, from train.py's main() in this process: the list is needed to collect
    the tests, and a process started for it would delay every test run, a quick one too, by seconds."""
    import train

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        train.main(["--help"])
    assert "usage: " in help_text.getvalue(), help_text.getvalue()
    shown = [line for line in help_text.getvalue().splitlines() if line.lstrip().startswith(("python ", "torchrun "))]
    return split_commands(shown)


def runnable(commands: list[str]) -> list[str]:
    return [c for c in commands if not any(mark in c for mark, _ in NOT_RUN_HERE)]


DOC_COMMANDS = sorted(set(readme_commands()) | set(help_commands()))


def test_documents_show_commands_and_every_exclusion_is_used():
    assert "python train.py" in DOC_COMMANDS, "README's first command is not in a shell block"
    assert len(runnable(DOC_COMMANDS)) >= 5, DOC_COMMANDS
    for mark, why in NOT_RUN_HERE:
        assert any(mark in c for c in DOC_COMMANDS), f"exclusion {mark!r} ({why}) matches no command: remove it"


def argv_for(command: str) -> list[str]:
    """A documented command -> what runs here: this interpreter, at most 2 torchrun processes, short flags."""
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
        argv = [re.sub(r"^(--nproc[_-]per[_-]node)=(\d+)$", lambda m: f"{m[1]}={min(int(m[2]), 2)}", a) for a in argv]
        if "--standalone" not in argv:
            argv.insert(3, "--standalone")  # a free port, so parallel test runs cannot collide
    argv = [str(REPO / a) if a == "train.py" else a for a in argv]  # run from a scratch directory, not the repo
    for script, flags in SHORT.items():
        if any(a.endswith(script) for a in argv):
            argv += flags
    return argv


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def run(argv: list[str], cwd: Path, data_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOGPT2_DATA_DIR": str(data_cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache) -> Path:
    """`out/` of a short default-corpus run, for the commands that continue or sample a run."""
    cwd = tmp_path_factory.mktemp("finished")
    done = run(argv_for("python train.py --preset pico") + ["--max-steps", "1"], cwd, data_cache)
    assert done.returncode == 0, done.stderr
    return cwd / "out"


@pytest.fixture(scope="module")
def command_runs(request, tmp_path_factory, data_cache, finished_run) -> dict[str, subprocess.CompletedProcess]:
    """The documented commands this session runs, each once in a fresh directory, two at a time (much of each is
    process start-up, on one core). `finished_run` comes first: it also fills the data cache they share, so none of
    them tokenizes the default corpus while another does."""
    commands = [
        item.callspec.params["command"]
        for item in request.session.items
        if item.module is request.module and item.originalname == "test_documented_command_runs"
    ]
    cwds = {command: tmp_path_factory.mktemp("command") for command in commands}
    for command, cwd in cwds.items():
        if re.search(r"--(resume|ckpt) out\b", command):
            shutil.copytree(finished_run, cwd / "out")
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda command: run(argv_for(command), cwds[command], data_cache), commands)
        return dict(zip(commands, done, strict=True))


@pytest.mark.parametrize("command", runnable(DOC_COMMANDS))
def test_documented_command_runs(command, command_runs):
    done = command_runs[command]
    assert done.returncode == 0, f"{shlex.join(done.args)} failed:\n{done.stderr[-3000:]}"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_python_snippet_runs_as_shown(tmp_path):
    """The README's Python, run from a scratch directory: "gpt2" comes from a Hugging Face cache laid out as
    transformers leaves it (a small random GPT-2 with GPT-2's vocabulary), and the export loads in transformers."""
    from helpers import hf_checkpoint

    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    hf_checkpoint(snapshot, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    blocks = readme_python_blocks()
    assert len(blocks) == 1 and 'from_pretrained("my-gpt2")' in blocks[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("The meaning of life is") and done.stdout.count("The meaning of life is") == 2
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "my-gpt2").iterdir()}


TRAINING_EXAMPLES = [c for c in DOC_COMMANDS if c.startswith("python train.py --") and "--resume" not in c]


@pytest.mark.parametrize("command", TRAINING_EXAMPLES)
def test_readme_training_example_trains_something_else_than_the_default(command):
    """Each `python train.py FLAGS` example, on this CPU, changes the model, the sequences or the data of the default
    run, and no flag of it draws a note that it changes nothing."""
    from helpers import cpu_config

    cfg, model = cpu_config(*shlex.split(command)[2:])
    plain_cfg, plain_model = cpu_config()
    assert cfg.ineffective_flags(model) == []
    assert (model, cfg.seq_len, cfg.data) != (plain_model, plain_cfg.seq_len, plain_cfg.data)


def test_conventions_layout_lists_every_module_and_only_what_exists():
    text = (REPO / "CONVENTIONS.md").read_text()
    block = re.search(r"## Layout[^\n]*\n```\n(.*?)```", text, flags=re.S).group(1)
    listed = {line.split()[0] for line in block.splitlines() if line.strip()}
    modules = {str(p.relative_to(REPO)) for p in (REPO / "nanogpt2").rglob("*.py") if p.name != "__init__.py"}
    assert modules <= listed, f"modules missing from CONVENTIONS.md's layout: {sorted(modules - listed)}"
    assert all((REPO / entry).exists() for entry in listed), [e for e in listed if not (REPO / e).exists()]
