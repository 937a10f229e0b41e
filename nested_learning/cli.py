"""``nested-learning``: train, eval, generate, merge, demo, convert-adapter, import-run (and ``serve``).

Every subcommand reports a bad input as one ``error: ...`` line naming the field, file or line, exit code 2;
a training failure (non-finite loss) exits 1. What a run prints (trainer callbacks) and how it hears a stop:
``cli_output.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from nested_learning.cli_output import StopSignals, progress_callback, setup_logging

log = logging.getLogger("nested_learning")


# ------------------------------------------------------------------------------------------------ commands
def _help_config() -> str:
    from nested_learning.config import TrainConfig

    lines = []

    def walk(model_cls, prefix: str) -> None:
        for name, f in model_cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
                continue
            default = f.get_default(call_default_factory=True)
            lines.append(f"{prefix}{name} = {json.dumps(default, default=str)}\n    {f.description or ''}")

    walk(TrainConfig, "")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from nested_learning.config import ConfigError, load_config
    from nested_learning.train.loop import run_training

    if args.help_config:
        print(_help_config())
        return 0
    overrides = list(args.set or [])
    if args.backend:
        overrides.append(f"backend={args.backend}")
    if args.out:
        overrides.append(f"output.dir={args.out}")
    if args.sweep:
        return _sweep(args, overrides)
    cfg = load_config(args.config, overrides)
    if args.nproc is not None:
        return _launch_torchrun(args, cfg)
    from nested_learning.train import distributed

    # Under torchrun: join the process group; rank 0 alone reports (the others log warnings and errors only).
    ctx = distributed.init_from_env(cfg.distributed.timeout_s, cfg.model.device)
    if ctx.active and cfg.backend != "torch":
        raise ConfigError(f"backend: data-parallel training (torchrun) needs backend torch, not {cfg.backend}")
    console = setup_logging(args.quiet)
    if not ctx.is_main:
        logging.getLogger("nested_learning").setLevel(logging.WARNING)
    stop = threading.Event()
    try:
        with StopSignals(stop):
            state = run_training(cfg, [progress_callback(args.quiet, console, cfg.output.log_every)], stop,
                                 args.resume)
    finally:
        distributed.shutdown()
    if ctx.is_main:
        print(json.dumps({"status": state.status, "step": state.step, "val_loss": state.val_loss,
                          "best_val_loss": state.best_val_loss, "checkpoint": state.last_checkpoint}))
    return 0


def _sweep(args, overrides: list[str]) -> int:
    """``train --sweep KEY=[...]``: every combination in turn in this process (``nested_learning.train.sweep``);
    one JSON line per run, then a table; ``<output.dir>/sweep.json`` after each run."""
    from pathlib import Path

    from nested_learning.config import ConfigError
    from nested_learning.train.sweep import expand_sweep, run_sweep, sweep_table, write_summary

    if args.nproc is not None:
        raise ConfigError("--sweep runs in this process; --nproc (torchrun) cannot take it: sweep one run at a time")
    if args.resume not in (None, "auto"):
        raise ConfigError(f"--resume {args.resume} with --sweep: every run resumes from its own directory; use "
                          "--resume auto")
    runs = expand_sweep(args.config, overrides, args.sweep)
    summary = Path(runs[0].config.output.dir).parent / "sweep.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    console = setup_logging(args.quiet)
    log.info("sweep: %d runs under %s", len(runs), summary.parent)
    stop = threading.Event()

    def report(run) -> None:
        print(json.dumps(run.summary()), flush=True)
        write_summary(runs, summary)

    with StopSignals(stop):
        run_sweep(runs, [progress_callback(args.quiet, console, runs[0].config.output.log_every)], stop,
                  args.resume, on_run_end=report)
    print(sweep_table(runs))
    return 0 if all(r.status == "completed" for r in runs) else 1


def _launch_torchrun(args, cfg) -> int:
    """``train --nproc N``: the same command, once per rank, under torchrun on this machine."""
    import os

    from nested_learning.config import ConfigError
    from nested_learning.train.distributed import launch

    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1, got {args.nproc}")
    if cfg.backend != "torch":
        raise ConfigError(f"--nproc: data-parallel training needs backend torch, not {cfg.backend}")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc: already running under torchrun; drop --nproc (torchrun's --nproc-per-node "
                          "sets the number of ranks)")
    argv = ["train"] + ([args.config] if args.config else [])
    argv += [f"--set={item}" for item in args.set or []]
    argv += [f"--{name}={value}" for name, value in (("backend", args.backend), ("out", args.out),
                                                     ("resume", args.resume)) if value]
    argv += ["--quiet"] if args.quiet else []
    return launch(args.nproc, argv)


def _eval_scores(model, sets: dict[str, list], pad_id: int, args) -> dict[str, dict[str, Any]]:
    from nested_learning.train.evaluate import evaluate_samples

    device = next(model.parameters()).device
    return {name: {**evaluate_samples(model, samples, pad_id, metric=args.metric, batch_size=args.batch_size,
                                      device=device), "samples": len(samples)}
            for name, samples in sets.items()}


def cmd_eval(args) -> int:
    """Target and retain sets, for the adapter and for its base model (the adapter switched off), or for a
    base model alone. The top level keeps the evaluated model's target numbers (loss, ppl, tokens, ...)."""
    from nested_learning.config import ConfigError, EvalConfig, ModelConfig, load_config
    from nested_learning.inference.generate import load_for_inference
    from nested_learning.train.evaluate import load_eval_file

    if args.target and args.data:
        raise ConfigError("eval: --data is another name for --target; give one")
    target = args.target or args.data
    if not target and not args.retain:
        raise ConfigError("eval: give --target FILE and/or --retain FILE")
    from pydantic import ValidationError

    try:
        retain = EvalConfig(retain=args.retain or []).retain  # named by file stem, as eval.retain does
    except ValidationError as exc:
        raise ConfigError(f"--retain: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    setup_logging(True)
    scores, base_model = _eval_scores, None
    if _mlx_checkpoint(args.adapter):  # an MLX run's checkpoint: scored with mlx-lm, its base loaded beside it
        from nested_learning.mlx.generate import load_mlx_checkpoint
        from nested_learning.mlx.model import load_base
        from nested_learning.mlx.train import evaluate_mlx

        model, tokenizer, _ = load_mlx_checkpoint(args.adapter, base=args.model, with_config=True)
        base_model = load_base(load_config(Path(args.adapter) / "config.yaml").model if args.model is None
                               else ModelConfig(name_or_path=args.model))[0]

        def scores(m, sets, pad_id, args):
            return {name: {**evaluate_mlx(m, samples, pad_id, batch_size=args.batch_size, metric=args.metric),
                           "samples": len(samples)} for name, samples in sets.items()}
    else:
        model, tokenizer = load_for_inference(adapter=args.adapter, base=args.model, device=args.device)

    def load(path):
        return load_eval_file(path, tokenizer, max_length=args.max_length, mask_prompt=not args.no_mask_prompt)

    target_sets = {"target": load(target)} if target else {}
    retain_sets = {name: load(path) for name, path in retain.items()}

    def report(m) -> dict[str, Any]:
        out: dict[str, Any] = dict(scores(m, target_sets, tokenizer.pad_token_id, args).get("target", {}))
        if retain_sets:
            out["retain"] = scores(m, retain_sets, tokenizer.pad_token_id, args)
            out["retain_loss"] = sum(r["loss"] for r in out["retain"].values()) / len(out["retain"])
            if args.metric == "exact_match":
                out["retain_exact_match"] = (sum(r["exact_match"] for r in out["retain"].values())
                                             / len(out["retain"]))
        return out

    res = report(model)
    if base_model is not None:
        res["base"] = report(base_model)
    elif args.adapter is not None:
        with model.disable_adapter():  # the same base weights the adapter was trained on
            res["base"] = report(model)
    res.update(data=target, retain_files=retain, adapter=args.adapter, model=args.model, metric=args.metric)
    print(json.dumps(res))
    return 0


def _parse_messages(text: str) -> list[dict[str, Any]]:
    from nested_learning.config import ConfigError

    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--messages: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ConfigError('--messages: expected a list of {"role": ..., "content": ...} objects')
    return messages


def cmd_generate(args) -> int:
    from nested_learning.config import ConfigError
    from nested_learning.inference.generate import generate_text, load_for_inference

    if (args.prompt is None) == (args.messages is None):
        raise ConfigError("generate: give exactly one of --prompt or --messages")
    messages = _parse_messages(args.messages) if args.messages is not None else None
    setup_logging(True)
    if _mlx_checkpoint(args.adapter):
        from nested_learning.mlx.generate import generate_mlx, load_mlx_checkpoint

        model, tokenizer = load_mlx_checkpoint(args.adapter, base=args.model)
        print(generate_mlx(model, tokenizer, prompt=args.prompt, messages=messages, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed))
        return 0
    model, tokenizer = load_for_inference(adapter=args.adapter, base=args.model, device=args.device)
    pieces = generate_text(model, tokenizer, prompt=args.prompt, messages=messages,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                           stream=True)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _mlx_checkpoint(adapter: str | None) -> bool:
    """A checkpoint of an MLX run: generate and merge it with mlx-lm (asks for the mlx extra if missing)."""
    from nested_learning.mlx import is_mlx_run_checkpoint

    if not is_mlx_run_checkpoint(adapter):
        return False
    from nested_learning.mlx import require_mlx

    require_mlx()
    return True


def cmd_merge(args) -> int:
    from nested_learning.inference.merge import merge_adapter

    setup_logging(True)
    if _mlx_checkpoint(args.adapter):
        from nested_learning.mlx.generate import merge_mlx

        out = merge_mlx(args.adapter, args.out, base=args.model, overwrite=args.overwrite)
        print(json.dumps({"merged": str(out), "format": "mlx"}))
        return 0
    out = merge_adapter(args.adapter, args.out, base=args.model, device=args.device, overwrite=args.overwrite)
    print(json.dumps({"merged": str(out)}))
    return 0


def cmd_demo(args) -> int:
    from nested_learning.demo import run_demo

    console = setup_logging(args.quiet)
    res = run_demo(args.out, args.steps, [progress_callback(args.quiet, console, 10)], overwrite=args.overwrite,
                   backend=args.backend)
    console.print(f"prompt: {res['prompt']!r}")
    console.print(f"before training: {res['before']!r}")
    console.print(f"after training:  {res['after']!r}")
    console.print(f"val loss {res['val_loss_before']:.4f} -> {res['val_loss_after']:.4f} in {res['steps']} steps "
                  f"({res['train_seconds']:.0f} s); adapter: {res['adapter']}")
    print(json.dumps({k: res[k] for k in ("status", "steps", "val_loss_before", "val_loss_after", "train_seconds",
                                          "before", "after", "adapter")}))
    return 0


def cmd_convert_adapter(args) -> int:
    from nested_learning.inference.convert import convert_adapter

    out = convert_adapter(args.src, args.dst, args.to, base=args.base, overwrite=args.overwrite)
    print(json.dumps({"converted": str(out), "format": args.to}))
    return 0


def cmd_scale_adapter(args) -> int:
    from nested_learning.inference.scale import scale_adapter

    out = scale_adapter(args.src, args.dst, args.factor, overwrite=args.overwrite)
    print(json.dumps({"scaled": str(out), "factor": args.factor}))
    return 0


def cmd_import_run(args) -> int:
    from nested_learning.service.oldruns import import_run

    print(json.dumps(import_run(args.old_dir, out=args.out, base=args.base, workdir=args.workdir, db=args.db,
                                overwrite=args.overwrite)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nested-learning", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune with LoRA and nested tiers")
    t.add_argument("config", nargs="?", help="YAML config (every field optional; see --help-config)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. optim.lr=1e-4")
    t.add_argument("--out", help="shorthand for --set output.dir=DIR")
    t.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint dir, or `auto` (latest in output.dir)")
    t.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel on this machine: launch N ranks through torchrun (one per GPU; gloo on CPU)")
    t.add_argument("--sweep", action="append", metavar="KEY=[V1,V2,...]",
                   help="train every combination of these values in turn in one process (start-up paid once), "
                   "each in <output.dir>/<key=value...>; repeat for a grid, e.g. --sweep optim.lr=[1e-4,3e-4]")
    t.add_argument("--help-config", action="store_true", help="list every config field with its default")
    t.add_argument("--backend", choices=["torch", "mlx"],
                   help="shorthand for --set backend=...: torch (PyTorch + PEFT) or mlx (mlx-lm)")
    t.set_defaults(func=cmd_train)

    def source_args(q):
        q.add_argument("--adapter", help="checkpoint directory (its config.yaml names the base model)")
        q.add_argument("--model", help="base model: hub id, local dir or embedded:<name> (overrides the adapter's)")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")

    e = sub.add_parser("eval", help="loss (and exact match) of an adapter and its base, or of a base model, on "
                       "a target file and retain files")
    source_args(e)
    e.add_argument("--base", dest="model", help="another name for --model")
    e.add_argument("--target", help="JSONL file of the task learnt (text, prompt/completion or messages)")
    e.add_argument("--data", help="another name for --target")
    e.add_argument("--retain", action="append", metavar="FILE",
                   help="JSONL file of what should not be forgotten (repeatable; each named by its file stem)")
    e.add_argument("--metric", choices=["loss", "exact_match"], default="loss",
                   help="exact_match: also score the greedy completion against the reference")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-length", type=int, default=1024)
    e.add_argument("--no-mask-prompt", action="store_true", help="count prompt tokens in the loss too")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="stream a completion for a prompt or a chat")
    source_args(g)
    g.add_argument("--prompt", help="plain text prompt")
    g.add_argument("--messages", help='chat as JSON ([{"role": "user", "content": "..."}]) or @file.json')
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge an adapter into a full Hugging Face model directory")
    m.add_argument("--adapter", required=True, help="checkpoint directory")
    m.add_argument("--out", required=True, help="new model directory")
    m.add_argument("--model", help="base model (default: the one the adapter's config.yaml names)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("demo", help="train the embedded tiny model on generated data (CPU, no download)")
    d.add_argument("--steps", type=int, default=400)
    d.add_argument("--out", default="runs/demo", help="demo directory (data/ and run/ inside)")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--overwrite", action="store_true", help="rerun into an existing demo directory")
    d.add_argument("--backend", choices=["torch", "mlx"], default="torch", help="train with PyTorch or with MLX")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert-adapter", help="convert a LoRA adapter between PEFT and the old app's mlx-lm format")
    c.add_argument("src", help="adapter directory (either format)")
    c.add_argument("dst", help="new adapter directory")
    c.add_argument("--to", required=True, choices=["peft", "mlx"], help="format to write")
    c.add_argument("--base", help="base model (recorded in the adapter; to mlx: counts the adapted blocks)")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    c.set_defaults(func=cmd_convert_adapter)

    sc = sub.add_parser("scale-adapter", help="scale an adapter's update toward the base (0 = base, 1 = unchanged): "
                        "forget less after training, see docs/science.md")
    sc.add_argument("src", help="adapter directory (either format)")
    sc.add_argument("dst", help="new adapter directory")
    sc.add_argument("--factor", type=float, required=True, help="multiplies the update: W + factor * dW")
    sc.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    sc.set_defaults(func=cmd_scale_adapter)

    i = sub.add_parser("import-run", help="import an old app run folder (config.json + metrics/) as a run and a job")
    i.add_argument("old_dir", help="the old run folder, e.g. nested_learning/checkpoints/NAME")
    i.add_argument("--out", help="new run directory (default: <workdir>/imported/NAME)")
    i.add_argument("--base", help="base model: converts the old adapters into PEFT checkpoints of the new run")
    i.add_argument("--workdir", default="outputs/service", help="the service workdir whose job store lists the run")
    i.add_argument("--db", help="job store path (default <workdir>/jobs.db)")
    i.add_argument("--overwrite", action="store_true", help="replace an earlier import of the same run")
    i.set_defaults(func=cmd_import_run)

    from nested_learning.service import add_serve_arguments, run_from_args

    s = sub.add_parser("serve", help="run the training-job service: REST API, job store, workers, dashboard")
    add_serve_arguments(s).set_defaults(func=run_from_args)
    return p


def main(argv: list[str] | None = None) -> int:
    from nested_learning.config import ConfigError
    from nested_learning.train.state import CheckpointError, TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        # ValueError covers DataError and ModelError: bad input, already phrased for the user. OSError: a path
        # the OS refuses (under a file, a read-only mount); its message names the path.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
