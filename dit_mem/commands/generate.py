"""``dit-mem generate``: videos for one prompt or a prompt CSV, with memory."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from dit_mem.errors import UserError


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and trailing ``key=value`` overrides of :class:`GenerationConfig`."""
    p.add_argument("--config", type=Path, help="YAML file of GenerationConfig keys")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config keys, e.g. base_model=model/Wan2.1-T2V-1.3B k=3 memory_mode=cond",
    )


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The conditioning inputs, named as the stock pipelines name their arguments (each is the
    config key of the same name, for every prompt; a prompt CSV column of that name wins)."""
    g = p.add_argument_group("conditioning inputs (where the base model's pipeline takes them)")
    g.add_argument("--image", type=Path, help="image-to-video (Wan I2V; Wan2.2 TI2V): first frame")
    g.add_argument("--last-image", type=Path, help="Wan I2V (FLF2V): the last frame")
    g.add_argument("--video", type=Path, help="VACE: the control video")
    g.add_argument("--mask", type=Path, help="VACE: the mask video (white: generate)")
    g.add_argument("--reference-images", type=Path, nargs="+", help="VACE: reference images")


def input_overrides(args: argparse.Namespace) -> list[str]:
    """``--image PATH`` and its siblings as the config overrides they are (``image=PATH``)."""
    from dit_mem.generation import INPUTS

    out = []
    for name in INPUTS:
        value = getattr(args, name, None)
        if value is None:
            continue
        text = f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)
        out.append(f"{name}={text}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate videos with memory (one prompt or a CSV of prompts)",
        description="Generate videos with DiT-Mem. Every GenerationConfig key can be set in "
        "--config YAML or as KEY=VALUE (the command line wins). Beside each mp4: a JSON of the "
        "retrieved memory and the settings, and a contact-sheet PNG. A video whose JSON says it "
        "is this prompt, seed and settings is done and kept; --toyworld runs the shipped toy "
        "world offline (the settings of config/toyworld.yaml).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--csv",
        type=Path,
        help="CSV with a 'prompt' column (or the release's 'caption'); optional 'filename' (or "
        "the release's 'video_path', whose stem names the video) and 'seed'",
    )
    add_input_arguments(p)
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--name", help="file name stem for --prompt (default: from the prompt)")
    p.add_argument(
        "--toyworld",
        action="store_true",
        help="the shipped toy world's models, bank and settings (offline, a few seconds a video)",
    )
    add_config_arguments(p)
    p.set_defaults(func=run)


@dataclass
class Job:
    prompt: str
    seed: int
    name: str  # file stem inside --out
    named: bool  # the user named the file (else it came from the prompt)
    where: str  # for messages: "--prompt" or "<csv>, line N"
    inputs: dict = field(default_factory=dict)  # conditioning inputs of this row (CSV columns)


def _row_inputs(row: dict, folder: Path, where: str) -> dict:
    """A CSV row's conditioning inputs (columns named as INPUTS; paths from the CSV's folder;
    several reference images separated by ';')."""
    from dit_mem.generation import INPUTS

    out = {}
    for name in INPUTS:
        text = (row.get(name) or "").strip()
        if not text:
            continue
        paths = [folder / part.strip() for part in text.split(";") if part.strip()]
        for path in paths:
            if not path.is_file():
                raise UserError(f"{where}: {name} {path} not found")
        out[name] = tuple(paths) if name == "reference_images" else paths[0]
    return out


def _jobs(args, cfg) -> list[Job]:
    """One job per video; every row checked before anything runs."""
    from dit_mem.outputs import check_stem, slugify

    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        if args.name is not None:
            return [Job(args.prompt, cfg.seed, check_stem(args.name, "--name"), True, "--name")]
        return [Job(args.prompt, cfg.seed, slugify(args.prompt), False, "--prompt")]
    from dit_mem.data.table import read_csv_strict

    table = read_csv_strict(args.csv)
    column = (
        "prompt" if "prompt" in table.columns else "caption" if "caption" in table.columns else None
    )
    if column is None:
        raise UserError(f"{args.csv}: missing required column(s) prompt (or the release's caption)")
    if table.empty:
        raise UserError(f"{args.csv}: no prompts (a header and no rows)")
    jobs, names = [], {}
    for i, row in enumerate(table.to_dict("records")):
        line = i + 2  # header is line 1
        where = f"{args.csv}, line {line}"
        prompt = row[column].strip()
        if not prompt:
            raise UserError(f"{where}: empty prompt")
        seed = cfg.seed
        if row.get("seed", "").strip():
            text = row["seed"].strip()
            if not text.isdigit() or int(text) >= 2**63:
                raise UserError(f"{where}: seed must be a whole number ≥ 0, got {text!r}")
            seed = int(text)
        if row.get("filename", "").strip():
            name, named = check_stem(row["filename"].strip(), f"{where}: filename"), True
        elif row.get("video_path", "").strip():  # the release's inference.csv
            name, named = (
                check_stem(Path(row["video_path"].strip()).name, f"{where}: video_path"),
                True,
            )
        else:
            name, named = f"{i:04d}_{slugify(prompt, 60)}", False
        if named and name in names:
            raise UserError(
                f"{args.csv}, lines {names[name]} and {line}: both write {name}.mp4; give every "
                "row its own filename"
            )
        names[name] = line
        jobs.append(Job(prompt, seed, name, named, where, _row_inputs(row, args.csv.parent, where)))
    return jobs


def _place(jobs: list[Job], out: Path, settings) -> tuple[list[Job], int]:
    """Give every job its file: a video whose sidecar says it is this job is done; a name taken
    by another video (or by another job of this run) is an error for a name the user gave, and
    a distinct name (a short hash of prompt and seed) for one made from the prompt."""
    from dit_mem.outputs import distinct_stem, sidecar_of

    todo, done, taken = [], 0, set()
    for job in jobs:
        for attempt in range(2):
            record = sidecar_of(out, job.name)
            mine = (
                record is not None
                and (out / f"{job.name}.mp4").is_file()
                and (record.get("prompt"), record.get("seed"), record.get("settings"))
                == (job.prompt, job.seed, settings(job))
            )
            free = record is None and not (out / f"{job.name}.mp4").exists()
            if job.name not in taken and (mine or free):
                break
            if job.named or attempt:
                other = record or {}
                raise UserError(
                    f"{job.where}: {out / job.name}.mp4 is another video (prompt "
                    f"{other.get('prompt')!r}, seed {other.get('seed')!r}, or other settings); "
                    "give it another name, or another --out folder"
                )
            job.name = distinct_stem(job.name, job.prompt, job.seed)
        taken.add(job.name)
        if mine:
            done += 1
        else:
            todo.append(job)
    return todo, done


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dit_mem.config import save_config, to_dict
    from dit_mem.generation import (
        check_inputs,
        generate,
        load_generation_config,
        load_pipeline,
        resolve_config,
        settings_for,
    )
    from dit_mem.models.base_model import describe_base_model
    from dit_mem.outputs import save_generation, videos_in
    from dit_mem.utils import folder_lock

    overrides = [*input_overrides(args), *args.overrides]
    if args.toyworld:  # the shipped toy world's settings, then KEY=VALUE
        from dit_mem.config import with_overrides
        from dit_mem.toyworld.evaluate import toy_config
        from dit_mem.toyworld.recipe import SHIPPED

        if args.config is not None:
            raise UserError("give --config or --toyworld, not both")
        cfg = with_overrides(toy_config(SHIPPED), overrides)
    else:
        cfg = load_generation_config(args.config, overrides)  # checked here
    jobs = _jobs(args, cfg)
    base = describe_base_model(cfg.base_model)
    cfg = resolve_config(cfg, base)  # the family's settings where the config leaves them open
    for job in jobs:
        check_inputs(base, {**cfg.inputs, **job.inputs}, job.where)
    saved = args.out / "generate_config.yaml"
    if saved.is_file() and videos_in(args.out):  # a folder of videos holds one configuration
        import yaml

        from dit_mem.utils.io import changed_settings, refuse_other_settings

        changes = changed_settings(
            yaml.safe_load(saved.read_text()) or {},
            to_dict(cfg),
            ignore={"progress", "device", "seed"},
        )
        refuse_other_settings(args.out, f"videos ({saved})", changes, "use another --out folder")
    todo, done = _place(jobs, args.out, lambda job: settings_for(cfg, job.seed, inputs=job.inputs))
    print(f"{len(jobs)} videos, {done} already done, {len(todo)} to generate in {args.out}")
    if not todo:
        return 0
    pipe = load_pipeline(cfg)
    with folder_lock(args.out, "generate"):
        recorded = False
        for job in tqdm(todo, desc="generate", unit="video", disable=len(todo) == 1):
            result = generate(pipe, cfg, job.prompt, job.seed, inputs=job.inputs)
            previews = []
            if result.retrieved.ids:  # a token-only bank has none to show: the sidecar says so
                previews = pipe.memory_bank.previews(
                    result.retrieved.ids, vae=pipe.vae, required=False
                )
            paths = save_generation(result, args.out, job.name, previews)
            if not recorded:  # with the first video written (a failed run leaves none)
                save_config(cfg, saved)
                recorded = True
            print(f"{paths['video']}  ({len(result.retrieved.ids)} memory videos)")
    return 0
