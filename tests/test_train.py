"""Training: the tiny preset learns, checkpoints resume with another sequence-parallel size
(and another data-parallel size) on exactly the uninterrupted trajectory, the run dir holds
logs and the plot, and the command line (including the fake-process-group dry run) works.

Resume tolerance: runs are float64, so a resumed run at another SP size follows the
uninterrupted one to rounding: losses within 1e-9, parameters within 1e-8 absolute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from seqpar.comm.groups import SequenceParallelGroups, make_data_sequence_groups
from seqpar.config import preset
from seqpar.train import build_parser, config_from_args, main, train

RESUME_LOSS_TOL = 1e-9
RESUME_PARAM_TOL = 1e-8


def _cfg(run_dir: str, sp_size: int, **kw):
    base = dict(run_dir=run_dir, seq_len=32, batch_size=2, steps=6, warmup_steps=2, dtype="float64",
                max_corpus_bytes=200_000, progress=False, eval_batches=1, keep_checkpoints=10,
                sp=dict(sp_size=sp_size, layout="zigzag", softmax_strategy="ring", linear_strategy="lasp2"),
                model=dict(dim=32, n_heads=4, n_kv_heads=2, linear_decay="gate", gate_rank=8))
    base.update(kw)
    return preset("tiny", **base)


def case_train(ctx, run_dir: str, sp_size: int, dp: int = 1, **kw):
    """Train on the pool's ranks; returns the history and the final parameters."""
    torch.set_num_threads(1)
    if dp > 1:
        groups = make_data_sequence_groups(sp_size)
    else:
        groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    result = train(_cfg(run_dir, sp_size, **kw), groups, return_model=True)
    params = {n: p.detach().clone() for n, p in result.model.named_parameters()}
    return {"history": result.history, "params": params, "plot": result.plot_path, "ckpt": result.checkpoint}


def _train_losses(history):
    return {h["step"]: h["loss"] for h in history if h["kind"] == "train"}


def test_tiny_preset_learns(tmp_path):
    """A few dozen steps of the tiny preset (one process, stdlib bytes) lower the loss a lot."""
    torch.set_num_threads(1)
    cfg = preset("tiny", run_dir=str(tmp_path / "learn"), steps=30, seq_len=64, batch_size=4, lr=5e-3,
                 max_corpus_bytes=300_000, progress=False, eval_batches=1, plot=False, keep_checkpoints=0)
    result = train(cfg)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert len(losses) == 30
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 5.0, first  # about log(256) = 5.55 at initialisation
    assert last < first - 1.5, (first, last)
    assert result.final_val_loss is not None and result.final_val_loss < first - 1.0


def test_resume_with_other_sequence_parallel_size(pool, tmp_path):
    """Trained at sp=2 with a checkpoint at step 3; resumed at sp=4, sp=1 and dp=2 x sp=2, the
    steps 4..6 and the final parameters equal those of the uninterrupted sp=2 run."""
    full = str(tmp_path / "full")
    ref = pool.run(case_train, 2, run_dir=full, sp_size=2, checkpoint_interval=3)[0]
    ckpt3 = os.path.join(full, "checkpoints", "step_00000003.pt")
    assert os.path.isfile(ckpt3) and os.path.isfile(ref["ckpt"])
    # run dir contents: logs (JSONL + text), config, plot
    for name in ("train.jsonl", "train.log", "config.json", "loss.png"):
        assert os.path.getsize(os.path.join(full, name)) > 0, name
    records = [json.loads(line) for line in open(os.path.join(full, "train.jsonl"))]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert any(r["kind"] == "eval" for r in records)
    assert "final train loss" in open(os.path.join(full, "train.log")).read()
    ref_losses = _train_losses(ref["history"])

    for world, sp, dp in ((4, 4, 1), (1, 1, 1), (4, 2, 2)):
        out = pool.run(case_train, world, run_dir=str(tmp_path / f"resume_sp{sp}_dp{dp}"), sp_size=sp, dp=dp,
                       resume=ckpt3, plot=False)
        for rank_out in out:
            losses = _train_losses(rank_out["history"])
            assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # the history travels with the checkpoint
            for step in (4, 5, 6):
                assert abs(losses[step] - ref_losses[step]) < RESUME_LOSS_TOL, (sp, dp, step, losses[step], ref_losses[step])
            for name, p in rank_out["params"].items():
                err = float((p - ref["params"][name]).abs().max())
                assert err < RESUME_PARAM_TOL, (sp, dp, name, err)


def test_command_line(tmp_path, capsys):
    """Flags override the preset; ``main`` trains, prints the final loss and where things went."""
    args = build_parser().parse_args(["--preset", "tiny", "--sp", "2", "--layout", "zigzag", "--linear-strategy", "lasp1",
                                      "--pattern", "LLS", "--no-tie-embeddings", "--steps", "3"])
    cfg = config_from_args(args)
    assert (cfg.sp.sp_size, cfg.sp.layout, cfg.sp.linear_strategy, cfg.model.pattern, cfg.model.tie_embeddings,
            cfg.steps) == (2, "zigzag", "lasp1", "LLS", False, 3)
    run_dir = tmp_path / "cli"
    main(["--preset", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--run-dir", str(run_dir),
          "--no-progress", "--max-corpus-bytes", "200000", "--eval-batches", "1"])
    out = capsys.readouterr().out
    assert "final train loss" in out and str(run_dir / "loss.png") in out
    # resume from the run dir's latest checkpoint and go on to step 3
    main(["--config", str(run_dir / "config.json"), "--steps", "3", "--resume", "auto", "--no-progress"])
    records = [json.loads(line) for line in open(run_dir / "train.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_fake_process_group_dry_run(tmp_path):
    """One real rank of an 8-rank job (dp=2 x sp=4) on the fake backend runs and reports memory."""
    cmd = [sys.executable, "-m", "seqpar.train", "--fake-world-size", "8", "--fake-rank", "5", "--sp", "4",
           "--preset", "tiny", "--seq-len", "256", "--batch-size", "2", "--steps", "2", "--no-progress",
           "--max-corpus-bytes", "200000", "--run-dir", str(tmp_path / "fake"), "--eval-batches", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 8 (fake) = dp 2 x sp 4" in proc.stdout
    assert "peak memory/rank" in proc.stdout
