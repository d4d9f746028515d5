"""Faults in training: divergence, damaged checkpoints, changed settings on resume, two jobs on
one run directory, a launcher that dies, a rank that stops. Each test states the fault and the
behaviour that is required instead of the silent failure seqpar 0.1 had."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

from seqpar.checkpoint import (CheckpointError, NonFiniteStateError, checkpoint_path, export_checkpoint,
                               list_checkpoints, load_checkpoint, marker_path, newest_valid_checkpoint,
                               save_checkpoint, verify_checkpoint)
from seqpar.config import ModelConfig, TrainConfig, resume_changes
from seqpar.model import HybridLM
from seqpar.run_dir import RunDirLock
from seqpar.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(run_dir, steps: int, *extra: str) -> list[str]:
    return ["--steps", str(steps), "--seq-len", "32", "--batch-size", "2", "--run-dir", str(run_dir),
            "--no-progress", "--max-corpus-bytes", "200000", "--eval-batches", "1", "--no-plot", *extra]


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "train.jsonl"))]


def _all_finite(path: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(export_checkpoint(path, os.path.join(tmp, "full.pt")), weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


# --- 1. divergence ----------------------------------------------------------------------------

def test_divergence_stops_with_a_clear_error_and_keeps_the_good_checkpoints(tmp_path, capsys):
    """lr 1e6 makes the loss non-finite within a few steps. Before: exit 0, NaN in train.jsonl,
    non-finite checkpoints and the good ones pruned. Now: exit 3 naming the step, strict JSON,
    and every checkpoint left is finite."""
    run_dir = tmp_path / "diverge"
    code = main(_argv(run_dir, 12, "--lr", "1e6", "--warmup-steps", "0", "--checkpoint-interval", "1"))
    err = capsys.readouterr().err
    assert code == 3, err
    records = _records(run_dir)  # json.loads would accept NaN; check the text too
    assert "NaN" not in (run_dir / "train.jsonl").read_text()
    bad = [r for r in records if r["kind"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["action"] == "stop"
    step = bad[0]["step"]
    assert f"step {step}:" in err and "not finite" in err and "--on-nonfinite skip" in err
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints and all(s < step for s, _ in checkpoints)
    assert all(_all_finite(p) for _, p in checkpoints)
    assert f"the newest good one is {checkpoints[-1][1]}" in err


def test_skipping_non_finite_steps_stops_after_the_limit(tmp_path, capsys):
    run_dir = tmp_path / "skip"
    code = main(_argv(run_dir, 30, "--lr", "1e6", "--warmup-steps", "0", "--keep-checkpoints", "0",
                      "--on-nonfinite", "skip", "--max-skipped-steps", "3"))
    err = capsys.readouterr().err
    assert code == 3, err
    actions = [r["action"] for r in _records(run_dir) if r["kind"] == "nonfinite"]
    assert actions == ["skip", "skip", "stop"]
    assert "3 steps in a row (--max-skipped-steps 3)" in err


def test_a_non_finite_model_is_never_saved(tmp_path):
    model = HybridLM(ModelConfig())
    with torch.no_grad():
        model.tok_embeddings.weight[0, 0] = float("nan")
    path = checkpoint_path(str(tmp_path), 1)
    with pytest.raises(NonFiniteStateError, match=r"non-finite values in model\.tok_embeddings\.weight"):
        save_checkpoint(path, model=model, step=1)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")


# --- 2. verified checkpoints -------------------------------------------------------------------

def _three_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_argv(run_dir, 4, "--checkpoint-interval", "1", "--keep-checkpoints", "3")) == 0
    capsys.readouterr()
    paths = [p for _, p in list_checkpoints(run_dir)]
    assert [os.path.basename(p) for p in paths] == ["step_00000002", "step_00000003", "step_00000004"]
    return run_dir, paths


def _shard(path):
    """The tensor file of a one-rank checkpoint directory."""
    return os.path.join(path, "__0_0.distcp")


def _truncate(path):
    with open(_shard(path), "r+b") as fh:
        fh.truncate(os.path.getsize(_shard(path)) // 2)


def _empty(path):
    open(_shard(path), "wb").close()


def _flip_bytes(path):
    path = _shard(path)
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        data = fh.read(64)
        fh.seek(os.path.getsize(path) // 2)
        fh.write(bytes(b ^ 0xFF for b in data))


def _drop_marker(path):
    os.remove(marker_path(path))


@pytest.mark.parametrize("damage, why", [(_truncate, "were written"), (_empty, "were written"),
                                         (_flip_bytes, "differs from the one recorded"), (_drop_marker, "no completion marker")])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys, damage, why):
    """Before: torch's own error without the file's name (truncated, empty) or silent garbage
    (flipped bytes). Now: the damaged file is named with the reason and the previous one is used."""
    run_dir, paths = _three_checkpoints(tmp_path, capsys)
    damage(paths[-1])
    assert main(_argv(run_dir, 6, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"skipping {paths[-1]}: " in out and why in out
    assert f"continuing from {paths[1]}" in out
    steps = [r["step"] for r in _records(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 4 retrained from step 3's checkpoint


def test_a_damaged_checkpoint_given_by_path_is_an_error_naming_it(tmp_path, capsys):
    run_dir, paths = _three_checkpoints(tmp_path, capsys)
    _flip_bytes(paths[0])
    assert main(_argv(tmp_path / "other", 6, "--resume", paths[0])) == 4
    err = capsys.readouterr().err
    assert paths[0] in err and "SHA-256 of its file __0_0.distcp differs" in err


def test_when_every_checkpoint_is_damaged_resume_auto_refuses_to_start_over(tmp_path, capsys):
    run_dir, paths = _three_checkpoints(tmp_path, capsys)
    for p in paths:
        _truncate(p)
    assert main(_argv(run_dir, 6, "--resume", "auto")) == 4
    err = capsys.readouterr().err
    assert "none of the 3 checkpoint(s)" in err and "--overwrite" in err


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_checkpoints_load_without_running_code(tmp_path):
    """DCP's .metadata is a pickle: a checkpoint whose .metadata asks to call a function is
    refused by name, even with a valid completion marker, and the function never runs."""
    model = HybridLM(ModelConfig())
    path = save_checkpoint(checkpoint_path(str(tmp_path), 1), model=model, step=1)
    target = str(tmp_path / "pwned")
    with open(os.path.join(path, ".metadata"), "wb") as fh:
        pickle.dump({"evil": _Payload(target)}, fh)
    marker = json.load(open(marker_path(path)))
    data = open(os.path.join(path, ".metadata"), "rb").read()
    marker["files"][".metadata"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(marker, open(marker_path(path), "w"))
    assert verify_checkpoint(path) is None
    with pytest.raises(CheckpointError, match=r"posix\.makedirs|os\.makedirs"):
        load_checkpoint(path, model=HybridLM(ModelConfig()))
    assert not os.path.exists(target)


def test_a_full_disk_is_reported_and_leaves_the_previous_checkpoints(tmp_path, monkeypatch):
    model = HybridLM(ModelConfig())
    good = save_checkpoint(checkpoint_path(str(tmp_path), 1), model=model, step=1)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # every writer (DCP's and ours) fsyncs what it wrote
    path = checkpoint_path(str(tmp_path), 2)
    with pytest.raises(CheckpointError, match="no space left on the device"):
        save_checkpoint(path, model=model, step=2)
    monkeypatch.undo()
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    assert verify_checkpoint(good) is None


def test_stale_temporary_files_are_removed(tmp_path, capsys):
    run_dir, paths = _three_checkpoints(tmp_path, capsys)
    stale = paths[-1].replace("00000004", "00000005") + ".tmp"
    os.makedirs(stale)
    open(os.path.join(stale, "__0_0.distcp"), "wb").write(b"half a checkpoint")
    assert main(_argv(run_dir, 5, "--resume", "auto")) == 0
    assert not os.path.exists(stale)
    assert f"removed {os.path.basename(stale)}" in capsys.readouterr().out


_KILL_TRIAL = textwrap.dedent("""
    import sys
    from seqpar.train import main
    sys.exit(main(["--steps", "400", "--seq-len", "32", "--batch-size", "2", "--run-dir", sys.argv[1], "--no-progress",
                   "--max-corpus-bytes", "200000", "--eval-batches", "1", "--no-plot", "--checkpoint-interval", "1",
                   "--keep-checkpoints", "2"] + sys.argv[2:]))
