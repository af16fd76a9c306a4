"""Training runs killed at any moment: before their first checkpoint they start again (resumed or taken
over), and otherwise they resume from the last complete checkpoint, exactly."""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lienzo.cli import app
from lienzo.training.config import build_config
from lienzo.training.folder import latest_checkpoint
from lienzo.training.trainer import Trainer
from pictures import captioned_blobs

# Tiny and quick: a checkpoint after every step, so that kills land in the middle of checkpoints too.
SETS = ["vae.steps=3", "unet.steps=3", "vae.batch_size=2", "unet.batch_size=2", "samples.every=0", "samples.prompts=[]",
        "checkpoint_every=1", "log_every=1"]
# The kill loop's run: four checkpoints per stage, so that every kill still leaves some to make.
LOOP_SETS = [*SETS, "vae.steps=4", "unet.steps=4"]
QUICK = [{"vae": {"steps": 3, "batch_size": 2}, "unet": {"steps": 3, "batch_size": 2},
          "samples": {"every": 0, "prompts": []}, "checkpoint_every": 1, "log_every": 1}]


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """Six small captioned pictures."""
    return captioned_blobs(tmp_path_factory.mktemp("art") / "data")


def _train(*args: str):
    sets = [arg for s in SETS for arg in ("--set", s)]
    return CliRunner().invoke(app, ["train", "--preset", "tiny", *sets, "--device", "cpu", *args])


class _Killed(Exception):
    pass


def _killed_before_the_first_checkpoint(art: Path, out: Path) -> None:
    """What a kill during the first step leaves: the config, the manifest, a loss row, no checkpoint."""

    def die(progress) -> None:
        raise _Killed

    with pytest.raises(_Killed):
        Trainer(build_config("tiny", overrides=QUICK), data=art, out=out, device="cpu", progress=die).run()
    assert (out / "training" / "config.toml").is_file() and latest_checkpoint(out) is None


def _steps_logged(out: Path) -> list[tuple[str, int]]:
    rows = (out / "training" / "loss.csv").read_text().splitlines()[1:]
    return [(row.split(",")[0], int(row.split(",")[1])) for row in rows]


def test_resuming_a_run_killed_before_its_first_checkpoint_starts_it_again(art, tmp_path, caplog):
    out = tmp_path / "run"
    _killed_before_the_first_checkpoint(art, out)
    result = _train("--resume", str(out))  # no --data: the run's manifest names it
    assert result.exit_code == 0, result.output
    assert "stopped before its first checkpoint; starting it again from step 0 with its saved config" in caplog.text
    assert _steps_logged(out) == [("vae", 1), ("vae", 2), ("vae", 3), ("unet", 1), ("unet", 2), ("unet", 3)]
    assert (out / "unet").is_dir()


def test_resuming_a_run_killed_before_it_recorded_its_data_needs_data(art, tmp_path):
    out = tmp_path / "run"
    _killed_before_the_first_checkpoint(art, out)
    (out / "dataset_manifest.json").unlink()  # killed while the images were being checked
    result = _train("--resume", str(out))
    assert result.exit_code == 2 and "stopped before it recorded its data folder; give it with --data FOLDER" in result.output


def test_a_fresh_start_takes_over_a_run_killed_before_its_first_checkpoint(art, tmp_path, caplog):
    out = tmp_path / "run"
    _killed_before_the_first_checkpoint(art, out)
    # Not with anything else in the folder: that may be someone's.
    (out / "notes.txt").write_text("mine")
    result = _train("--data", str(art), "--out", str(out))
    assert result.exit_code == 2 and "already holds a training run" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    result = _train("--data", str(art), "--out", str(out), "--set", "unet.lr=0.0002")  # any config: the old run is gone
    assert result.exit_code == 0, result.output
    assert "holds a run stopped before its first checkpoint; starting afresh in its place" in caplog.text
    assert "lr = 0.0002" in (out / "training" / "config.toml").read_text()
    assert _steps_logged(out)[0] == ("vae", 1) and len(_steps_logged(out)) == 6


def test_killed_before_its_config_was_saved(art, tmp_path):
    """Only the run folder and a temporary file: a fresh start takes it over; --resume says to start again."""
    out = tmp_path / "run"
    (out / "training").mkdir(parents=True)
    (out / "training" / ".config.toml.0123456789ab.tmp").write_text("seed = ")
    result = _train("--resume", str(out))
    assert result.exit_code == 2 and "stopped before it saved its config; start it again with --data FOLDER" in result.output
    result = _train("--data", str(art), "--out", str(out), "--set", "unet.steps=1", "--set", "vae.steps=1")
    assert result.exit_code == 0, result.output
    assert not (out / "training" / ".config.toml.0123456789ab.tmp").exists()


