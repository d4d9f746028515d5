"""Training: the tiny preset learns, checkpoints resume with another sequence-parallel size
(and another data-parallel size) on exactly the uninterrupted trajectory, the run dir holds
logs and the plot, and the command line (including the fake-process-group dry run) works.

Resume tolerance: runs are float64, so a resumed run at another SP size follows the
uninterrupted one to rounding: losses within 1e-9, parameters within 1e-8 absolute.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from seqpar.comm.groups import SequenceParallelGroups, make_device_mesh
from seqpar.config import FIELD_HELP, ModelConfig, SequenceParallelConfig, TrainConfig, preset
from seqpar.train import (BREAKDOWN_FIELDS, RunDirectoryError, build_parser, config_from_args, cpu_threads_per_rank,
                          main, program_name, train, world_error)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESUME_LOSS_TOL = 1e-9
RESUME_PARAM_TOL = 1e-8
# On CPU the measured parts of the step (the layers' mixing, the trainer's collectives) are
# disjoint sub-intervals of it on one thread: their sum is at most the step time, up to rounding.
BREAKDOWN_TOL_S = 1e-6


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
        groups = make_device_mesh(sp_size, "cpu", group=ctx.group)
    else:  # groups made by hand: train() builds their mesh
        groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    result = train(_cfg(run_dir, sp_size, **kw), groups, return_model=True)
    params = {n: _full(p).detach().clone() for n, p in result.model.named_parameters()}
    return {"history": result.history, "params": params, "plot": result.plot_path, "ckpt": result.checkpoint}


def _full(p: torch.Tensor) -> torch.Tensor:
    """An FSDP2 parameter's full value (collective over its mesh), or a plain tensor."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _train_losses(history):
    return {h["step"]: h["loss"] for h in history if h["kind"] == "train"}


def _check_breakdown(records, comm: bool):
    """Every train record splits its step time: the fields exist and are >= 0, the measured ones
    sum to no more than the step time, the rest is what they leave; both kinds of layer were
    timed, and the trainer's collectives when there are any."""
    train = [r for r in records if r["kind"] == "train"]
    assert train
    for r in train:
        parts = [r[f] for f in BREAKDOWN_FIELDS]
        assert all(isinstance(x, float) and x >= 0 for x in parts), r
        measured = r["softmax_attention_s"] + r["linear_attention_s"] + r["comm_s"]
        assert measured <= r["step_time_s"] + BREAKDOWN_TOL_S, r
        assert abs(sum(parts) - r["step_time_s"]) <= BREAKDOWN_TOL_S, r
        assert r["softmax_attention_s"] > 0 and r["linear_attention_s"] > 0, r
        assert (r["comm_s"] > 0) == comm, r


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


@pytest.mark.parametrize("dp,sp", [(1, 1), (1, 2), (2, 2), (1, 4)])
def test_one_sharded_step_equals_the_unsharded_model(pool, tmp_path, dp, sp):
    """FSDP2 over the dp x sp ranks: after two steps (so AdamW's state and the clipped global
    norm take part) on packed-free stdlib bytes, the losses, gradient norms and every parameter
    equal those of the model trained in one process without torch.distributed (fp64, 1e-9 /
    1e-8). dp x sp = 1 x 1 runs FSDP2 over one rank."""
    kw = dict(steps=2, keep_checkpoints=0, plot=False, eval_batches=1, batch_size=4)
    torch.set_num_threads(1)
    ref = train(_cfg(str(tmp_path / "ref"), 1, **kw), return_model=True)
    ref_params = {n: p.detach() for n, p in ref.model.named_parameters()}
    out = pool.run(case_train, dp * sp, run_dir=str(tmp_path / "sharded"), sp_size=sp, dp=dp, **kw)
    for rank_out in out:
        for rec_ref, rec in zip(ref.history, rank_out["history"]):
            if rec["kind"] == "train":
                assert abs(rec["loss"] - rec_ref["loss"]) < RESUME_LOSS_TOL, (rec, rec_ref)
                assert abs(rec["grad_norm"] - rec_ref["grad_norm"]) < RESUME_LOSS_TOL, (rec, rec_ref)
        for name, p in rank_out["params"].items():
            err = float((p - ref_params[name]).abs().max())
            assert err < RESUME_PARAM_TOL, (dp, sp, name, err)


