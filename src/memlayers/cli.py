"""The ``memlayers`` command line: ``info | plan | tokenize | train | eval | slot-stats | learn | patch | generate | demo | consolidate | shard | export | import | retrofit | quantize | lm-eval | bench``."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from memlayers.config import ConfigError, load_config, to_dict


def version() -> str:
    """The installed package's version (its metadata), or ``memlayers.__version__`` in a bare source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("memlayers")
    except PackageNotFoundError:
        import memlayers

        return memlayers.__version__


def _human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _table(rows: dict[str, float]) -> str:
    """A two-column table of metric names and values."""
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows.items())


MMAP_HELP = ("map the checkpoint's weights into memory instead of reading them (CPU): a value table larger "
             "than free RAM is read page by page as tokens touch its rows")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a config's parameter and FLOP counts."""
    from memlayers.model.accounting import count_flops, count_parameters
    from memlayers.train.config import RunConfig

    config = load_config(RunConfig, args.config, args.overrides)
    params = count_parameters(config.model)
    flops = count_flops(config.model, args.seq_len)
    if args.json:
        print(json.dumps({"config": to_dict(config), "params": params.__dict__, "flops_per_token": flops.as_dict()}, indent=2))
        return 0
    model = config.model
    letters = {"dense": "D", "memory": "M", "peer": "P", "moe": "E"}
    layout = " ".join(letters[model.ffn_kind(i)] for i in range(model.n_layers))
    print(f"layers       {layout}  (D dense, M memory, P PEER, E MoE)")
    print(f"params       total {_human(params.total)}, memory {_human(params.memory)}, "
          f"embedding {_human(params.embedding)}, active/token {_human(params.active)}")
    print(f"FLOPs/token  {_human(flops.total)} forward: matmul {_human(flops.matmul)}, attention {_human(flops.attention)}, "
          f"key search {_human(flops.key_search)}, value read {_human(flops.value_read)}")
    data = config.data
    source = f"that of data.tokenizer={data.tokenizer}" if data.tokenizer else f"data.vocab_size={data.vocab_size} when it trains one"
    print(f"vocab        {model.vocab_size} (model.vocab_size; a run uses its tokenizer's vocabulary: {source})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a YAML preset with overrides; ``--resume`` continues the run."""
    from memlayers.distributed import shutdown
    from memlayers.train.config import RunConfig
    from memlayers.train.trainer import Trainer

    config = load_config(RunConfig, args.config, args.overrides)
    trainer = Trainer(config, resume=args.resume_from or args.resume, overwrite=args.overwrite)
    summary = trainer.fit()
    rank = trainer.rank
    # drop the model, its DTensors and mesh before the process group goes: a group they keep
    # alive past destroy_process_group is torn down during interpreter exit, where gloo's
    # threads can abort the process (seen once at the end of a torchrun test under load)
    del trainer
    gc.collect()
    shutdown()  # a distributed run leaves together; nothing to do in one process
    if rank == 0:
        print(_table({k: v for k, v in summary.items() if isinstance(v, (int, float))}))
        print(f"checkpoint   {summary['checkpoint']}")
    return 0


def parse_qa_sets(specs: list[str]) -> dict[str, str]:
    """``--qa`` values as named QA files: ``NAME=FILE``, or a bare ``FILE`` named ``qa``."""
    from memlayers.train.config import QA_NAME

    sets: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "qa", spec
        if not QA_NAME.fullmatch(name) or not path:
            raise ConfigError("--qa", f"{spec!r}: give FILE or NAME=FILE with a name of letters, digits and _")
        if name in sets:
            raise ConfigError("--qa", f"the QA set {name!r} is given twice; name each file (--qa recall=a.jsonl "
                              "--qa extraction=b.jsonl)")
        sets[name] = path
    return sets


def cmd_eval(args: argparse.Namespace) -> int:
    """Factual QA (exact match, answer NLL) and held-out perplexity of a checkpoint."""
    from memlayers.data.packing import pack_documents
    from memlayers.data.text import read_documents, read_qa
    from memlayers.device import pick_device
    from memlayers.eval.perplexity import evaluate_perplexity
    from memlayers.eval.qa import evaluate_qa
    from memlayers.train.pretrained import load_pretrained

    if not args.qa and args.text is None:
        raise ConfigError("", "give --qa FILE (or --qa NAME=FILE, repeatable) and/or --text FILE to evaluate")
    qa_sets = parse_qa_sets(args.qa or [])
    model, tokenizer, config = load_pretrained(args.checkpoint, pick_device(args.device, "--device"), mmap=args.mmap)
    results: dict[str, float] = {}
    predictions: dict[str, list[dict]] = {}
    for name, path in qa_sets.items():
        pairs = read_qa(path)[: args.limit or None]
        qa = evaluate_qa(model, tokenizer, pairs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        suffix = "" if list(qa_sets) == ["qa"] else f"_{name}"
        results.update({f"qa_exact_match{suffix}": qa.exact_match, f"answer_nll{suffix}": qa.answer_nll,
                        f"qa_n{suffix}": qa.n})
        predictions[name] = qa.predictions
    if args.text is not None:
        documents = read_documents(args.text)
        rows = pack_documents(tokenizer.encode_batch(documents), config.data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
        device = next(model.parameters()).device
        ppl = evaluate_perplexity(model, rows.to(device), batch_size=args.batch_size)
        results.update({"text_loss": ppl["loss"], "perplexity": ppl["perplexity"], "text_tokens": ppl["tokens"]})
    if args.out is not None:
        saved = predictions.get("qa", []) if list(predictions) == ["qa"] else predictions
        Path(args.out).write_text(json.dumps({"results": results, "predictions": saved}, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(_table(results))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the prompt's continuation."""
    import torch

    from memlayers.device import pick_device
    from memlayers.eval.generate import generate
    from memlayers.train.pretrained import load_pretrained

    model, tokenizer, _ = load_pretrained(args.checkpoint, pick_device(args.device, "--device"), mmap=args.mmap)
    ids = tokenizer.encode(args.prompt, bos=tokenizer.bos_id is not None)
    generator = torch.Generator().manual_seed(args.seed)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    new = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   stop_ids=stop, generator=generator)[0]
    print(args.prompt + tokenizer.decode([t for t in new if t not in stop]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Figure 1 in miniature: dense, memory at several sizes, MoE and a 4x-FLOPs dense model."""
    from memlayers.demo import run_demo
    from memlayers.demo.report import summary_lines

    if args.ablations:
        from memlayers.demo.ablations import run_ablations

        if args.quick or args.preset:
            raise ConfigError("", "--quick and --preset do not apply to --ablations: the ablation file "
                              "names its preset; change it there or with dotted overrides")
        if args.tune:
            raise ConfigError("", "--tune does not apply to --ablations")
        seeds = [f"seeds={args.seeds}"] if args.seeds is not None else []
        run_ablations(args.ablations, args.out, overrides=[*args.overrides, *seeds])
        print((Path(args.out) / "ablations.md").read_text())
        return 0
    if args.claims:
        from memlayers.demo.claims import run_claims

        if args.tune or args.seeds is not None:
            raise ConfigError("", "--claims takes its seeds from the claims preset (seeds: N); leave out --tune and --seeds")
        preset = args.preset or ("demo_claims_quick" if args.quick else "demo_claims")
        results = run_claims(preset, args.out, overrides=args.overrides)
        print((Path(args.out) / "claims.md").read_text().split("\n\n![")[0])
        print(f"wrote {args.out}/claims.md, claims.json and the figures in {results['seconds'] / 60:.1f} min")
        return 0
    if args.continual:
        from memlayers.demo.continual import run_continual
        from memlayers.demo.continual_report import markdown

        if args.tune or args.seeds is not None or args.claims:
            raise ConfigError("", "--continual takes its seeds from its preset (seeds: N); leave out --tune, "
                              "--seeds and --claims")
        preset = args.preset or ("demo_continual_quick" if args.quick else "demo_continual")
        results = run_continual(preset, args.out, overrides=args.overrides)
        print(markdown(results))
        print(f"wrote {args.out}/continual.md, results.json and continual.png in {results['seconds'] / 60:.1f} min")
        return 0
    if args.tune:
        from memlayers.demo.runner import demo_config
        from memlayers.demo.tune import run_tuning

        if args.seeds is not None:
            raise ConfigError("", "--tune trains tune.seeds seeds per trial; set tune.seeds=N instead of --seeds")
        lrs = run_tuning(demo_config(args.quick, args.overrides, args.preset), args.out)
        print((Path(args.out) / "tuned.yaml").read_text(), end="")
        print("reproduce the demo with them: memlayers demo " + " ".join(
            f"lrs.{kind}.{name}={value:g}" for kind, setting in lrs.items() for name, value in setting.items()))
        return 0
    overrides = [*args.overrides, *([f"seeds={args.seeds}"] if args.seeds is not None else [])]
    results = run_demo(quick=args.quick, out_dir=args.out, overrides=overrides, preset=args.preset)
    print("\n".join(summary_lines(results)))
    print(f"wrote {args.out}/results.json, figure.png and report.md in {results['seconds'] / 60:.1f} min")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Convert between sharded (distributed) and single-process checkpoints."""
    from memlayers.train.sharded_checkpoint import export_checkpoint, shard_checkpoint

    convert = export_checkpoint if args.command == "consolidate" else shard_checkpoint
    print(f"wrote {convert(args.checkpoint, args.out)}")
    return 0


def _optional(module: str, extra: str):
    """Import an integration module; without its extra installed, a config error that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ConfigError("", f"{error.name} is not installed; pip install 'memlayers[{extra}]'") from None


def cmd_hf(args: argparse.Namespace) -> int:
    """Convert between a memlayers checkpoint and a Hugging Face transformers directory."""
    hf = _optional("memlayers.integrations.hf", "hf")
    convert = hf.export_to_hf if args.command == "export" else hf.import_from_hf
    print(f"wrote {convert(args.source, args.out)}")
    return 0


def cmd_retrofit(args: argparse.Namespace) -> int:
    """Add memory layers to a local transformers model, train them on text, save the result
    (under torchrun: trained by every rank, saved by rank 0)."""
    import torch.distributed as dist

    from memlayers.distributed import shutdown
    from memlayers.train.config import RunConfig

    hf = _optional("memlayers.integrations.hf", "hf")
    try:
        layers = [int(part) for part in args.layers.split(",")]
    except ValueError:
        raise ConfigError("layers", f"must be comma-separated layer indices like 4,12, got {args.layers!r}") from None
    overrides = list(args.overrides)
    if not any(o.startswith("train.out_dir=") for o in overrides):
        overrides.append(f"train.out_dir={Path(args.out) / 'training'}")
    config = load_config(RunConfig, args.config, overrides)
    summary = hf.retrofit_pretrained(args.model, args.out, layers, args.mode, config, train=not args.no_train,
                                     resume=args.resume)
    rank = dist.get_rank() if dist.is_initialized() else 0
    gc.collect()  # the sharded model's DTensors go before the process group (see cmd_train)
    shutdown()
    if rank == 0:
        if summary:
            print(_table({k: v for k, v in summary.items() if isinstance(v, (int, float))}))
        print(f"wrote {args.out}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness's own command line, with the ``memlayers`` model and local tasks registered."""
    return _optional("memlayers.integrations.lm_eval", "eval").run_harness(args.harness_args)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a checkpoint with int8 / int4 value tables."""
    from memlayers.inference.quantize import quantize_checkpoint

    result = quantize_checkpoint(args.checkpoint, args.out, args.bits, args.group_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"value tables {result['table_bytes'] / 2**20:,.1f} MiB -> {result['quantized_bytes'] / 2**20:,.1f} MiB "
              f"(int{args.bits}); wrote {result['checkpoint']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Kernel, step and memory benchmarks: a markdown table on stdout, JSON to ``--out``."""
    from memlayers.bench import NAMES, render, run

    results = run(tuple(args.names) or NAMES, device=args.device, quick=args.quick, repeat=args.repeat)
    print(render(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``memlayers`` command."""
    parser = argparse.ArgumentParser(prog="memlayers", description="Language models with product-key memory layers.")
    parser.add_argument("--version", action="version", version=f"memlayers {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter and FLOP counts of a config")
    info.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.memory.n_keys=256")
    info.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs (default max_seq_len)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a model (one process: CPU or one GPU)")
    train.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 train.out_dir=runs/a")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    train.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in a train.out_dir that holds a run, moving that run aside (never deleted)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="factual QA and perplexity of a checkpoint")
    evaluate.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest)")
    evaluate.add_argument("--qa", action="append", metavar="[NAME=]FILE",
                          help="QA .jsonl with question and answer fields; repeat with names to score several "
                          "sets, e.g. --qa recall=seen.jsonl --qa extraction=unseen.jsonl")
    evaluate.add_argument("--text", help="held-out text (.txt or .jsonl) for perplexity")
    evaluate.add_argument("--limit", type=int, default=0, help="first N QA pairs only (0: all)")
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", help="write results and per-question predictions as JSON")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--mmap", action="store_true", help=MMAP_HELP)
    evaluate.set_defaults(func=cmd_eval)

    from memlayers.continual.cli import add_parsers as add_continual_parsers
    from memlayers.data.tokenize_cli import add_parsers as add_tokenize_parsers
    from memlayers.distributed.plan_cli import add_parsers as add_plan_parsers

    add_continual_parsers(sub)
    add_tokenize_parsers(sub)
    add_plan_parsers(sub)

    gen = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--mmap", action="store_true", help=MMAP_HELP)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="dense vs memory sizes vs MoE vs 4x dense on a synthetic fact world")
    demo.add_argument("overrides", nargs="*", help="dotted overrides of the demo preset, e.g. train.steps=200 "
                      "(with --ablations: of the file's preset, after its demo_overrides, for every variant)")
    demo.add_argument("--quick", action="store_true", help="the smaller preset (under 5 minutes on 2 cores)")
    demo.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    demo.add_argument("--preset", help="a demo YAML instead of configs/demo.yaml")
    demo.add_argument("--ablations", metavar="FILE", help="train the variants of an ablation YAML instead "
                      "(e.g. configs/demo_ablations.yaml); writes ablations.json and ablations.md")
    demo.add_argument("--seeds", type=int, default=None,
                      help="train every run with N seeds; tables show mean and spread (default: the preset's seeds)")
    demo.add_argument("--continual", action="store_true", help="learning new facts against forgetting old ones: "
                      "sparse memory finetuning, values, full and LoRA over rounds (configs/demo_continual.yaml, "
                      "demo_continual_quick.yaml with --quick, or --preset FILE); writes continual.md, results.json "
                      "and continual.png")
    demo.add_argument("--claims", action="store_true", help="check every claim of the paper over seeds "
                      "(configs/demo_claims.yaml, or demo_claims_quick.yaml with --quick, or --preset FILE); "
                      "writes claims.md, claims.json and figures")
    demo.add_argument("--tune", action="store_true", help="search every model kind's learning rates (the same "
                      "lr values for all, then each kind's second rate or a finer lr; the same number of trials "
                      "each) on the validation split; writes tuned.yaml and tuning.json")
    demo.set_defaults(func=cmd_demo)

    for name, text in (
        ("consolidate", "write a sharded checkpoint (torchrun run) as a single-process one"),
        ("shard", "write a single-process checkpoint as a sharded one, for a torchrun run to resume from"),
    ):
        convert = sub.add_parser(name, help=text)
        convert.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest)")
        convert.add_argument("--out", required=True, help="run directory to write checkpoints/step_<N> into")
        convert.set_defaults(func=cmd_checkpoint)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers directory")
    export.add_argument("source", metavar="checkpoint", help="a checkpoint directory, or a run directory (its latest)")
    export.add_argument("--out", required=True, help="directory for config.json, model.safetensors and the tokenizer")
    export.set_defaults(func=cmd_hf)

    imports = sub.add_parser("import", help="write a transformers directory of a memlayers model as a checkpoint")
    imports.add_argument("source", metavar="hf_dir", help="a directory written by `memlayers export` or save_pretrained")
    imports.add_argument("--out", required=True, help="run directory to write checkpoints/step_00000000 into")
    imports.set_defaults(func=cmd_hf)

    retrofit = sub.add_parser("retrofit", help="add memory layers to a local Llama/Mistral/Qwen model and train them "
                              "(one process, or sharded over the ranks of torchrun)")
    retrofit.add_argument("model", help="a local transformers model directory (save_pretrained layout)")
    retrofit.add_argument("overrides", nargs="*", help="dotted overrides: model.memory.*, data.*, optim.*, train.*")
    retrofit.add_argument("--layers", required=True, help="comma-separated decoder layers, e.g. 4,12")
    retrofit.add_argument("--mode", choices=["parallel", "replace"], default="parallel",
                          help="parallel: beside the MLP, zero-gated (default); replace: instead of it")
    retrofit.add_argument("--out", required=True, help="directory for the retrofitted model (training under OUT/training)")
    retrofit.add_argument("--config", help="a YAML preset for the memory, data, optimizer and training")
    retrofit.add_argument("--no-train", action="store_true", help="only add the memory layers and save")
    retrofit.add_argument("--resume", action="store_true",
                          help="continue the training from the latest checkpoint in train.out_dir (same base model)")
    retrofit.set_defaults(func=cmd_retrofit)

    # listed for --help only: main() hands everything after `lm-eval` to lm-eval's own parser
    sub.add_parser("lm-eval", help="run lm-evaluation-harness with the memlayers model and tasks registered "
                   "(--model memlayers --model_args checkpoint=PATH --tasks memlayers_fact_qa ...)", add_help=False)

    quantize = sub.add_parser("quantize", help="a checkpoint's memory value tables in int8 or int4, for inference")
    quantize.add_argument("checkpoint", help="checkpoint directory or run directory (its latest checkpoint)")
    quantize.add_argument("--bits", type=int, choices=(8, 4), required=True)
    quantize.add_argument("--group-size", type=int, default=32, help="int4: columns sharing a scale (default 32)")
    quantize.add_argument("--out", required=True, help="run directory to write the quantized checkpoint into")
    quantize.add_argument("--json", action="store_true", help="print the result as JSON")
    quantize.set_defaults(func=cmd_quantize)

    bench = sub.add_parser("bench", help="embedding-bag, training-step and memory benchmarks (ours vs torch)")
    bench.add_argument("names", nargs="*", help="bag, step, memory, bandwidth, search, lm, inference (default: all)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for smoke tests)")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda")
    bench.add_argument("--repeat", type=int, default=5, help="timed repeats per measurement (median reported)")
    bench.add_argument("--out", help="write the results as JSON")
    bench.set_defaults(func=cmd_bench)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, taking ``key=value`` overrides after the options too (argparse
    alone wants them right after the command's first positional)."""
    args, extra = parser.parse_known_args(argv)
    late = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def _run(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; a problem of the input is one line on stderr, exit 2."""
    from memlayers.continual.patch import PatchError
    from memlayers.continual.slot_stats import SlotStatsError
    from memlayers.data.text import DataError
    from memlayers.distributed import PeerLostError
    from memlayers.train.checkpoint import CheckpointError
    from memlayers.train.trainer import TrainingError

    labels = {
        ConfigError: "config error",
        DataError: "data error",
        CheckpointError: "checkpoint error",
        TrainingError: "training stopped",
        PeerLostError: "distributed error",
        SlotStatsError: "slot statistics error",
        PatchError: "patch error",
    }
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's, options included
        args = argparse.Namespace(func=cmd_lm_eval, harness_args=argv[1:])
    else:
        args = _parse(build_parser(), argv)
    try:
        return args.func(args)
    except tuple(labels) as error:
        label = next(label for kind, label in labels.items() if isinstance(error, kind))
        print(f"memlayers: {label}: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point: a config, data, checkpoint, training or distributed problem is one
    line on stderr with exit code 2; SIGINT (Ctrl-C) and SIGTERM are ``memlayers:
    interrupted`` with exit code 128 + the signal's number (130, 143)."""
    from memlayers.host_memory import keep_freed_memory
    from memlayers.procs import Interrupted, interruptible

    keep_freed_memory()
    try:
        with interruptible():
            return _run(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt as stop:  # Interrupted, or Ctrl-C outside the main thread
        print("memlayers: interrupted", file=sys.stderr)
        return stop.exit_code if isinstance(stop, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
