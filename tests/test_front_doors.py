"""Every flavour through every front door: the matrix that proves they agree.

Rows: the flavours of the README's table on tiny folders (``wan2.1``, ``wan2.2-ti2v``,
``wan2.2-a14b``, Wan I2V, Wan VACE, ``ltx``, ``hunyuan15``), each with a bank of its own family's
latents and one memory encoder. Columns: the Python call (``DiTMemPipeline.from_pretrained`` +
``load_memory`` + the call) is the reference; ``dit-mem generate``, the web page's ``/generate``
API (a real Gradio server in this process, driven by ``gradio_client``) and ``dit-mem eval vbench
generate --limit 1`` must give its frames bit for bit (captured where each door hands them to the
mp4 writer), with the same seed and settings. ``dit-mem train`` for two steps must equal
``train()`` from Python (losses and final weights), with the family's flow settings in the log and
the saved config; Wan I2V and VACE training is the documented refusal. What each flavour adds is
checked to be in effect: A14B's second expert, TI2V's image through per-token timesteps, VACE's
control video, I2V's image (required, one clear line without it).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dit_mem.cli import main
from dit_mem.testing import TINY_GEOMETRY, build_tiny_model, family_of_flavour

FLAVOURS = ["wan2.1", "wan2.2-ti2v", "wan2.2-a14b", "wan-i2v", "wan-vace", "ltx", "hunyuan15"]
PROMPT = "a red circle moving left"
NEGATIVE = "blurry"
STEPS, K, SEED = 2, 2, 7
# conditioning each flavour is given through every door
INPUTS = {"wan-i2v": ("image",), "wan-vace": ("video", "mask")}

pytestmark = pytest.mark.usefixtures("one_thread")


class World:
    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, Path] = {}
        self.banks: dict[str, Path] = {}
        self.reference: dict[tuple, np.ndarray] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """Tiny folders of every flavour, a bank per family (the real `bank build`), one encoder,
    an image and a control video."""
    from PIL import Image

    from dit_mem.bank.build import BankBuildConfig, build_bank
    from dit_mem.evaluation.video_io import write_mp4
    from dit_mem.memory import MemoryEncoder
    from dit_mem.retrieval.embedder import load_embedder
    from dit_mem.testing import write_bank

    w = World(tmp_path_factory.mktemp("front-doors"))
    torch.manual_seed(0)
    MemoryEncoder.from_preset("tiny").save_pretrained(w.root / "encoder")
    for flavour in FLAVOURS:
        w.models[flavour] = build_tiny_model(w.root / flavour, flavour)
    csv = write_bank(w.root, videos=w.root / "video")
    embedder = load_embedder(None)
    for family, flavour in (("wan", "wan2.1"), ("ltx", "ltx"), ("hunyuan15", "hunyuan15")):
        frames, height, width = TINY_GEOMETRY[family]
        cfg = BankBuildConfig(
            csv=csv,
            bank=w.root / f"bank-{family}",
            base_model=w.models[flavour],
            videos=w.root / "video",
            num_frames=frames,
            height=height,
            width=width,
            num_workers=0,
        )
        build_bank(cfg, embedder=embedder)
        w.banks[family] = cfg.bank
    Image.new("RGB", (64, 64), (220, 30, 30)).save(w.root / "first.png")
    blue = np.zeros((17, 64, 64, 3), np.uint8)
    blue[..., 2] = 200
    write_mp4(w.root / "control.mp4", blue, fps=16, lossless=True)
    mask = np.zeros((17, 64, 64, 3), np.uint8)
    mask[:, 16:48, 16:48] = 255
    write_mp4(w.root / "mask.mp4", mask, fps=16, lossless=True)
    w.inputs = {
        "image": w.root / "first.png",
        "video": w.root / "control.mp4",
        "mask": w.root / "mask.mp4",
    }
    return w


def settings(world: World, flavour: str, model: Path | None = None, **extra) -> dict:
    """The generation settings of a cell, as KEY=VALUE for every door."""
    frames, height, width = TINY_GEOMETRY[family_of_flavour(flavour)]
    kv = {
        "base_model": model or world.models[flavour],
        "encoder": world.root / "encoder",
        "bank": world.banks[family_of_flavour(flavour)],
        "k": K,
        "height": height,
        "width": width,
        "num_frames": frames,
        "steps": STEPS,
        "negative_prompt": NEGATIVE,
        "seed": SEED,
        "dtype": "float32",
        "device": "cpu",
        "progress": "false",
        **extra,
    }
    return kv


def as_overrides(kv: dict) -> list[str]:
    return [f"{k}={v}" for k, v in kv.items()]


def as_uint8(frames) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def python_frames(
    world: World,
    flavour: str,
    prompt: str = PROMPT,
    seed: int = SEED,
    inputs=(),
    model=None,
    bank=None,
):
    """The reference: the Python API, as the README shows it."""
    from diffusers.utils import load_image, load_video

    from dit_mem import DiTMemPipeline, DiTMemWanImageToVideoPipeline

    key = (flavour, prompt, seed, tuple(inputs), str(model), str(bank))
    if key in world.reference:
        return world.reference[key]
    folder = model or world.models[flavour]
    if flavour == "wan2.2-ti2v" and "image" in inputs:  # TI2V from an image: diffusers' I2V class
        pipe = DiTMemWanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    else:
        pipe = DiTMemPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_memory(world.root / "encoder", bank=bank or world.banks[family_of_flavour(flavour)])
    frames, height, width = TINY_GEOMETRY[family_of_flavour(flavour)]
    given = {}
    for name in inputs:
        path = str(world.inputs[name])
        if name == "image":
            given[name] = load_image(path)
        else:
            video = load_video(path)
            given[name] = [f.convert("L") for f in video] if name == "mask" else video
    out = pipe(
        prompt=prompt,
        negative_prompt=NEGATIVE,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        memory="retrieve",
        k=K,
        **given,
    )
    world.reference[key] = as_uint8(out.frames[0])
    return world.reference[key]


@pytest.fixture
def written(monkeypatch):
    """Frames as each door hands them to the mp4 writer: ``{file name: frames}``."""
    from dit_mem.evaluation import loop as eval_generation
    from dit_mem.evaluation import video_io

    seen: dict[str, np.ndarray] = {}
    real = video_io.write_mp4

    def spy(path, frames, *args, **kwargs):
        seen[Path(path).name] = np.asarray(frames).copy()
        return real(path, frames, *args, **kwargs)

    import dit_mem.outputs

    for module in (video_io, eval_generation, dit_mem.outputs):
        monkeypatch.setattr(module, "write_mp4", spy)
    return seen


def input_options(world: World, flavour: str) -> list[str]:
    return [a for n in INPUTS.get(flavour, ()) for a in (f"--{n}", str(world.inputs[n]))]


# ======================================================================================
# Generation: Python = dit-mem generate = the web page = evaluation
# ======================================================================================
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generate_cli_equals_python(world, flavour, written, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--prompt", PROMPT, "--name", "v", "--out", str(out)]
    args += [*input_options(world, flavour), *as_overrides(settings(world, flavour))]
    assert main(args) == 0
    want = python_frames(world, flavour, inputs=INPUTS.get(flavour, ()))
    np.testing.assert_array_equal(written["v.mp4"], want)
    sidecar = json.loads((out / "v.json").read_text())
    assert len(sidecar["retrieved"]) == K and "no_preview" not in sidecar
    for name in INPUTS.get(flavour, ()):  # the conditioning is part of what the video records
        assert sidecar["settings"][name] == str(world.inputs[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_web_generate_api_equals_python(world, flavour, written, tmp_path):
    from gradio_client import Client, handle_file

    from dit_mem.generation import load_generation_config, load_pipeline, resolve_config
    from dit_mem.web import MODES, MemoryPage, build_app

    cfg = resolve_config(load_generation_config(None, as_overrides(settings(world, flavour))))
    page = MemoryPage(load_pipeline(cfg), cfg, [PROMPT], out_dir=tmp_path / "page")
    assert page.takes_image == (flavour in ("wan-i2v", "wan2.2-ti2v"))
    app = build_app(page)
    app.queue(default_concurrency_limit=1)
    port = _free_port()
    app.launch(
        server_port=port,
        prevent_thread_lock=True,
        show_error=False,
        allowed_paths=[str(page.out)],
        quiet=True,
    )
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        image = [handle_file(str(world.inputs["image"]))] if flavour == "wan-i2v" else []
        image = [None] if flavour == "wan2.2-ti2v" else image  # optional there
        mode = next(iter(MODES))  # both CFG branches
        args = (PROMPT, K, 1.0, mode, SEED, STEPS, cfg.guidance_scale, *image)
        client.predict(*args, api_name="/generate")
        if flavour == "wan-i2v":  # the image is required: one message on the page
            with pytest.raises(Exception, match="from an image: upload one"):
                client.predict(*args[:-1], None, api_name="/generate")
    finally:
        app.close()
    inputs = ("image",) if flavour == "wan-i2v" else ()
    np.testing.assert_array_equal(
        written["memory.mp4"], python_frames(world, flavour, inputs=inputs)
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_eval_generate_equals_python(world, flavour, written, tmp_path):
    from dit_mem.evaluation import benchmarks as B
    from dit_mem.evaluation.plan import plan_vbench

    job = plan_vbench(B.vbench_prompt_lists())[0]
    args = ["eval", "vbench", "generate", "--run", str(tmp_path / "run"), "--limit", "1"]
    args += ["--no-progress", *input_options(world, flavour)]
    assert main([*args, *as_overrides(settings(world, flavour))]) == 0
    want = python_frames(world, flavour, job.prompt, job.seed, INPUTS.get(flavour, ()))
    np.testing.assert_array_equal(written[Path(job.relpath).name], want)


# ======================================================================================
# What each flavour adds is in effect through the front doors
# ======================================================================================
def test_a14b_second_expert_is_used(world, written, tmp_path):
    """The CLI loads both experts: equal experts give another video than distinct ones."""
    import shutil

    twin = tmp_path / "a14b-equal"
    shutil.copytree(world.models["wan2.2-a14b"], twin)
    shutil.rmtree(twin / "transformer_2")
    shutil.copytree(twin / "transformer", twin / "transformer_2")
    frames = {}
    for name, model in (("distinct", world.models["wan2.2-a14b"]), ("equal", twin)):
        args = ["generate", "--prompt", PROMPT, "--name", name, "--out", str(tmp_path / name)]
        assert main([*args, *as_overrides(settings(world, "wan2.2-a14b", model))]) == 0
        frames[name] = written[f"{name}.mp4"]
    assert not np.array_equal(frames["distinct"], frames["equal"])
    np.testing.assert_array_equal(frames["equal"], python_frames(world, "wan2.2-a14b", model=twin))


def test_ti2v_image_conditions_the_first_frame_through_per_token_timesteps(
    world, written, tmp_path
):
    from diffusers import WanTransformer3DModel

    timesteps = []
    original = WanTransformer3DModel.forward

    def recording(self, *args, **kwargs):  # every transformer call's timesteps
        timesteps.append(kwargs["timestep"].detach().clone())
        return original(self, *args, **kwargs)

    WanTransformer3DModel.forward = recording
    try:
        args = ["generate", "--prompt", PROMPT, "--name", "i2v", "--out", str(tmp_path)]
        args += ["--image", str(world.inputs["image"])]
        assert main([*args, *as_overrides(settings(world, "wan2.2-ti2v"))]) == 0
    finally:
        WanTransformer3DModel.forward = original
    t = timesteps[0]
    assert t.ndim == 2  # per-token timesteps
    first_frame = (TINY_GEOMETRY["wan"][1] // 16) * (TINY_GEOMETRY["wan"][2] // 16)
    assert bool((t[:, :first_frame] == 0).all()) and bool((t[:, first_frame:] > 0).all())
    with_image = written["i2v.mp4"]
    np.testing.assert_array_equal(
        with_image, python_frames(world, "wan2.2-ti2v", inputs=("image",))
    )
    assert not np.array_equal(with_image, python_frames(world, "wan2.2-ti2v"))


def test_vace_control_video_is_used(world):
    plain = python_frames(world, "wan-vace")
    assert not np.array_equal(plain, python_frames(world, "wan-vace", inputs=INPUTS["wan-vace"]))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "needs an image: --image PATH"),
        (["--video", "X"], "gives video, but a DiTMemWanImageToVideoPipeline"),
    ],
)
def test_i2v_inputs_are_checked_in_one_line(world, tmp_path, capsys, args, message):
    args = [a.replace("X", str(world.inputs["video"])) for a in args]
    cmd = ["generate", "--prompt", PROMPT, "--out", str(tmp_path), *args]
    assert main([*cmd, *as_overrides(settings(world, "wan-i2v"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written


def test_t2v_refuses_an_image(world, tmp_path, capsys):
    cmd = ["generate", "--prompt", PROMPT, "--out", str(tmp_path)]
    cmd += ["--image", str(world.inputs["image"]), *as_overrides(settings(world, "ltx"))]
    assert main(cmd) == 2
    assert "takes no conditioning input" in capsys.readouterr().err


# ======================================================================================
# Training: dit-mem train = train() from Python, the family's flow settings
# ======================================================================================
TRAINABLE = ["wan2.1", "wan2.2-ti2v", "wan2.2-a14b", "ltx", "hunyuan15"]


def train_overrides(world: World, flavour: str, out: Path) -> list[str]:
    import pandas as pd

    family = family_of_flavour(flavour)
    bank = world.banks[family]
    csv = world.root / "train.csv"
    if not csv.is_file():
        table = pd.read_csv(world.root / "memory.csv").iloc[:4]
        table.to_csv(csv, index=False)
    return [
        f"output_dir={out}",
        f"data.train_csv={csv}",
        f"data.bank={bank}",
        f"data.latent_dir={bank / 'latents'}",
        f"data.k={K}",
        "data.max_text_tokens=16",
        f"model.base_model_dir={world.models[flavour]}",
        "model.encoder_preset=tiny",
        "model.dit_dtype=fp32",
        "model.text_encoder_dtype=fp32",
        "mixed_precision=no",
        "max_steps=2",
        "checkpoint_every=2",
        "log_with=none",
        "progress_bar=false",
    ]


def expected_shift(world: World, flavour: str) -> float:
    family = family_of_flavour(flavour)
    if family == "wan":
        return 5.0  # SPEC §5
    scheduler = json.loads((world.models[flavour] / "scheduler/scheduler_config.json").read_text())
    if family == "hunyuan15":
        return scheduler["shift"]
    t, h, w = 5, 8, 8  # LTX: exp(mu) of the latent's token count ([16, 5, 8, 8])
    slope = (scheduler["max_shift"] - scheduler["base_shift"]) / (
        scheduler["max_image_seq_len"] - scheduler["base_image_seq_len"]
    )
    mu = t * h * w * slope + scheduler["base_shift"] - slope * scheduler["base_image_seq_len"]
    return math.exp(mu)


@pytest.mark.parametrize("flavour", TRAINABLE)
def test_train_cli_equals_python(world, flavour, tmp_path, capsys):
    from safetensors.torch import load_file

    from dit_mem.training import load_train_config, train

    result = train(load_train_config(None, train_overrides(world, flavour, tmp_path / "py")))
    assert main(["train", *train_overrides(world, flavour, tmp_path / "cli")]) == 0
    log = capsys.readouterr().err
    shift = expected_shift(world, flavour)
    assert f"flow matching: shift {shift:.4g}" in log
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["loss"]["flow_shift"] == pytest.approx(shift, rel=1e-9)
    assert saved["loss"]["weighting"] == ("wan" if flavour.startswith("wan") else "none")
    metrics = (tmp_path / "cli" / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[2]) for row in metrics]
    assert losses == pytest.approx(result.losses, rel=1e-6)  # (metrics.csv: 7 digits)
    weights = [
        load_file(p / "encoder" / "diffusion_pytorch_model.safetensors")
        for p in (
            tmp_path / "py",
            tmp_path / "cli",
        )
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a14b_training_runs_each_expert_on_its_timesteps(world, tmp_path):
    from dit_mem.training.trainer import FrozenDiT

    dit = FrozenDiT.from_pretrained(world.models["wan2.2-a14b"], torch.float32, 16)
    assert dit.transformer_2 is not None and dit.boundary == pytest.approx(875.0)
    calls = []
    for name, expert in (("high", dit.transformer), ("low", dit.transformer_2)):
        expert.register_forward_pre_hook(
            lambda m, a, kw, name=name: calls.append((name, kw["timestep"].tolist())),
            with_kwargs=True,
        )
    x = torch.randn(2, 16, 5, 8, 8)
    text = [{"encoder_hidden_states": torch.randn(3, 32)}] * 2
    dit(x, torch.tensor([900.0, 100.0]), text, None)
    assert calls == [("high", [900.0]), ("low", [100.0])]


@pytest.mark.parametrize("flavour", ["wan-i2v", "wan-vace"])
def test_train_refuses_image_and_control_models_in_one_line(world, flavour, tmp_path, capsys):
    assert main(["train", *train_overrides(world, flavour, tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trains the memory encoder against a text-to-video model" in err[0]


# ======================================================================================
# A bank knows whose latents it holds
# ======================================================================================
def test_a_bank_of_another_family_is_refused_at_every_door(world, tmp_path, capsys):
    from dit_mem import DiTMemPipeline

    pipe = DiTMemPipeline.from_pretrained(world.models["ltx"], dtype=torch.float32)
    with pytest.raises(ValueError, match="latents of a wan VAE .*the ltx family"):
        pipe.load_memory(world.root / "encoder", bank=world.banks["wan"])
    cmd = ["generate", "--prompt", PROMPT, "--out", str(tmp_path / "g")]
    assert main([*cmd, *as_overrides(settings(world, "ltx", bank=world.banks["wan"]))]) == 2
    assert "latents of a wan VAE" in capsys.readouterr().err
    overrides = train_overrides(world, "ltx", tmp_path / "t")
    overrides = [o.replace("bank-ltx", "bank-wan") for o in overrides]
    assert main(["train", *overrides]) == 2
    assert "latents of a wan VAE" in capsys.readouterr().err


def test_a_bank_of_another_vae_of_the_same_family_is_refused(world, tmp_path):
    """Another Wan VAE (other weights, same class and statistics) is told apart by fingerprint."""
    import shutil

    from dit_mem import DiTMemPipeline

    other = tmp_path / "other-vae"
    shutil.copytree(world.models["wan2.1"], other)
    pipe = DiTMemPipeline.from_pretrained(other, dtype=torch.float32)
    with torch.no_grad():
        next(pipe.vae.parameters()).add_(0.5)
    with pytest.raises(ValueError, match="encoded by another AutoencoderKLWan"):
        pipe.load_memory(world.root / "encoder", bank=world.banks["wan"])


def test_token_only_bank_through_dit_mem_generate(world, written, tmp_path):
    """An exported bank (index + tokens, no latents, no videos) generates from the CLI; the
    sidecar says which memory videos had no preview."""
    args = ["bank", "export", "--bank", str(world.banks["wan"]), "--encoder"]
    args += [str(world.root / "encoder"), "--out", str(tmp_path / "shared")]
    assert main(args) == 0
    out = tmp_path / "out"
    cmd = ["generate", "--prompt", PROMPT, "--name", "v", "--out", str(out)]
    kv = settings(world, "wan2.1", bank=tmp_path / "shared")
    assert main([*cmd, *as_overrides(kv)]) == 0
    sidecar = json.loads((out / "v.json").read_text())
    assert sidecar["no_preview"] == [r["id"] for r in sidecar["retrieved"]]
    want = python_frames(world, "wan2.1", bank=tmp_path / "shared")  # its bf16 tokens
    np.testing.assert_array_equal(written["v.mp4"], want)
