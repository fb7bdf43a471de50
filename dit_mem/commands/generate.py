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
    """``(prompt, seed, file stem)`` per video; every row checked before anything runs."""
    from dit_mem.outputs import slugify

    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return [(args.prompt, cfg.seed, args.name or slugify(args.prompt))]
    from dit_mem.data.table import read_csv_strict

    table = read_csv_strict(args.csv, required=("prompt",))
    if table.empty:
        raise ValueError(f"{args.csv}: no prompts (a header and no rows)")
    jobs, names = [], {}
    for i, row in enumerate(table.to_dict("records")):
        line = i + 2  # header is line 1
        prompt = row["prompt"].strip()
        if not prompt:
            raise ValueError(f"{args.csv}, line {line}: empty prompt")
        seed = cfg.seed
        if row.get("seed", "").strip():
            text = row["seed"].strip()
            if not text.isdigit() or int(text) >= 2**63:
                raise ValueError(
                    f"{args.csv}, line {line}: seed must be a whole number ≥ 0, got {text!r}"
                )
            seed = int(text)
        if row.get("filename", "").strip():
            name = Path(row["filename"].strip()).stem
            if not name or name in (".", ".."):
                raise ValueError(f"{args.csv}, line {line}: bad filename {row['filename']!r}")
        else:
            name = f"{i:04d}_{slugify(prompt, 60)}"
        if name in names:
            raise ValueError(
                f"{args.csv}, lines {names[name]} and {line}: both write {name}.mp4; give every "
                "row its own filename"
            )
        names[name] = line
        jobs.append((prompt, seed, name))
    return jobs


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dit_mem.config import load_config, save_config, to_dict
    from dit_mem.generation import GenerationConfig, generate, load_pipeline
    from dit_mem.outputs import save_generation
    from dit_mem.utils import folder_lock

    cfg = load_config(GenerationConfig, args.config, args.overrides)  # checked here
    jobs = _jobs(args, cfg)
    saved = args.out / "generate_config.yaml"
    if saved.is_file():  # a folder holds one configuration: never overwritten by another
        import yaml

        from dit_mem.utils.io import changed_settings, refuse_other_settings

        changes = changed_settings(
            yaml.safe_load(saved.read_text()) or {},
            to_dict(cfg),
            ignore={"progress", "device", "seed"},
        )
        refuse_other_settings(args.out, f"videos ({saved})", changes, "use another --out folder")
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
    pipe = load_pipeline(cfg)
    with folder_lock(args.out, "generate"):
        save_config(cfg, saved)
        for prompt, seed, name in tqdm(todo, desc="generate", unit="video", disable=len(todo) == 1):
            result = generate(pipe, cfg, prompt, seed)
            previews = []
            if result.retrieved.ids:
                previews = pipe.memory_bank.previews(result.retrieved.ids, vae=pipe.vae)
            paths = save_generation(result, args.out, name, previews)
            print(f"{paths['video']}  ({len(result.retrieved.ids)} memory videos)")
    return 0
