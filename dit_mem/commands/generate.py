"""``dit-mem generate``: videos for one prompt or a prompt CSV, with memory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and trailing ``key=value`` overrides of :class:`GenerationConfig`."""
    p.add_argument("--config", type=Path, help="YAML file of GenerationConfig keys")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config keys, e.g. base_model=model/Wan2.1-T2V-1.3B k=3 memory_mode=cond",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate videos with memory (one prompt or a CSV of prompts)",
        description="Generate videos with DiT-Mem. Every GenerationConfig key can be set in "
        "--config YAML or as KEY=VALUE (the command line wins). Beside each mp4: a JSON of the "
        "retrieved memory and the settings, and a contact-sheet PNG.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--csv", type=Path, help="CSV with a 'prompt' column (optional 'filename', 'seed')"
    )
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--name", help="file name stem for --prompt (default: from the prompt)")
    add_config_arguments(p)
    p.set_defaults(func=run)


def _jobs(args, cfg) -> list[tuple[str, int, str]]:
    from dit_mem.outputs import slugify

    if args.prompt is not None:
        return [(args.prompt, cfg.seed, args.name or slugify(args.prompt))]
    import pandas as pd

    if not args.csv.is_file():
        raise FileNotFoundError(f"prompt CSV not found: {args.csv}")
    table = pd.read_csv(args.csv)
    if "prompt" not in table.columns:
        raise ValueError(f"{args.csv}: needs a 'prompt' column, has {list(table.columns)}")
    jobs = []
    for i, row in table.iterrows():
        prompt = str(row["prompt"])
        seed = int(row["seed"]) if "seed" in table.columns and row.notna()["seed"] else cfg.seed
        if "filename" in table.columns and row.notna()["filename"]:
            name = Path(str(row["filename"])).stem
        else:
            name = f"{i:04d}_{slugify(prompt, 60)}"
        jobs.append((prompt, seed, name))
    return jobs


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dit_mem.config import load_config, save_config
    from dit_mem.generation import GenerationConfig, load_generator
    from dit_mem.outputs import save_generation

    cfg = load_config(GenerationConfig, args.config, args.overrides)
    jobs = _jobs(args, cfg)
    todo = [
        j
        for j in jobs
        if not (args.out / f"{j[2]}.mp4").is_file() or not (args.out / f"{j[2]}.json").is_file()
    ]
    print(
        f"{len(jobs)} videos, {len(jobs) - len(todo)} already done, {len(todo)} to generate in {args.out}"
    )
    if not todo:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.out / "generate_config.yaml")
    gen = load_generator(cfg)
    for prompt, seed, name in tqdm(todo, desc="generate", unit="video", disable=len(todo) == 1):
        result = gen.generate(prompt, seed)
        paths = save_generation(result, args.out, name, gen.memory_previews(result.retrieved))
        print(f"{paths['video']}  ({len(result.retrieved.ids)} memory videos)")
    return 0