def case_mixed_precision(ctx):
    """apply_fsdp(mixed_precision=True) on 2 ranks: dtypes seen inside a layer, and of the grads."""
    from seqpar.model import HybridLM
    from seqpar.parallelize import apply_fsdp, parallelize_model, shard_batch

    torch.set_num_threads(1)
    groups = make_device_mesh(ctx.world_size, "cpu", group=ctx.group)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS")
    torch.manual_seed(0)
    model = HybridLM(cfg)
    parallelize_model(model, SequenceParallelConfig(sp_size=ctx.world_size, backend="torch"), groups.sp)
    apply_fsdp(model, groups.shard_mesh, mixed_precision=True, min_unit_params=0)
    seen = {}
    model.layers[0].feed_forward.w1.register_forward_hook(
        lambda m, args, out: seen.update(weight=m.weight.dtype, out=out.dtype))
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    sb = shard_batch(tokens, tokens, "contiguous", groups.sp)
    model(sb.tokens, sb.positions).float().square().mean().backward()
    return {"weight": str(seen["weight"]), "out": str(seen["out"]),
            "grad": {str(p.grad.dtype) for p in model.parameters()},
            "param": {str(p.dtype) for p in model.parameters()}}


def case_layer_units(ctx):
    """One fp64 step with every decoder layer an FSDP2 unit of its own (min_unit_params=0), over
    sp = world: the largest gradient error against the unsharded model, computed on each rank."""
    from torch.distributed.fsdp import FSDPModule

    from seqpar.model import HybridLM
    from seqpar.parallelize import apply_fsdp, parallelize_model, shard_batch, token_loss_sum

    torch.set_num_threads(1)
    groups = make_device_mesh(ctx.world_size, "cpu", group=ctx.group)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, pattern="LDS", linear_decay="gate",
                      gate_rank=8)
    ref = HybridLM(cfg).double()
    ref.reset_parameters(seed=5)
    model = HybridLM(cfg).double()
    model.load_state_dict(ref.state_dict())
    parallelize_model(model, SequenceParallelConfig(sp_size=ctx.world_size, layout="zigzag"), groups.sp)
    apply_fsdp(model, groups.shard_mesh, min_unit_params=0)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    sb = shard_batch(x, y, "zigzag", groups.sp)
    (token_loss_sum(model(sb.tokens, sb.positions), sb.labels) / y.numel()).backward()
    (token_loss_sum(ref(x), y) / y.numel()).backward()
    err = max(float((p.grad.full_tensor() - r.grad).abs().max()) for p, r in zip(model.parameters(), ref.parameters()))
    return {"units": units, "err": err}


def test_fsdp_with_a_unit_per_layer_equals_the_unsharded_gradients(pool):
    """Large models get one FSDP2 unit per decoder layer (the tiny trainer models fold into the
    root): the per-layer gathers and reduce-scatters give the unsharded model's gradients
    (fp64, 1e-12) at sp = 2 and 4."""
    for world in (2, 4):
        for out in pool.run(case_layer_units, world):
            assert out["units"] == 4, out  # 3 layers + the root
            assert out["err"] < 1e-12, (world, out)


def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_fp32_masters(pool):
    """The GPU policy, checked on CPU: layers run on bf16 parameters, while the sharded master
    parameters and their (fp32-reduced) gradients stay fp32."""
    for out in pool.run(case_mixed_precision, 2):
        assert out["weight"] == "torch.bfloat16" and out["out"] == "torch.bfloat16", out
        assert out["param"] == {"torch.float32"} and out["grad"] == {"torch.float32"}, out