""")


def test_kill_during_training_and_saving_never_loses_the_checkpoints(tmp_path):
    """SIGKILL at several moments of a run that saves every step: each time, the run directory
    holds a verified checkpoint (none lost, none corrupt) and resume auto continues from it."""
    run_dir = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    lost, resumed = 0, 0
    for trial, delay in enumerate((0.3, 0.55, 0.8, 0.2)):
        newest_before = list_checkpoints(run_dir)[-1][0] if trial else 0
        newest_good = newest_valid_checkpoint(run_dir)[0]  # a kill between the two renames leaves a .pt unmarked
        args = [sys.executable, "-c", _KILL_TRIAL, run_dir] + (["--resume", "auto"] if trial else [])
        proc = subprocess.Popen(args, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.time() + 60
        while time.time() < deadline and (not list_checkpoints(run_dir) or list_checkpoints(run_dir)[-1][0] <= newest_before):
            time.sleep(0.02)
        time.sleep(delay)
        proc.kill()
        out = proc.communicate()[0]
        resumed += f"continuing from {newest_good}" in out
        lost += not any(verify_checkpoint(p) is None for _, p in list_checkpoints(run_dir))
    assert lost == 0
    assert resumed == 3  # every resumed trial continued from the newest good checkpoint of the killed one


# --- 3. resume with changed settings -----------------------------------------------------------

def test_resume_refuses_model_and_data_changes_and_applies_training_ones(tmp_path, capsys):
    """Before: another feature map / RoPE theta / data source was accepted silently and --lr was
    ignored. Now: model and data changes are refused, listing each field; --allow-change accepts
    one on purpose; --lr applies from the resumed step on."""
    run_dir = tmp_path / "run"
    assert main(_argv(run_dir, 2, "--warmup-steps", "0")) == 0
    capsys.readouterr()
    assert main(_argv(run_dir, 4, "--warmup-steps", "0", "--resume", "auto", "--rope-theta", "10000",
                      "--feature-map", "elu1", "--data", "synthetic")) == 2
    err = capsys.readouterr().err
    for line in ("rope_theta: 500000.0 -> 10000.0", "feature_map: 'identity' -> 'elu1'",
                 "data: 'stdlib' -> 'synthetic'", "--allow-change"):
        assert line in err
    assert main(_argv(run_dir, 4, "--warmup-steps", "0", "--resume", "auto", "--rope-theta", "1000000",
                      "--allow-change", "rope_theta", "--lr", "1e-4", "--min-lr-ratio", "1.0")) == 0
    out = capsys.readouterr().out
    assert "rope_theta: 500000.0 -> 1000000.0 (applied)" in out and "lr: 0.003 -> 0.0001 (applied)" in out
    lrs = {r["step"]: r["lr"] for r in _records(run_dir) if r["kind"] == "train"}
    assert lrs[3] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-4)
    assert json.load(open(run_dir / "config.json"))["lr"] == 1e-4


def test_resume_refuses_token_files_whose_content_changed(tmp_path, capsys):
    """The row order of a token file follows from its content: a resume on files whose tokens
    changed (same path) is refused naming what changed, unless --allow-change data."""
    from seqpar.data.prepare import prepare

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("one document\n\nand another one\n\n" * 200)
    data = str(tmp_path / "tokens")
    prepare([str(text)], data, split_on_blank_lines=True)
    run_dir = tmp_path / "run"
    assert main(_argv(run_dir, 2, "--data", data, "--packing")) == 0
    (text / "b.txt").write_text("a new file of text\n\n" * 100)
    prepare([str(text)], data, split_on_blank_lines=True, overwrite=True)
    capsys.readouterr()
    assert main(_argv(run_dir, 3, "--data", data, "--packing", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "data train_files" in err and "--allow-change" in err, err
    assert main(_argv(run_dir, 3, "--data", data, "--packing", "--resume", "auto", "--allow-change", "data")) == 0


def test_shape_fields_can_never_change_on_resume():
    saved = TrainConfig().to_dict()
    refused, applied = resume_changes(saved, TrainConfig(model=ModelConfig(dim=128, n_heads=4)))
    assert refused == ["dim: 64 -> 128"] and applied == []
    with pytest.raises(ValueError, match="'dim' changes the shapes"):
        resume_changes(saved, TrainConfig(), allow_changes=("dim",))
    with pytest.raises(ValueError, match="'lr' is not a field that needs allowing"):
        resume_changes(saved, TrainConfig(), allow_changes=("lr",))


def test_resume_auto_says_what_it_found(tmp_path, capsys):
    missing = tmp_path / "mistyped"
    assert main(_argv(missing, 1, "--resume", "auto")) == 0
    assert f"run directory {missing} does not exist; starting a new run there at step 0" in capsys.readouterr().out


# --- 4. one job per run directory --------------------------------------------------------------

def test_a_second_job_on_a_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "busy"
    lock = RunDirLock(str(run_dir))
    lock.acquire()
    try:
        assert main(_argv(run_dir, 1)) == 2
        err = capsys.readouterr().err
        assert "is in use by another job" in err and f"pid {os.getpid()}" in err
    finally:
        lock.release()
    assert main(_argv(run_dir, 1)) == 0


def test_a_stale_lock_of_a_dead_job_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    assert main(_argv(run_dir, 1)) == 0
    assert "took over the run-directory lock of a job that is gone (pid 999999 on host gone" in capsys.readouterr().out


_PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "from seqpar.run_dir import exit_with_launcher; import time; exit_with_launcher(poll_s=0.1); "
        "print('watching', flush=True); time.sleep(120)"],
        env=dict(os.environ, SEQPAR_EXIT_WITH_PARENT="1"), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child that nobody reaped yet is a zombie: not running)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_when_their_launcher_dies():
    """Before: killing torchrun's agent left the workers training as orphans. Now a worker
    notices it was re-parented and exits (status 70) within a second or so."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # printed once the child is up and watching
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    if not _alive(child):
        return
    os.kill(child, signal.SIGKILL)
    pytest.fail("the worker outlived its launcher by 10 s")


# --- 5. a timeout on every group ---------------------------------------------------------------

_STOPPED_RANK = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from seqpar.comm.groups import make_data_sequence_groups
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    groups = make_data_sequence_groups(2, timeout_s=3)
    if rank == 1:
        time.sleep(60)  # a rank that stopped
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(4), group=groups.sp)
    except Exception as e:
        print("ERROR after %.1f s: %s" % (time.time() - t0, type(e).__name__), flush=True)
        os._exit(0)
    print("NO ERROR", flush=True)
""")


def test_a_stopped_rank_surfaces_as_an_error_within_the_group_timeout():
    """Before: the sp / dp / usp groups had torch's 30-minute default whatever the world group got.
    Now every group seqpar creates takes ``timeout_s``."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _STOPPED_RANK, str(r), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert out.startswith("ERROR after"), (out, err)
    assert float(out.split()[2]) < 15
