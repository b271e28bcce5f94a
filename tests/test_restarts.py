"""Restarts that lose nothing: a rank killed mid-run, the job restarted by torchrun
(--max-restarts) or requeued (the same deepspeed command again), ends with the losses
of an uninterrupted run; a run stopped for non-finite losses is not retried."""
import logging
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist

from cimfast.engine import checkpoint
from tests.runs import BIN, ENV, ROOT, diverging_config, ds_config, free_port, losses, run_train

# rank 1 dies of SIGKILL (as of the out-of-memory killer or a lost node) in step 5's backward,
# once: the flag file, made just before, keeps the restarted attempt alive
KILL_RANK_1_ONCE = r"""
import os, signal, sys
import deepspeed
real = deepspeed.DeepSpeedEngine.backward
calls = {"n": 0}


def backward(*args, **kwargs):
    calls["n"] += 1
    flag = os.environ["KILLED_FLAG"]
    if os.environ.get("RANK") == "1" and calls["n"] == 5 and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)


deepspeed.DeepSpeedEngine.backward = backward
sys.argv = ["train.py", *sys.argv[1:]]
from cimfast.train import cli
cli()
"""


def _config(tmp):
    return ds_config(str(tmp), "restart", steps=8, checkpoint_interval=2, keep_checkpoints=10)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    r = run_train(["--ds_config", _config(tmp), "--output_dir", str(tmp / "out")], ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(str(tmp / "out"))


def _launch(launcher, tmp, script, args, restarts=1):
    path = tmp / "killed.py"
    path.write_text(script)
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--max-restarts", str(restarts),
               "--master_port", free_port()]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", free_port()]
    env = {**ENV, "KILLED_FLAG": str(tmp / "killed"), "CIMFAST_EXIT_FILE": str(tmp / "exit_code")}
    # short bounds: a rank that hangs ends its attempt naming the step and phase, not the test's timeout
    bounds = ["--step_timeout_minutes", "0.5", "--long_timeout_minutes", "2"]
    proc = subprocess.Popen(cmd + [str(path), *args, *bounds], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"{launcher} still running after 400 s:\n{(out + err)[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_killed_rank_restarts_from_the_newest_checkpoint_and_ends_equal(tmp_path, launcher, uninterrupted):
    """torchrun restarts every rank itself; a requeued job runs the same deepspeed command again.
    Either way the run resumes from step 4 and logs the uninterrupted run's losses."""
    out = str(tmp_path / "out")
    args = ["--ds_config", _config(tmp_path), "--output_dir", out, "--resume", "auto"]
    r = _launch(launcher, tmp_path, KILL_RANK_1_ONCE, args)
    printed = r.stdout + r.stderr
    assert os.path.exists(tmp_path / "killed"), printed[-3000:]
    if launcher == "deepspeed":  # the launcher ends the job; the requeue runs the same command
        assert r.returncode != 0, printed[-3000:]
        assert checkpoint.latest_checkpoint(out).endswith("step_00000004")
        r = _launch(launcher, tmp_path, KILL_RANK_1_ONCE, args)
        printed = r.stdout + r.stderr
    assert r.returncode == 0, printed[-3000:]
    assert (tmp_path / "exit_code").read_text() == "0\n"  # rank 0's own code, for a batch script
    assert "resumed from" in printed and "step_00000004 at step 4" in printed, printed[-3000:]
    got = losses(out)
    assert sorted(got) == sorted(uninterrupted) == list(range(1, 9))
    for step, loss in uninterrupted.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), (step, got[step], loss)


def test_a_run_stopped_for_nonfinite_losses_is_not_retried(tmp_path):
    """torchrun restarts whatever the exit code: the restarted ranks refuse the non-finite
    checkpoint at once with exit code 3, before training or writing anything. Resumed by hand
    (no restart counter set), it goes on as asked. $CIMFAST_EXIT_FILE holds rank 0's code,
    which torchrun's own exit code (1) hides."""
    cfg_path = diverging_config(str(tmp_path), "nan", checkpoint_interval=0)
    out = str(tmp_path / "out")
    plain = "import sys\nsys.argv = ['train.py', *sys.argv[1:]]\nfrom cimfast.train import cli\ncli()\n"
    r = _launch("torchrun", tmp_path, plain, ["--ds_config", cfg_path, "--output_dir", out, "--resume", "auto"],
                restarts=2)
    printed = r.stdout + r.stderr
    assert r.returncode != 0 and (tmp_path / "exit_code").read_text() == "3\n", printed[-3000:]
    stopped = checkpoint.latest_checkpoint(out)
    assert checkpoint.read_state(stopped)["reason"] == "non-finite losses", printed[-3000:]
    # both restarts refused at once (one line a rank; torchrun may end a rank before it prints),
    # no traceback, no training
    assert printed.count("cimfast: not retried: the newest checkpoint") >= 2, printed[-3000:]
    assert "TORCHELASTIC_RESTART_COUNT=1" in printed and "TORCHELASTIC_RESTART_COUNT=2" in printed
    assert "resumed from" not in printed  # (the traceback printed is torchrun's own, of its failed ranks)
    assert checkpoint.finished_checkpoints(checkpoint.checkpoint_root(out)) == [os.path.basename(stopped)]
    r = run_train(["--ds_config", cfg_path, "--output_dir", out, "--resume", "auto", "--max_nonfinite", "1000",
                   "--max_steps", str(checkpoint.read_state(stopped)["step"] + 1)], ranks=2)
    assert r.returncode == 0 and "not retried" not in r.stderr and "resumed from" in r.stderr, r.stderr[-3000:]
    assert checkpoint.read_state(stopped)["resumed_by_hand"]  # its later automatic restarts may retry


