"""Data-parallel training on torch.distributed (gloo, 2 CPU ranks started as torchrun starts them).

One module-scoped spawn runs every 2-rank training case in the same two processes (imports paid once); the
1-process references run here. Plus: the clipping rule at world 1, the sharding, and dead or hung ranks.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import adapter_tensors, write_data
from distkit import case_config, run_ranks, spawn_ranks, train_case

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="spawns gloo ranks (Linux)")

CLIP = 0.3  # below micro-llama's first gradient norms (0.3-0.5): clipping is active
# name -> case: 2 ranks x batch 4 must equal 1 process x batch 8 (see distkit.case_config for the fields).
# Evaluation in 3 batches (valid: 8 samples; one rank runs a filler) and 14 (the retain set), with exact match.
EVAL = dict(eval={"batch_size": 3, "metric": "exact_match"}, retain={"seen": "train.jsonl"})
CASES = {
    "p111-ga1-deferred": dict(periods=[1, 1, 1], grad_accum=1, tier_sync="deferred", max_grad_norm=CLIP, **EVAL),
    "p111-ga2-every": dict(periods=[1, 1, 1], grad_accum=2, tier_sync="every_step", max_grad_norm=CLIP),
    "mean-ga1-every": dict(accumulate="mean", grad_accum=1, tier_sync="every_step", max_grad_norm=CLIP),
    # 6 steps: the period-4 tier ends with 2 gradients pending, summed over ranks by the final flush
    "mean-ga2-deferred": dict(accumulate="mean", grad_accum=2, tier_sync="deferred", max_grad_norm=0, steps=6),
    "sum-ga1-deferred": dict(accumulate="sum", grad_accum=1, tier_sync="deferred", max_grad_norm=0,
                             flat_buffers=False, steps=6),
    "sum-ga2-every": dict(accumulate="sum", grad_accum=2, tier_sync="every_step", max_grad_norm=CLIP),
    "last-ga1-every": dict(accumulate="last", grad_accum=1, tier_sync="every_step", max_grad_norm=CLIP),
    "last-ga2-deferred": dict(accumulate="last", grad_accum=2, tier_sync="deferred", max_grad_norm=0),
    "packed-every": dict(accumulate="mean", tier_sync="every_step", max_grad_norm=CLIP, packing=True),
    # tiers.ema + tiers.consolidate (every 3 of 7 steps) need no communication; eval.max_batches 1 without
    # eval.batch_size caps at one global batch: 8 samples of each set, as one process of batch 8 scores
    "ema-consolidate-capped": dict(accumulate="mean", tier_sync="deferred", max_grad_norm=0, steps=7, ema=0.8,
                                   consolidate={"every": 3, "alpha": 0.5}, retain={"seen": "train.jsonl"},
                                   eval={"max_batches": 1, "metric": "exact_match"}),
}
# Deferred sync with clipping active: equals one process under the same rule (its norm is the global one).
CLIPPED = {"mean-clip-deferred": dict(accumulate="mean", tier_sync="deferred", max_grad_norm=CLIP),
           "last-clip-deferred": dict(accumulate="last", tier_sync="deferred", max_grad_norm=CLIP)}
# distributed.strategy fsdp: the frozen base sharded over the ranks, the adapter synced as under ddp.
FSDP = {"fsdp-mean-ga2-deferred": dict(accumulate="mean", grad_accum=2, tier_sync="deferred", max_grad_norm=CLIP,
                                       strategy="fsdp", eval_every=4, **EVAL),  # an evaluation and `best` mid-run
        "fsdp-chunked-every": dict(tier_sync="every_step", max_grad_norm=CLIP, strategy="fsdp", loss_chunk_tokens=64)}
FSDP_STOP = FSDP["fsdp-mean-ga2-deferred"]
# fsdp from a model folder (tied embeddings): `./model` has the weights in rank 0's folder only, and so has the
# initial adapter `./adapter-mlx` (MLX format).
FSDP_DIR = dict(tier_sync="every_step", max_grad_norm=CLIP, strategy="fsdp", model="./model", steps=4,
                lora={"init_adapter": "./adapter-mlx"})
COUNTED = ("mean-clip-deferred", "last-clip-deferred", "mean-ga1-every")
STOP = "mean-ga2-deferred"  # stopped after step 3 (the period-4 tier holds 3 local gradients), then resumed


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("dist") / "data")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory, micro_checkpoint) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("ranks")
    jobs = [{"kind": "train", "name": name, "out": str(root / name), "case": case, "count": name in COUNTED}
            for name, case in {**CASES, **CLIPPED, **FSDP}.items()]
    jobs += [
        {"kind": "train", "name": "stopped", "out": str(root / "resumed"), "case": CASES[STOP], "stop_at": 3},
        {"kind": "copy", "src": str(root / "resumed"), "dst": str(root / "stopped-copy")},
        {"kind": "train", "name": "resumed", "out": str(root / "resumed"), "case": CASES[STOP], "resume": "auto"},
        {"kind": "train", "name": "fsdp-stopped", "out": str(root / "fsdp"), "case": FSDP_STOP, "stop_at": 3},
        {"kind": "copy", "src": str(root / "fsdp"), "dst": str(root / "fsdp-stopped-copy")},
        {"kind": "train", "name": "fsdp-resumed", "out": str(root / "fsdp"), "case": FSDP_STOP, "resume": "auto"},
        {"kind": "train", "name": "fsdp-dir", "out": str(root / "fsdp-dir"), "case": FSDP_DIR},
        {"kind": "train_error", "name": "fsdp-mismatch", "out": str(root / "fsdp-mismatch"),
         "case": {**FSDP_DIR, "model": "./model-other-config", "lora": {}}},
        {"kind": "train", "name": "fsdp-handed", "out": str(root / "fsdp-handed"), "case": FSDP["fsdp-chunked-every"],
         "handed": True},
    ]
    _model_folders(root, micro_checkpoint)
    spec = {"data": str(data), "jobs": jobs, "cwd": [str(root / "rank0"), str(root / "rank1")]}
    return run_ranks(spec, root / "spec.json"), root


def _model_folders(root: Path, checkpoint: Path) -> None:
    """micro-llama with tied embeddings saved as a model folder in rank0/model; rank1/model lacks its weights.
    rank0/adapter-mlx: ``checkpoint``'s adapter in MLX format (rank 1 has none)."""
    import shutil

    from nested_learning.inference.convert import convert_adapter
    from nested_learning.model.embedded import build_embedded

    convert_adapter(checkpoint, root / "rank0" / "adapter-mlx", "mlx")

    model, tokenizer = build_embedded("embedded:micro-llama", seed=0, tie_word_embeddings=True)
    model.save_pretrained(root / "rank0" / "model")
    tokenizer.save_pretrained(root / "rank0" / "model")
    shutil.copytree(root / "rank0" / "model", root / "rank1" / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    # rank1/model-other-config: a config that disagrees with the weights rank 0 reads (a stale copy on one node)
    shutil.copytree(root / "rank0" / "model", root / "rank0" / "model-other-config")
    shutil.copytree(root / "rank1" / "model", root / "rank1" / "model-other-config")
    config = root / "rank1" / "model-other-config" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "intermediate_size": 40}))