def test_stopping_right_after_a_resume_keeps_that_checkpoint_in_place(art, tmp_path):
    """Writing the same step again would leave a moment without it: only its state is brought up to date."""
    out = tmp_path / "run"
    Trainer(build_config("tiny", overrides=QUICK), data=art, out=out, device="cpu", stop_after=2).run()
    checkpoint = latest_checkpoint(out)
    weights = checkpoint / "vae" / "diffusion_pytorch_model.safetensors"
    before = (checkpoint.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns)
    result = Trainer(build_config("tiny", overrides=QUICK), data=None, out=out, resume=True, device="cpu", stop_after=0).run()
    assert result.status == "stopped" and result.steps == {"vae": 2}
    assert latest_checkpoint(out) == checkpoint
    assert (checkpoint.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2


# -- kill -9 in a loop --------------------------------------------------------------------------------

def _checkpoint_loads(out: Path) -> tuple[int, int] | None:
    """(stage, step) of the run's latest complete checkpoint, after loading every file in it; None without one."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / "state.json").read_text())
    torch.load(checkpoint / "trainer.pt", weights_only=True)
    files = list(checkpoint.glob("*/*.safetensors"))
    assert {f.parent.name for f in files} == {"vae", "unet", "text_encoder"}, checkpoint
    for file in files:
        load_file(file)
    return ["vae", "unet"].index(state["stage"]), state["step"]


def _complete(out: Path) -> set[str]:
    """Names of the complete checkpoints, seen from outside while the run writes and prunes them."""
    return {p.parent.name for p in (out / "training" / "checkpoints").glob("*/state.json") if not p.parent.name.endswith(".tmp")}


def _writing(out: Path) -> bool:
    return any((out / "training" / "checkpoints").glob("*.tmp"))


class _Zygote:
    """Imports torch and the trainer once, then runs each ``lienzo train`` in a forked child: a fresh
    interpreter per run would spend most of the test importing."""

    CODE = r"""
import os, sys
from lienzo.cli import app
import lienzo.training.trainer

log = sys.argv[1]
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            app.main(args=line.rstrip("\n").split("\t"), prog_name="lienzo")
        except SystemExit as exit:
            os._exit(exit.code if isinstance(exit.code, int) else 1)
        os._exit(0)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""

    def __init__(self, log: Path):
        self.log, self.child = log, None
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE, str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def start(self, *args: str) -> None:
        sets = [arg for s in LOOP_SETS for arg in ("--set", s)]
        self.process.stdin.write("\t".join(["train", "--preset", "tiny", *sets, "--device", "cpu", *args]) + "\n")
        self.process.stdin.flush()
        self.child = int(self.process.stdout.readline())

    def finish(self) -> None:
        code = int(self.process.stdout.readline())
        self.child = None
        assert code == 0, self.log.read_text()[-3000:]

    def kill_when(self, happened, delay: float = 0.0) -> None:
        """SIGKILL the child once ``happened()`` (polled), ``delay`` seconds later; it must not have ended by itself."""
        deadline = time.monotonic() + 300
        while not happened():
            ended = select.select([self.process.stdout], [], [], 0)[0]
            assert not ended and time.monotonic() < deadline, f"the run never got there: {self.log.read_text()[-3000:]}"
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(self.child, signal.SIGKILL)
        code = int(self.process.stdout.readline())
        self.child = None
        assert code == -signal.SIGKILL, f"the run ended by itself ({code}): {self.log.read_text()[-3000:]}"

    def close(self) -> None:
        if self.child is not None:  # a failed assertion left one, running or ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        self.process.stdin.close()
        self.process.wait(timeout=60)


def test_kill_9_in_a_loop_always_resumes_from_a_complete_checkpoint(art, tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    zygote = _Zygote(tmp_path / "children.log")

    def resume_or_start() -> None:
        if (out / "training" / "config.toml").is_file():
            zygote.start("--resume", str(out), "--data", str(art))  # killed before the manifest, it needs --data
        else:
            zygote.start("--data", str(art), "--out", str(out))

    reached = []
    try:
        # 1. Before the first checkpoint: the config is there, nothing else yet.
        zygote.start("--data", str(art), "--out", str(out))
        zygote.kill_when(lambda: (out / "training" / "config.toml").is_file())
        reached.append(_checkpoint_loads(out))
        # 2. While a checkpoint is written, once the run has made a new one (so it moves on), at varied moments.
        for delay in (0.0, 0.01, 0.03):
            seen = _complete(out)
            resume_or_start()
            zygote.kill_when(lambda seen=seen: bool(_complete(out) - seen) and _writing(out), delay)
            reached.append(_checkpoint_loads(out))
        # 3. Right after a new complete checkpoint, while older ones are pruned.
        seen = _complete(out)
        resume_or_start()
        zygote.kill_when(lambda: bool(_complete(out) - seen))
        reached.append(_checkpoint_loads(out))
        # 4. To the end; then a run never killed, for comparison.
        resume_or_start()
        zygote.finish()
        zygote.start("--data", str(art), "--out", str(straight))
        zygote.finish()
    finally:
        zygote.close()
    # Every resume started from the latest complete checkpoint: they only move forward...
    assert reached[0] is None and all(a < b for a, b in zip(reached[1:], reached[2:])), reached
    # ... and the killed run ends exactly as the run never killed, step for step.
    assert _steps_logged(out) == _steps_logged(straight)
    for part in ("vae", "unet", "text_encoder"):
        for file in (straight / part).glob("*.safetensors"):
            expected, got = load_file(file), load_file(out / part / file.name)
            assert all(torch.equal(expected[k], got[k]) for k in expected), (part, file.name, reached)
    assert not list((out / "training" / "checkpoints").glob("*.tmp"))