def test_resuming_zero_on_another_number_of_ranks_is_one_line(tmp_path):
    """A ZeRO-2 checkpoint of 2 ranks resumed on 1: one line naming the cause, exit code 2."""
    out = str(tmp_path / "out")
    cfg = ds_config(str(tmp_path), "two", steps=2)
    r = run_train(["--ds_config", cfg, "--output_dir", out], ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(["--ds_config", cfg, "--output_dir", out, "--resume", "auto", "--max_steps", "3"])
    assert r.returncode == 2 and "was saved by another number of ranks" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


# one rank of a torchrun attempt on one node, as far as the default group's start and an all-reduce
ATTEMPT_RANK = r"""
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["ROOT"])
from cimfast.engine.distributed import start_attempt_group
time.sleep(float(os.environ["LATE"]))
start_attempt_group("gloo", timedelta(seconds=30))
t = torch.ones(1)
dist.all_reduce(t)
print("sum", int(t.item()))
dist.destroy_process_group()  # as cimfast's finish(): a gloo group left at exit may abort the process
"""


def test_each_torchrun_attempt_starts_its_group_under_keys_of_its_own():
    """The agent's store outlives an attempt: the restarted ranks (rank 1 two seconds late, so
    that rank 0 reads the store first) never read the failed attempt's keys but write new ones
    (overwriting them, as a start without the prefix does, leaves the count of keys unchanged)."""
    agent = dist.TCPStore("127.0.0.1", int(free_port()), 1, is_master=True, timeout=timedelta(seconds=60),
                          wait_for_workers=False)
    keys = []
    for attempt in (0, 1):
        env = {**ENV, "ROOT": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port), "WORLD_SIZE": "2",
               "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1",
               "TORCHELASTIC_RESTART_COUNT": str(attempt)}
        ranks = [subprocess.Popen([sys.executable, "-c", ATTEMPT_RANK], env={
            **env, "RANK": str(r), "LOCAL_RANK": str(r), "LATE": str(2 * attempt * r)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=120)[0] for p in ranks]
        assert [p.returncode for p in ranks] == [0, 0] and all("sum 2" in o for o in outs), outs
        keys.append(agent.num_keys())
    assert keys[1] > keys[0], keys


def test_torchrun_on_several_nodes_is_left_to_deepspeed_with_a_warning(monkeypatch, caplog):
    """Agents of several nodes count restarts apart: no shared prefix is safe, the start stays
    DeepSpeed's, and a run allowed restarts is told how to get a fresh store per attempt."""
    from cimfast.engine.distributed import start_attempt_group

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.WARNING, logger="cimfast"):
        start_attempt_group("gloo", timedelta(seconds=5))  # no store is dialled: it returns at once
    assert not dist.is_initialized()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text


def test_the_attempt_group_binds_the_device_as_deepspeed_does(monkeypatch):
    """NCCL on a CUDA accelerator with several ranks gets device_id (cuda:LOCAL_RANK), as
    DeepSpeed's own start passes it; gloo, one rank, or torch 2.6.x-2.7.0 (where it hangs) do not."""
    from deepspeed.accelerator import get_accelerator

    from cimfast.engine import distributed

    monkeypatch.setattr(type(get_accelerator()), "device_name", lambda self, *a: "cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(distributed.torch, "__version__", "2.14.1")
    assert distributed._device_binding("nccl", 8) == {"device_id": distributed.torch.device("cuda", 3)}
    assert distributed._device_binding("gloo", 8) == {} and distributed._device_binding("nccl", 1) == {}
    monkeypatch.setattr(distributed.torch, "__version__", "2.7.0")
    assert distributed._device_binding("nccl", 8) == {}
