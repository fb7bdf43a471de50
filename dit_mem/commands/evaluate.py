"""``dit-mem eval``: VBench and PhyGenBench generation and scoring, and run comparison.

    dit-mem eval vbench generate --run runs/mem [--full] [--no-memory] ...
    dit-mem eval vbench score --run runs/mem [--results-only]
    dit-mem eval vbench flicker --run runs/mem
    dit-mem eval phygenbench generate --run runs/mem --model-name dit-mem
    dit-mem eval phygenbench score --results result.json [--run runs/mem]
    dit-mem eval compare runs/base mem=runs/mem --out comparison/

A run folder holds ``vbench/`` (or ``vbench_full/``) and ``phygenbench/``; see
``dit_mem.evaluation.compare`` for the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dit_mem.cli_types import count
from dit_mem.commands.generate import add_input_arguments
from dit_mem.errors import UserError
from dit_mem.evaluation import benchmarks as B


def make_generator(args: argparse.Namespace):
    """The generator the ``generate`` subcommands use: ``DiTMemPipeline`` via ``load_pipeline``.

    Settings come from ``--config`` YAML and ``KEY=VALUE`` overrides of ``GenerationConfig``
    (the same keys as ``dit-mem generate``); ``--no-memory`` is the baseline. The returned object
    satisfies ``VideoGenerator``: ``gen(prompt, seed) -> uint8 [F, H, W, 3]`` and ``gen.metadata``.
    """
    from dit_mem.generation import PipelineGenerator, check_inputs, load_pipeline, resolve_config
    from dit_mem.models.base_model import describe_base_model

    cfg = generation_config(args)
    base = describe_base_model(cfg.base_model)
    cfg = resolve_config(cfg, base)
    check_inputs(base, cfg.inputs, "eval generate")  # (one input for every prompt)
    return PipelineGenerator(load_pipeline(cfg), cfg)


def generation_config(args: argparse.Namespace):
    from dit_mem.commands.generate import input_overrides
    from dit_mem.generation import load_generation_config

    overrides = [*input_overrides(args), *args.overrides, "progress=false"]
    if args.no_memory:
        overrides.append("no_memory=true")
    return load_generation_config(args.config, overrides)


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shard must look like INDEX/COUNT, got {text!r}"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= INDEX < COUNT")
    return index, count


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="run folder (created if needed)")
    g = p.add_argument_group(
        "model: GenerationConfig keys, as for `dit-mem generate` (method §6 defaults)"
    )
    g.add_argument("--config", type=Path, help="YAML file of GenerationConfig keys")
    g.add_argument("--no-memory", action="store_true", help="baseline: the plain base model")
    g.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="e.g. base_model=model/Wan2.1-T2V-1.3B encoder=checkpoint/dit-mem index=memory_index "
        "latents=latent k=5 steps=40",
    )
    add_input_arguments(p)
    s = p.add_argument_group("subset (smoke tests, several GPUs)")
    s.add_argument("--prompt-filter", help="only prompts containing this text")
    s.add_argument("--limit", type=count(1), help="only the first N videos (after other filters)")
    s.add_argument("--shard", type=_shard, help="INDEX/COUNT: every COUNT-th video from INDEX")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="benchmarks: VBench, PhyGenBench, run comparison")
    bench = p.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)

    vb = bench.add_parser("vbench", help="VBench: generate, score, offline temporal flickering")
    vcmd = vb.add_subparsers(dest="vbench_command", metavar="ACTION", required=True)

    gen = vcmd.add_parser("generate", help="the paper's 11 lists × 10 prompts × 5 seeds")
    _add_generation_args(gen)
    gen.add_argument("--full", action="store_true", help="VBench's full per-dimension lists")
    gen.add_argument(
        "--folders", nargs="+", choices=B.VBENCH_LISTS, metavar="LIST", help="only these lists"
    )
    gen.add_argument(
        "--prompt-dir", type=Path, help="folder of <list>.txt replacing the packaged lists"
    )
    gen.set_defaults(func=_vbench_generate)

    sc = vcmd.add_parser(
        "score", help="run vbench per folder, then aggregate Quality/Semantic/Total"
    )
    sc.add_argument("--run", required=True, type=Path)
    sc.add_argument("--full", action="store_true", help="the run used --full")
    sc.add_argument("--results-only", action="store_true", help="only aggregate existing results")
    sc.add_argument("--vbench-env", type=Path, help="vbench virtualenv ($VBENCH_ENV)")
    sc.add_argument(
        "--load-ckpt-from-local",
        action="store_true",
        help="vbench weights are cached ($VBENCH_CACHE_DIR); also $VBENCH_LOAD_CKPT_FROM_LOCAL=1",
    )
    sc.add_argument(
        "--folders", nargs="+", choices=B.VBENCH_LISTS, metavar="LIST", help="only these folders"
    )
    sc.add_argument(
        "--allow-incomplete", action="store_true", help="score folders with missing videos"
    )
    sc.add_argument("--rerun", action="store_true", help="rerun folders that already have results")
    sc.set_defaults(func=_vbench_score)

    fl = vcmd.add_parser("flicker", help="temporal flickering offline (no static filter)")
    fl.add_argument("--run", type=Path, help="run folder: scores vbench/videos/temporal_flickering")
    fl.add_argument("--videos", type=Path, help="any folder of mp4s (instead of --run)")
    fl.add_argument("--out", type=Path, help="results JSON (default: in the run's results)")
    fl.add_argument("--full", action="store_true", help="the run used --full")
    fl.set_defaults(func=_vbench_flicker)

    pg = bench.add_parser("phygenbench", help="PhyGenBench: generate, aggregate PhyGenEval scores")
    pcmd = pg.add_subparsers(dest="phygenbench_command", metavar="ACTION", required=True)
    pgen = pcmd.add_parser("generate", help="160 prompts, seed 42, PhyGenEval's file layout")
    _add_generation_args(pgen)
    pgen.add_argument("--model-name", default="dit-mem", help="PhyVideos/<model-name>/ folder")
    pgen.set_defaults(func=_phygen_generate)
    psc = pcmd.add_parser("score", help="PhyGenEval stage scores -> category and overall")
    psc.add_argument("--results", required=True, type=Path, help="PhyGenEval result JSON list")
    psc.add_argument("--run", type=Path, help="also write RUN/phygenbench/scores.json")
    psc.add_argument("--out", type=Path, help="write the summary JSON here")
    psc.set_defaults(func=_phygen_score)

    cmp_ = bench.add_parser("compare", help="table (Markdown, CSV) and bar chart of runs")
    cmp_.add_argument("runs", nargs="+", help="run folders, optionally as label=path")
    cmp_.add_argument("--out", type=Path, default=Path("comparison"), help="output folder")
    cmp_.set_defaults(func=_compare)


# --------------------------------------------------------------------------- generation


def _vbench_root(run: Path, full: bool) -> Path:
    return run / ("vbench_full" if full else "vbench")


def _generate(args: argparse.Namespace, jobs, root: Path, benchmark: str) -> int:
    from dit_mem.evaluation.loop import missing_videos, run_generation
    from dit_mem.evaluation.plan import filter_jobs

    jobs = filter_jobs(jobs, prompt_filter=args.prompt_filter, limit=args.limit, shard=args.shard)
    if not jobs:
        raise UserError("no video selected (check --prompt-filter/--limit/--shard)")
    todo = missing_videos(jobs, root)
    print(f"{benchmark}: {len(jobs)} videos selected, {len(todo)} not on disk yet, under {root}")
    generator = make_generator(args)
    report = run_generation(
        jobs,
        generator,
        root,
        benchmark=benchmark,
        fps=B.FPS,
        expected_frames=generator.cfg.num_frames,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0


def _vbench_generate(args: argparse.Namespace) -> int:
    from dit_mem.evaluation.plan import filter_jobs, plan_vbench

    lists = B.vbench_prompt_lists(full=args.full, prompt_dir=args.prompt_dir)
    jobs = filter_jobs(plan_vbench(lists), folders=args.folders)
    root = _vbench_root(args.run, args.full) / "videos"
    return _generate(args, jobs, root, "vbench-full" if args.full else "vbench")


def _phygen_generate(args: argparse.Namespace) -> int:
    from dit_mem.evaluation.plan import plan_phygenbench

    return _generate(
        args, plan_phygenbench(args.model_name), args.run / "phygenbench", "phygenbench"
    )


# --------------------------------------------------------------------------- VBench scoring


def _vbench_score(args: argparse.Namespace) -> int:
    from dit_mem.evaluation import vbench_runner as R
    from dit_mem.evaluation import vbench_scores as V
    from dit_mem.evaluation.plan import plan_vbench
    from dit_mem.utils import write_json_atomic

    base = _vbench_root(args.run, args.full)
    videos, results = base / "videos", base / "results"
    folders = list(args.folders or B.VBENCH_LISTS)
    expected: dict[str, list[str]] = {f: [] for f in folders}
    for job in plan_vbench(full=args.full):
        if job.folder in expected:
            expected[job.folder].append(job.filename)

    # 1. What is on disk: missing videos are reported, never scored.
    missing: dict[str, int] = {}
    for folder in folders:
        names = (
            {p.name for p in (videos / folder).glob("*.mp4")}
            if (videos / folder).is_dir()
            else set()
        )
        n_missing = len(set(expected[folder]) - names)
        if n_missing:
            missing[folder] = n_missing
            print(f"{folder}: {n_missing} of {len(expected[folder])} videos missing")

    # 2. Run vbench on the folders that are ready.
    if not args.results_only:
        env = args.vbench_env or R.default_env()
        exe = R.vbench_executable(env)
        if exe is None:
            print(R.setup_hint(env))
            return 2
        local = args.load_ckpt_from_local or R.load_local_default()
        for folder in folders:
            dims = B.FOLDER_DIMENSIONS[folder]
            if missing.get(folder) == len(expected[folder]):
                print(f"{folder}: no videos, skipped ({', '.join(dims)} stay missing)")
                continue
            if folder in missing and not args.allow_incomplete:
                print(f"{folder}: incomplete, skipped (use --allow-incomplete to score it anyway)")
                continue
            have = V.collect_results(results / folder)
            if not args.rerun and all(d in have for d in dims):
                print(f"{folder}: results present, skipped (use --rerun)")
                continue
            R.run_folder(exe, videos / folder, results / folder, dims, local)

    # 3. Aggregate whatever results exist.
    found = V.collect_results(results)
    summary = V.aggregate({d: r.mean for d, r in found.items()})
    print(V.format_summary(summary))
    out = base / "scores.json"
    write_json_atomic(out, summary.to_dict() | {"missing_videos": missing})
    print(f"wrote {out}")
    return 0


def _vbench_flicker(args: argparse.Namespace) -> int:
    from dit_mem.evaluation.flicker import UNFILTERED_DIMENSION, UNFILTERED_LABEL, flicker_folder
    from dit_mem.evaluation.plan import plan_vbench

    expected = None
    if args.videos is not None:
        folder, out = args.videos, args.out
    elif args.run is not None:
        base = _vbench_root(args.run, args.full)
        folder = base / "videos" / "temporal_flickering"
        out = args.out or (
            base / "results" / "temporal_flickering" / f"{UNFILTERED_DIMENSION}_eval_results.json"
        )
        expected = [
            j.filename for j in plan_vbench(full=args.full) if j.folder == "temporal_flickering"
        ]
    else:
        raise UserError("give --run RUN or --videos FOLDER")
    result = flicker_folder(folder, out=out, expected=expected)
    mean, per_video = result[UNFILTERED_DIMENSION]
    score = "—" if mean is None else f"{100 * mean:.2f}%"
    print(f"{UNFILTERED_LABEL}: {score} over {len(per_video)} videos in {folder}")
    if result["missing_videos"]:
        print(f"missing videos: {len(result['missing_videos'])}")
    if result["unreadable_videos"]:
        print(f"unreadable videos: {len(result['unreadable_videos'])}")
    if out is not None:
        print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- PhyGenBench


def _phygen_score(args: argparse.Namespace) -> int:
    from dit_mem.evaluation import phygenbench_scores as P
    from dit_mem.utils import write_json_atomic

    summary = P.aggregate(P.load_results(args.results))
    print(P.format_summary(summary))
    data = summary.to_dict() | {"source": str(args.results)}
    for out in (args.out, args.run / "phygenbench" / "scores.json" if args.run else None):
        if out is not None:
            write_json_atomic(out, data)
            print(f"wrote {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from dit_mem.evaluation.compare import compare, load_run, parse_run_arg

    runs = []
    for arg in args.runs:
        label, path = parse_run_arg(arg)
        runs.append(load_run(path, label))
    print(compare(runs, args.out))
    print(f"wrote {args.out}/compare.md, compare.csv, compare.png")
    return 0