def test_compiled_layers_train_like_eager(pool, tmp_path):
    """--compile (each decoder layer through torch.compile, inductor when a C++ compiler exists)
    at sp=2 under FSDP2: the losses and parameters of two steps equal the eager run's (fp32:
    1e-5 relative on the losses; 1e-4 absolute on the parameters, as AdamW's normalised update
    turns fp32 rounding of near-zero gradient entries into steps of up to lr = 3e-3 times their
    relative change; a wrong gradient moves parameters by ~lr)."""
    kw = dict(steps=2, keep_checkpoints=0, plot=False, eval_batches=1, dtype="float32")
    eager = pool.run(case_train, 2, run_dir=str(tmp_path / "eager"), sp_size=2, **kw)[0]
    compiled = pool.run(case_train, 2, run_dir=str(tmp_path / "compiled"), sp_size=2, compile=True, **kw)[0]
    a, b = _train_losses(eager["history"]), _train_losses(compiled["history"])
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    for name, p in eager["params"].items():
        assert float((p - compiled["params"][name]).abs().max()) < 1e-4, name


def _packed_documents(tmp_path) -> str:
    """A byte-level token directory of many short documents (this repo's docs, by paragraph)."""
    from seqpar.data.prepare import prepare

    out = str(tmp_path / "tokens")
    prepare([os.path.join(ROOT, "docs", "masks.md"), os.path.join(ROOT, "docs", "linear.md")], out,
            split_on_blank_lines=True, val_fraction=0.1)
    return out


@pytest.mark.parametrize("dp,sp,layout", [(1, 2, "zigzag"), (2, 2, "contiguous")])
def test_packed_token_file_training_equals_one_process(pool, tmp_path, dp, sp, layout):
    """--data TOKEN_DIR --packing: rows of whole documents with cu_seqlens (documents are cut at
    rank boundaries and at the ends of rows); two sharded steps equal one process's (fp64),
    whatever the layout, and a held-out evaluation runs."""
    data = _packed_documents(tmp_path)
    kw = dict(steps=2, keep_checkpoints=0, plot=False, eval_batches=1, batch_size=4, seq_len=64, data=data,
              packing=True, sp=dict(sp_size=sp, layout=layout, softmax_strategy="ring", linear_strategy="lasp2"),
              model=dict(dim=32, n_heads=4, n_kv_heads=2, linear_decay="gate", gate_rank=8, vocab_size=257))
    torch.set_num_threads(1)
    one = dict(kw, sp=dict(kw["sp"], sp_size=1))
    ref = train(_cfg(str(tmp_path / "ref"), 1, **one), return_model=True)
    ref_params = {n: p.detach() for n, p in ref.model.named_parameters()}
    assert ref.final_val_loss is not None
    out = pool.run(case_train, dp * sp, run_dir=str(tmp_path / "sharded"), sp_size=sp, dp=dp, **kw)
    for rank_out in out:
        losses, ref_losses = _train_losses(rank_out["history"]), _train_losses(ref.history)
        assert losses.keys() == ref_losses.keys() == {1, 2}
        for step in losses:
            assert abs(losses[step] - ref_losses[step]) < RESUME_LOSS_TOL, (step, losses[step], ref_losses[step])
        for name, p in rank_out["params"].items():
            assert float((p - ref_params[name]).abs().max()) < RESUME_PARAM_TOL, name