def reference(data, out, case, **kwargs) -> dict:
    return train_case(case_config(data, out, case, batch_size=8), **kwargs)


def assert_same_run(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert [s for s, _ in got["losses"]] == [s for s, _ in want["losses"]]
    for (step, a), (_, b) in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= tol, (step, a, b)
    # evaluation rows (the ranks share the batches): the numbers of one process
    assert [row.keys() for row in got["evals"]] == [row.keys() for row in want["evals"]] and want["evals"]
    for row, ref in zip(got["evals"], want["evals"]):
        for key, value in ref.items():
            assert math.isclose(row[key], value, rel_tol=tol, abs_tol=tol), (key, row[key], value)
    a, b = adapter_tensors(got["last"]), adapter_tensors(want["last"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=tol, rtol=0), (key, (a[key] - b[key]).abs().max())


def test_two_ranks_of_4_equal_one_process_of_8(two_ranks, data, tmp_path, one_thread):
    results, _ = two_ranks
    for name, case in CASES.items():
        assert results[name]["step"] == case.get("steps", 8) and results[name]["status"] == "completed"
        assert_same_run(results[name], reference(data, tmp_path / name, case))


def test_deferred_clipping_uses_the_global_norm_of_what_a_step_applies(two_ranks, data, tmp_path, one_thread):
    results, _ = two_ranks
    for name, case in CLIPPED.items():
        same_rule = reference(data, tmp_path / name, case, sync="deferred")
        assert_same_run(results[name], same_rule)
        # The rule is not one process's per-step clip of every tier (which every_step reproduces).
        per_step = reference(data, tmp_path / f"{name}-1p", case)
        assert max(abs(a - b) for (_, a), (_, b) in zip(results[name]["losses"], per_step["losses"])) > 1e-4


def test_fsdp_shards_the_frozen_base_and_trains_as_one_process(two_ranks, data, tmp_path, one_thread):
    results, _ = two_ranks
    for name, case in FSDP.items():
        got, other = results[name], results["other_ranks"][0][name]
        assert (got["status"], got["step"]) == ("completed", 8)
        one = {**case, "strategy": "ddp"}  # one process ignores the strategy; the same tier-sync rule
        want = reference(data, tmp_path / name, one, sync=case["tier_sync"])
        assert_same_run(got, want)
        # the adapter every rank built is the one a single process starts from, and the ranks stay equal
        assert got["adapter_built"] == other["adapter_built"] == want["adapter_built"]
        assert got["adapter_trained"] == other["adapter_trained"]
        assert got["plan"]["lora_fold"]["on"] is False and "fsdp" in got["plan"]["lora_fold"]["note"]
        for rank in (got, other):
            local, whole, kept = rank["frozen_bytes"]  # `kept`: the head, whole on every rank
            assert 0 < kept < whole / 4
            assert abs((local - kept) - (whole - kept) / 2) <= 0.01 * whole, (local, whole, kept)
        # rank 0 alone read the base (its weights and buffers); rank 1 built a meta skeleton and got its shards
        assert whole <= got["base_bytes_read"] <= 1.01 * whole and other["base_bytes_read"] == 0
    # a base handed to build_run whole on every rank is sharded in place: the same run
    handed = results["fsdp-handed"]
    assert_same_run(handed, results["fsdp-chunked-every"], tol=0)
    assert handed["base_bytes_read"] is None and handed["frozen_bytes"] == results["fsdp-chunked-every"]["frozen_bytes"]
    stopped, resumed = results["fsdp-stopped"], results["fsdp-resumed"]  # the adapter resumes as under ddp
    assert (stopped["status"], stopped["step"], resumed["status"]) == ("stopped", 3, "completed")
    assert_same_run({**resumed, "losses": stopped["losses"] + resumed["losses"]}, results["fsdp-mean-ga2-deferred"],
                    tol=1e-6)
    for name in CASES:  # ddp keeps the whole base on every rank
        assert results[name]["frozen_bytes"][0] == results[name]["frozen_bytes"][1]


def test_one_process_resumes_a_two_rank_fsdp_checkpoint(two_ranks, data, one_thread, tmp_path):
    """The checkpoint of a sharded run is a plain PEFT adapter plus the replicated trainer state: one process
    (same global micro-batch, no sharding) continues it as the uninterrupted one-process run."""
    results, root = two_ranks
    stopped = results["fsdp-stopped"]
    one_case = {**FSDP_STOP, "strategy": "ddp"}
    ref = reference(data, tmp_path / "ref", one_case, sync=FSDP_STOP["tier_sync"])
    one = train_case(case_config(data, root / "fsdp-stopped-copy", one_case, batch_size=8), resume="auto",
                     sync=FSDP_STOP["tier_sync"])
    assert one["status"] == "completed"
    assert_same_run({**one, "losses": stopped["losses"] + one["losses"]}, ref)


def test_fsdp_loads_a_model_folder_on_rank_0_alone(two_ranks, data, tmp_path, one_thread):
    """``./model`` holds the weights in rank 0's folder only: rank 1 never reads them (it could not), yet trains
    as one process does, tied embeddings and an initial adapter in MLX format (in rank 0's folder only) included."""
    results, root = two_ranks
    got, other = results["fsdp-dir"], results["other_ranks"][0]["fsdp-dir"]
    assert not list((root / "rank1" / "model").glob("*.safetensors"))
    assert (got["status"], got["step"]) == ("completed", 4)
    assert not (root / "rank1" / "adapter-mlx").exists()
    want = reference(data, tmp_path / "dir", {**FSDP_DIR, "strategy": "ddp", "model": str(root / "rank0" / "model"),
                                              "lora": {"init_adapter": str(root / "rank0" / "adapter-mlx")}},
                     sync="every_step")
    assert_same_run(got, want)
    assert got["adapter_built"] == other["adapter_built"] == want["adapter_built"]
    assert got["adapter_trained"] == other["adapter_trained"]
    local, whole, kept = other["frozen_bytes"]
    assert abs((local - kept) - (whole - kept) / 2) <= 0.01 * whole and other["base_bytes_read"] == 0
    assert got["base_bytes_read"] >= whole


def test_fsdp_config_disagreeing_with_rank_0s_weights_fails_on_every_rank(two_ranks):
    """A rank whose model config does not match the weights rank 0 read stops before any tensor is sent, naming
    the tensors; rank 0 stops too, with a pointer to it, instead of waiting for the timeout."""
    results, _ = two_ranks
    mine, other = results["fsdp-mismatch"], results["other_ranks"][0]["fsdp-mismatch"]
    assert other["error"].startswith("ModelError: model.name_or_path: the weights of './model-other-config' do not "
                                     "match its config:")
    assert "mlp.gate_proj.base_layer.weight: shape (" in other["error"] and "in the config" in other["error"]
    assert mine["error"].startswith("ModelError: model.name_or_path: on another rank the model config")
    assert max(mine["s"], other["s"]) < 30  # distributed.timeout_s is 60 in these cases


def test_evaluation_batches_are_shared_by_the_ranks():
    """Each batch is scored on one rank exactly once; every rank runs the same number of forwards."""
    from nested_learning.data.records import Sample
    from nested_learning.train.distributed import DistContext
    from nested_learning.train.evaluate import _batches

    samples = [Sample(list(range(1, n + 2)), list(range(1, n + 2))) for n in range(11)]  # row k: k + 1 tokens
    for batch_size, max_batches, world in ((3, None, 2), (3, None, 3), (2, 5, 2), (4, None, 4), (8, None, 3)):
        want = min(-(-11 // batch_size), max_batches or 99)
        per_rank = [list(_batches(samples, 0, batch_size, max_batches, "cpu", DistContext(rank=r, world=world)))
                    for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == -(-want // world)
        # batches told apart by their token counts (all different here)
        scored = sorted(int(b.num_tokens) for rank in per_rank for b, counts in rank if counts)
        whole = sorted(int(b.num_tokens) for b, _ in _batches(samples, 0, batch_size, max_batches, "cpu"))
        assert scored == whole and len(whole) == want


def test_fsdp_refuses_an_explicit_lora_fold(data, tmp_path):
    from conftest import micro_config

    with pytest.raises(ValueError, match=r"speed.lora_fold cannot run with distributed.strategy fsdp"):
        micro_config(data, tmp_path, distributed={"strategy": "fsdp"}, speed={"lora_fold": True})
    assert micro_config(data, tmp_path, distributed={"strategy": "fsdp"}).speed.lora_fold  # the plan turns it off


def test_all_reduces_follow_the_tier_schedule(two_ranks):
    results, _ = two_ranks
    for name in COUNTED:
        res = results[name]
        sizes = res["tiers"]  # tier values: 2048, 896, 1152 (periods 1, 2, 4)
        assert len(set(sizes)) == 3
        floats = [c for c in res["calls"] if c[3] == "torch.float32"]
        for step in range(1, 9):
            if "every" in name:
                want = sizes  # every tier every step
            else:  # a tier of period p: one all-reduce every p steps (its chunk, or its `last` gradient)
                want = [n for n, p in zip(sizes, (1, 2, 4)) if step % p == 0]
            # then one 2-value all-reduce: the step loss and the squared norm of the gradients kept local
            assert [c[1:3] for c in floats if c[0] == step] == [[n, 4 * n] for n in want + [2]], (name, step)
        per_tier = [sum(1 for c in floats if c[1] == n) for n in sizes]
        assert per_tier == ([8, 8, 8] if "every" in name else [8, 4, 2])
        # the final evaluation: one sum over ranks of (loss, tokens, batches)
        evals = [c for c in res["calls"] if c[3] == "torch.float64"]
        assert evals == [[9, 3, 24, "torch.float64"]]
        # nothing else but one host-side stop agreement per step (micro-batches never communicate)
        assert len(res["calls"]) - len(floats) - len(evals) == 8
        assert {c[3] for c in res["calls"]} == {"torch.float32", "torch.int64", "torch.float64"}


def test_stop_and_resume_across_ranks_and_on_one_rank(two_ranks, data, tmp_path, one_thread):
    results, root = two_ranks
    stopped, resumed, whole = results["stopped"], results["resumed"], results[STOP]
    assert (stopped["status"], stopped["step"]) == ("stopped", 3)
    # 2 ranks resume the 2-rank checkpoint: the uninterrupted 2-rank run (accumulators re-summed: rounding only)
    assert resumed["status"] == "completed"
    assert_same_run({**resumed, "losses": stopped["losses"] + resumed["losses"]}, whole, tol=1e-6)
    # 1 rank with the same global micro-batch (8) resumes it: the uninterrupted 1-process run
    ref = reference(data, tmp_path / "ref", CASES[STOP])
    one = train_case(case_config(data, root / "stopped-copy", CASES[STOP], batch_size=8), resume="auto")
    assert_same_run({**one, "losses": stopped["losses"] + one["losses"]}, ref)
    # ... and with another global micro-batch it refuses, saying what to set
    from nested_learning.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim.batch_size=8 to continue it on 1 rank"):
        train_case(case_config(data, root / "stopped-copy", CASES[STOP], batch_size=4), resume="auto")


def test_clipping_rule_at_world_one():
    """Under ``deferred`` a step clips what it applies: the fast tier's gradient and a due slow tier's chunk
    counted per step; a slow tier's gradients in between are kept unclipped; a non-finite one skips the step."""
    from nested_learning.optim.adamw import NestedAdamW
    from nested_learning.train.distributed import DistContext
    from nested_learning.train.grad_sync import GradSync

    for flat in (False, True):
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
        opt = NestedAdamW([{"params": [a], "period": 1}, {"params": [b], "period": 2}], lr=0.1, flat=flat)
        sync = GradSync(DistContext(), opt, "deferred", max_norm=1.0)
        applied = []
        hook = opt.chunk_hook
        opt.chunk_hook = lambda i, sums, s: applied.append(hook(i, sums, s)) or applied[-1]
        torch.manual_seed(0)
        ga1, gb1, ga2, gb2 = torch.randn(3), torch.randn(2, 2), torch.randn(3) * 0.1, torch.randn(2, 2)
        loss = torch.tensor(2.0)

        a.grad, b.grad = ga1.clone(), gb1.clone()
        got_loss, norm = sync.reduce_and_clip(loss, [a, b])
        assert got_loss == 2.0 and torch.isclose(norm, ga1.norm())  # step 1: b is not due, not in the norm
        assert torch.allclose(a.grad, ga1 * min(1, 1 / (ga1.norm() + 1e-6)))
        assert torch.equal(b.grad, gb1)  # kept, unclipped, for the accumulator
        opt.step()
        opt.zero_grad(set_to_none=False)

        a.grad.copy_(ga2)
        b.grad.copy_(gb2)
        _, norm = sync.reduce_and_clip(loss, [a, b])
        want = torch.sqrt(ga2.norm() ** 2 + ((gb1 + gb2) / 2).norm() ** 2)  # the chunk counted per step
        assert torch.isclose(norm, want)
        coef = min(1.0, 1 / (want.item() + 1e-6))
        assert coef < 1  # clipping is active
        opt.step()
        (chunk,) = applied[-1]
        assert torch.allclose(chunk.reshape(2, 2), coef * (gb1 + gb2) / 2)  # mean: what the tier applied

        opt.zero_grad(set_to_none=False)
        a.grad.copy_(ga1)
        b.grad.copy_(torch.full((2, 2), float("nan")))  # local, not due: the norm still reports it
        _, norm = sync.reduce_and_clip(loss, [a, b])
        assert not math.isfinite(norm.item())


def test_sharding_splits_every_global_micro_batch():
    from nested_learning.data.batching import BatchPlan, collate
    from nested_learning.data.records import IGNORE_INDEX, Sample
    from nested_learning.data.sharding import part_bounds, shard_micro_batch

    assert [part_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [part_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(11):
        n = int(torch.randint(3, 20, (1,), generator=gen))
        ids = torch.randint(5, 50, (n,), generator=gen).tolist()
        samples.append(Sample(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    for packing in (False, True):
        plan = BatchPlan(samples, 6, seed=0, packing=packing, max_length=24)
        for world in (2, 3, 4):
            for indices in plan.epoch(0):
                members = [samples[i] for i in indices]
                whole = collate(members, 0, packing=packing, max_length=24)
                parts = [shard_micro_batch(members, plan, 0, r, world) for r in range(world)]
                for p in parts:  # every rank is told the global counts
                    assert (p.num_tokens, p.num_loss_tokens) == (whole.num_tokens, whole.num_loss_tokens)
                local = [int((p.labels[:, 1:] != IGNORE_INDEX).sum()) for p in parts]
                assert sum(local) == whole.num_loss_tokens  # the parts hold the batch's loss tokens once
                assert sum(int((p.input_ids != 0).sum()) for p, n in zip(parts, local) if n) == whole.num_tokens


def _train_yaml(data: Path, out: Path, timeout_s: int) -> Path:
    cfg = case_config(data, out, dict(steps=5000, tier_sync="deferred"), batch_size=2)
    cfg.distributed.timeout_s = timeout_s
    cfg.output.log_every = 1
    path = out.parent / f"{out.name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def _wait_for_rows(out: Path, rows: int, procs, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= rows:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank ended early:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.2)
    raise AssertionError("no training step within the time limit")


def _rank_pid(root: int, rank: int) -> int:
    """The descendant of ``root`` that runs rank ``rank`` (torchrun's worker)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if pid != root and f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return pid
        todo += [int(c) for c in children]
    raise AssertionError(f"no rank {rank} under pid {root}")


def test_killed_rank_ends_a_torchrun_job(data, tmp_path):
    """``train --nproc 2`` runs torchrun; SIGKILL one rank mid-run and the whole job ends, naming it."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nested_learning", "train", str(_train_yaml(data, out, 60)),
                             "--nproc", "2", "--quiet"], cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait_for_rows(out, 2, [proc])
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        start = time.monotonic()
        text = proc.communicate(timeout=60)[0]
        assert time.monotonic() - start < 30
        assert proc.returncode != 0
        # torchrun's failure summary names the killed rank and its signal
        assert re.search(r"rank\s*:\s*1\b", text) and "SIGKILL" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_hung_rank_times_out_with_an_error_on_the_others(data, tmp_path):
    """A rank that stops answering (no launcher to notice): the others fail with an error naming the timeout."""
    out = tmp_path / "run"
    procs = spawn_ranks(["-m", "nested_learning", "train", str(_train_yaml(data, out, 5)), "--quiet"])
    try:
        _wait_for_rows(out, 2, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        start = time.monotonic()
        text = procs[0].communicate(timeout=60)[0]
        assert time.monotonic() - start < 5 + 20
        assert procs[0].returncode == 1
        assert "error: rank 0 of 2:" in text and "distributed.timeout_s=5s" in text, text[-3000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_launch_and_device_errors_name_the_field(data, tmp_path, capsys):
    from nested_learning.cli import main
    from nested_learning.config import ConfigError
    from nested_learning.train.distributed import DistContext
    from nested_learning.train.setup import build_run

    cfg = case_config(data, tmp_path / "run", {}, batch_size=4)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["train", str(path), "--nproc", "0"]) == 2
    assert "--nproc: expected a number of processes >= 1" in capsys.readouterr().err
    cfg.model.device = "cuda:0"
    with pytest.raises(ConfigError, match="model.device: 'cuda:0' puts every rank on one GPU"):
        build_run(cfg, dist=DistContext(rank=1, world=2))
    assert not (tmp_path / "run").exists()