def test_resume_with_other_sequence_parallel_size(pool, tmp_path):
    """Trained at sp=2 with a sharded (DCP) checkpoint at step 3; resumed at sp=4, sp=1 and
    dp=2 x sp=2 (DCP reshards it), the steps 4..6 and the final parameters equal those of the
    uninterrupted sp=2 run."""
    full = str(tmp_path / "full")
    ref = pool.run(case_train, 2, run_dir=full, sp_size=2, checkpoint_interval=3)[0]
    ckpt3 = os.path.join(full, "checkpoints", "step_00000003")
    assert os.path.isdir(ckpt3) and os.path.isdir(ref["ckpt"])
    assert sorted(f for f in os.listdir(ckpt3) if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # run dir contents: logs (JSONL + text), config, plot
    for name in ("train.jsonl", "train.log", "config.json", "loss.png"):
        assert os.path.getsize(os.path.join(full, name)) > 0, name
    records = [json.loads(line) for line in open(os.path.join(full, "train.jsonl"))]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert any(r["kind"] == "eval" for r in records)
    _check_breakdown(records, comm=True)
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


def test_window_and_softcap_flags(tmp_path, capsys):
    """--window / --softcap reach the softmax layers (the run trains), and the run's config.json
    and train.log record them; a resume with another window is refused unless allowed."""
    from seqpar.config import resume_changes

    args = build_parser().parse_args(["--window", "8", "--softcap", "30"])
    cfg = config_from_args(args)
    assert (cfg.model.window, cfg.model.softcap) == (8, 30.0)
    assert config_from_args(build_parser().parse_args([])).model.window is None
    run_dir = tmp_path / "window"
    main(["--steps", "2", "--seq-len", "32", "--batch-size", "2", "--run-dir", str(run_dir), "--window", "8",
          "--softcap", "30", "--no-progress", "--no-plot", "--max-corpus-bytes", "200000", "--eval-batches", "1",
          "--keep-checkpoints", "0"])
    assert "final train loss" in capsys.readouterr().out
    saved = json.load(open(run_dir / "config.json"))
    assert (saved["model"]["window"], saved["model"]["softcap"]) == (8, 30.0)
    assert TrainConfig.from_dict(saved).model.window == 8
    assert "window=8 softcap=30.0" in open(run_dir / "train.log").read()
    losses = [r["loss"] for r in map(json.loads, open(run_dir / "train.jsonl")) if r["kind"] == "train"]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    wider = TrainConfig.from_dict({**saved, "model": {**saved["model"], "window": 16}})
    assert resume_changes(saved, wider) == (["window: 8 -> 16"], [])
    assert resume_changes(saved, wider, allow_changes=("window",)) == ([], ["window: 8 -> 16"])
    with pytest.raises(SystemExit):  # argparse: window takes an int
        build_parser().parse_args(["--window", "eight"])
    with pytest.raises(ValueError, match="window must be >= 1"):
        config_from_args(build_parser().parse_args(["--window", "0"]))


def test_step_time_breakdown_in_the_log_and_on_the_console(tmp_path, capsys):
    """One process: each train record (every --log-interval steps, means over them) says where the
    step time went, and the console shows it as a line; --profile-every adds a profile record and
    a Chrome trace of the sampled step."""
    run_dir = tmp_path / "breakdown"
    assert main(["--steps", "6", "--seq-len", "32", "--batch-size", "2", "--run-dir", str(run_dir),
                 "--max-corpus-bytes", "200000", "--eval-batches", "1", "--no-plot", "--keep-checkpoints", "0",
                 "--log-interval", "2", "--profile-every", "3", "--eval-interval", "2"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in open(run_dir / "train.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    _check_breakdown(records, comm=False)
    for r in records:
        if r["kind"] == "train":
            assert abs(r["tokens_per_s"] * r["step_time_s"] - 2 * 32) < 1e-6 and r["cpu_time_s"] > 0
    lines = [line for line in out.splitlines() if line.startswith("time/step ")]
    assert len(lines) == 3 and lines[-1].startswith("time/step ") and "(steps 5-6)" in lines[-1], out
    assert all(re.search(r"softmax attention [\d.]+ ms \(\d+%\), linear attention [\d.]+ ms \(\d+%\), "
                         r"comm [\d.]+ ms \(\d+%\), rest [\d.]+ ms \(\d+%\); process CPU time [\d.]+ ms$", line) for line in lines), lines
    profiles = [r for r in records if r["kind"] == "profile"]
    assert [r["step"] for r in profiles] == [3, 6]
    for r in profiles:
        assert r["collective_s"] == 0.0 and r["collectives"] == {}  # one process: no collective
        assert os.path.getsize(run_dir / r["trace"]) > 0
    assert "profile of step 3" in out


def case_profiled_steps(ctx, run_dir: str):
    torch.set_num_threads(1)
    groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    result = train(_cfg(run_dir, ctx.world_size, steps=2, profile_every=2, plot=False, keep_checkpoints=0), groups)
    return result.history


def test_sampled_profile_shows_the_collectives(pool, tmp_path):
    """sp=2: the profiled step lists gloo's collectives (FSDP2's gathers and reductions, the
    loss all-reduce, the strategies' exchanges) and each rank writes its trace."""
    run_dir = tmp_path / "profiled"
    history = pool.run(case_profiled_steps, 2, run_dir=str(run_dir))[0]
    _check_breakdown(history, comm=True)
    (prof,) = [h for h in history if h["kind"] == "profile"]
    assert prof["step"] == 2 and 0 < prof["collective_s"]
    ops = prof["collectives"]
    # FSDP2's parameter all-gather (the tiny model is one unit) and LASP-2's state gathers
    assert ops["gloo:all_gather"]["count"] >= 2, ops
    # the loss sum, the gradient reduce-scatters (all-reduces on gloo) and the global grad norm
    assert ops["gloo:all_reduce"]["count"] >= 2, ops
    assert ops["gloo:send"]["count"] > 0 and ops["gloo:recv"]["count"] > 0, ops  # the softmax ring
    for rank in (0, 1):
        assert (run_dir / "profiles" / f"step_00000002.rank{rank}.json").stat().st_size > 0


def test_fake_process_group_dry_run(tmp_path):
    """One real rank of an 8-rank job (dp=2 x sp=4) on the fake backend reports what a dry run is
    for (memory, step time, bytes from the cost model, the longest sequence that fits) and hides
    the meaningless loss; off a terminal its progress is plain lines, never carriage returns."""
    run_dir = tmp_path / "fake"
    cmd = [sys.executable, "-m", "seqpar.train", "--fake-world-size", "8", "--fake-rank", "0", "--sp", "4",
           "--preset", "tiny", "--seq-len", "256", "--batch-size", "2", "--steps", "3",
           "--max-corpus-bytes", "200000", "--run-dir", str(run_dir), "--fake-memory-gib", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "world 8 (fake) = dp 2 x sp 4" in out
    assert "dry run: rank 0 of 8 (dp 2 x sp 4" in out and "this rank holds 64 tokens" in out
    for what in ("peak memory of this rank:", "step time:", "bytes this rank sends per step (cost model",
                 "longest sequence that fits in 16.0 GiB"):
        assert what in out, (what, out)
    fits = int(re.search(r"about ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert fits > 256 and fits % 4 == 0, out
    assert "final train loss" not in out and "loss=" not in out
    assert [line for line in out.splitlines() if line.startswith("step ")] == [
        line for line in out.splitlines() if re.fullmatch(r"step [123]/3 step_s=\S+ peak_mib=\S+", line)]
    assert "step 3/3" in out and "\r" not in out + proc.stderr
    records = [json.loads(line) for line in open(run_dir / "train.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss" not in r and "grad_norm" not in r for r in records)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "loss.png").exists()


# ---------------------------------------------------------------------------------------------
# The command line a newcomer meets.


def _help(argv, capsys, prog="seqpar-train") -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--help"], prog=prog)
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_help_has_one_line_per_flag_with_choices_and_the_real_defaults(capsys):
    names = {f.name for cls in (ModelConfig, SequenceParallelConfig, TrainConfig) for f in dataclasses.fields(cls)}
    assert set(FIELD_HELP) == names - {"model", "sp"}
    out = _help(["--preset", "small"], capsys)
    flat = re.sub(r"-\s+", "-", " ".join(out.split()))  # argparse wraps lines after hyphens too
    assert out.startswith("usage: seqpar-train ")
    assert "(default: None)" not in out and "preset /" not in out
    for name in FIELD_HELP:
        assert re.search(rf"--{name.replace('_', '-')}\b", out), name
        assert FIELD_HELP[name] in flat, name
    # the chosen preset's values, not the dataclass defaults
    assert "--seq-len N tokens per sequence (global, before it is split over the sp ranks) (default: 1024)" in flat
    assert "--steps N optimizer steps in all (a resumed run continues up to this step) (default: 500)" in flat
    for choices in ("{contiguous,zigzag,striped}", "{fixed,gate,gla,none}", "{ring,allgather,ulysses,usp}",
                    "{lasp2,lasp1}", "{auto,torch,triton,sdpa}"):
        assert choices in out, choices
    assert "--data PATH" in flat and "the path of a token file / directory" in flat  # a path, not a choice
    # flags given before --help are the defaults shown
    assert "(default: 7)" in " ".join(_help(["--steps", "7"], capsys).split())


def test_example_help_shows_the_example_defaults_and_its_own_name():
    proc = subprocess.run([sys.executable, "examples/train_hybrid.py", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    assert proc.stdout.startswith("usage: examples/train_hybrid.py ")
    assert "(default: 60)" in flat and "(default: LLLS)" in flat and "(default: runs/train_hybrid)" in flat


def test_program_name():
    assert program_name("/venv/bin/seqpar-train") == "seqpar-train"
    assert program_name("/src/seqpar/seqpar/train.py") == "python -m seqpar.train"
    assert program_name("examples/train_hybrid.py") == "examples/train_hybrid.py"


def test_sequence_parallel_size_against_the_process_count(monkeypatch, capsys):
    """--sp that the processes cannot provide is a usage error that says what to do, checked
    before the config (so --sp 3 on 2 processes does not report a seq_len divisibility)."""
    assert world_error(2, 2, "x", False) is None and world_error(2, 4, "x", False) is None
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = [(None, ["--sp", "2"], "torchrun --nproc-per-node 2 -m seqpar.train --sp 2"),
             ("2", ["--sp", "3", "--layout", "zigzag"], "--sp 3 is larger than the number of processes (2)"),
             ("4", ["--sp", "3"], "use --sp in [1, 2, 4]"),
             (None, ["--dim", "30"], "dim 30 is not divisible by n_heads 4"),
             (None, ["--sp", "2", "--fake-world-size", "2", "--fake-rank", "2"], "--fake-rank 2 is outside 0..1"),
             (None, ["--resume", "auto", "--overwrite"], "choose one"),
             (None, ["--fake-world-size", "-8"], "--fake-world-size must be >= 0"),
             (None, ["--fake-world-size", "8", "--fake-memory-gib", "0"], "--fake-memory-gib must be > 0")]
    for world, argv, message in cases:
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(SystemExit) as stop:
            main(argv, prog="seqpar-train")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_example_without_torchrun_says_how_to_start_it():
    proc = subprocess.run([sys.executable, "examples/train_hybrid.py", "--sp", "2"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert proc.returncode == 2
    assert "torchrun --nproc-per-node 2 examples/train_hybrid.py --sp 2" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_directory_is_never_reused_by_accident(tmp_path, capsys):
    """A second run into the same directory is refused with a hint; --overwrite starts afresh
    (one run's records, not two mixed); --resume continues without duplicating records."""
    run_dir = tmp_path / "twice"
    argv = ["--steps", "2", "--seq-len", "32", "--batch-size", "2", "--run-dir", str(run_dir), "--no-progress",
            "--max-corpus-bytes", "200000", "--eval-batches", "1", "--no-plot"]
    assert main(argv) == 0
    before = (run_dir / "train.jsonl").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert (run_dir / "train.jsonl").read_text() == before
    assert main(argv + ["--overwrite", "--seed", "1"]) == 0
    records = [json.loads(line) for line in open(run_dir / "train.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert (run_dir / "train.jsonl").read_text() != before
    assert main(argv[:1] + ["3"] + argv[2:] + ["--seed", "1", "--resume", "auto"]) == 0
    records = [json.loads(line) for line in open(run_dir / "train.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def case_refuse_run_dir(ctx, run_dir: str):
    """train() into a directory that holds a run: every rank must raise, none may hang."""
    groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    try:
        train(_cfg(run_dir, ctx.world_size), groups)
    except RunDirectoryError as e:
        return str(e)
    return None


def test_run_directory_refusal_reaches_every_rank(pool, tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "train.jsonl").write_text("{}\n")
    messages = pool.run(case_refuse_run_dir, 2, run_dir=str(run_dir))
    assert all(m is not None and "already holds a run (train.jsonl)" in m for m in messages), messages


def test_cpu_threads_per_rank():
    tiny, small = preset("tiny"), preset("small")
    assert cpu_threads_per_rank(tiny, world=1, local_ranks=1, cpus=8) == 1  # too small to split
    assert cpu_threads_per_rank(small, world=1, local_ranks=1, cpus=8) == 8
    assert cpu_threads_per_rank(small, world=4, local_ranks=4, cpus=8) == 2
    assert cpu_threads_per_rank(small, world=4, local_ranks=4, cpus=2) == 1
