"""``dit-mem serve``: a web page that shows what memory retrieved, and what it did to the video.

    dit-mem serve                               # the shipped toy world, offline
    dit-mem serve --config config/generate.yaml # real weights, the same page

Prompt → **Retrieve**: the k memory videos (moving previews, captions, scores, ids) → **Generate**:
the video without memory and with memory side by side, the retrieval report, and the files to
download. A bank browser searches the bank's captions. The page only calls the library's front
door (``load_pipeline`` → ``DiTMemPipeline``, its ``MemoryBank``); requests run one at a time
through Gradio's queue (the pipeline keeps per-call state), and every bad input becomes a
message on the page while the server keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from dit_mem.errors import UserError, user_errors
from dit_mem.utils import get_logger

log = get_logger(__name__)

MODES = {
    "both CFG branches (the paper)": "both",
    "conditional branch only": "cond",
    "none (the base model)": "none",
}
TOY_EXAMPLES = [
    "a magenta circle moving left",
    "a magenta triangle moving down",
    "a magenta square moving left",
    "a yellow square moving down",
    "a cyan circle moving left",
    "a red triangle moving right",
]
REAL_EXAMPLES = [
    "a red fox running through fresh snow in a pine forest",
    "a dog runs on the beach at sunset",
    "a glass of water is knocked over on a wooden table",
]
PREVIEW_MAX_FRAMES = 17
DISPLAY_MIN_SIZE = 192  # small videos (the toy world's 32×32) are shown enlarged
KEPT_REQUESTS = 32  # request folders (previews, videos) kept on disk; older ones are deleted
CACHE = (300, 900)  # Gradio's file cache: swept every 5 min of files older than 15 (and at exit)


STEPS_MAX, GUIDANCE_MAX = 100, 12.0  # the sliders' ends, checked for API callers too


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def whole_number(value: Any, name: str, low: int, high: int | None = None) -> int:
    """A whole number from a page input (a number or its text); ``ValueError`` naming the field
    (a fraction is refused, never truncated)."""
    number = _number(value)
    if (
        not math.isfinite(number)
        or number != int(number)
        or number < low
        or (high is not None and number > high)
    ):
        within = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        raise UserError(f"{name} must be a whole number {within}, got {value!r}")
    return int(number)


def real_number(value: Any, name: str, low: float, high: float | None = None) -> float:
    """A finite number in ``[low, high]`` from a page input; ``ValueError`` naming the field."""
    number = _number(value)
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        within = f"in [{low:g}, {high:g}]" if high is not None else f"≥ {low:g}"
        raise UserError(f"{name} must be a number {within}, got {value!r}")
    return number


def _enlarged(frames: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement of ``[F, H, W, 3]`` so the short side is ≥ the display size."""
    scale = max(1, -(-DISPLAY_MIN_SIZE // min(frames.shape[1:3])))
    return frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames


def write_gif(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """An animated GIF of uint8 frames ``[F, H, W, 3]`` (enlarged when small)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in _enlarged(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


class MemoryPage:
    """The page's handlers around one loaded pipeline (see the module docstring)."""

    def __init__(self, pipe, cfg, examples: list[str], out_dir: Path | None = None):
        from dit_mem.generation import resolve_config
        from dit_mem.models.base_model import describe_base_model

        if getattr(pipe, "memory_bank", None) is None:
            raise UserError("the page needs a pipeline with memory loaded (no_memory=false)")
        base = describe_base_model(cfg.base_model)
        cfg = resolve_config(cfg, base)
        self.pipe, self.cfg, self.examples = pipe, cfg, examples
        # an image input where the flavour takes one (Wan I2V needs it; Wan2.2 TI2V may take it)
        self.takes_image = "image" in base.call_parameters(image=True)
        own = base.call_parameters().get("image")
        self.needs_image = own is not None and own.default is own.empty
        if cfg.k > self.bank_size:
            raise UserError(f"k={cfg.k} is larger than the bank ({self.bank_size} videos)")
        self.out = Path(out_dir or tempfile.mkdtemp(prefix="dit-mem-serve-"))
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def bank_size(self) -> int:
        return len(self.pipe.memory_bank)

    # ------------------------------------------------------------------ checks
    def _prompt(self, prompt: Any) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("Type a prompt first.")
        return prompt.strip()

    def _k(self, k: Any) -> int:
        k = whole_number(k, "k", 1)
        if k > self.bank_size:
            raise UserError(f"k = {k} is larger than the bank ({self.bank_size} videos)")
        return k

    def _scale(self, scale: Any) -> float:
        from dit_mem.memory.tokens import check_memory_scale

        number = _number(scale)
        if math.isnan(number):
            raise UserError(f"memory scale must be a number, got {scale!r}")
        return check_memory_scale(number)

    def _image(self, image: Any) -> dict[str, Path]:
        """The uploaded image (a path, or Gradio's file record of one) as the call's input."""
        if isinstance(image, dict):
            image = image.get("path")
        if image in (None, ""):
            if self.needs_image:
                raise UserError("This model makes a video from an image: upload one first.")
            return {}
        if not self.takes_image:
            raise UserError("This model takes no image.")
        if not isinstance(image, str) or not Path(image).is_file():
            raise UserError(f"image must be an uploaded image file, got {image!r}")
        return {"image": Path(image)}

    def _request_folder(self) -> Path:
        """A new folder for one request's files; only the newest :data:`KEPT_REQUESTS` stay."""
        import shutil

        folders = sorted(
            (p for p in self.out.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime
        )
        for old in folders[: max(0, len(folders) - KEPT_REQUESTS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        folder = self.out / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder

    # ------------------------------------------------------------------ actions
    def previews(self, ids: list[str], folder: Path) -> list[Path]:
        num_frames = min(self.cfg.num_frames, PREVIEW_MAX_FRAMES)  # the whole clip, when short
        frames = self.pipe.memory_bank.previews(ids, num_frames=num_frames, vae=self.pipe.vae)
        return [write_gif(f, folder / f"memory-{i + 1}.gif") for i, f in enumerate(frames)]

    def retrieve(self, prompt: Any, k: Any) -> tuple[list, list, dict]:
        """The k memory videos for ``prompt``: gallery ``[(gif, label)]``, table rows, report."""
        prompt, k = self._prompt(prompt), self._k(k)
        hit = self.pipe.memory_bank.retrieve([prompt], k)[0]
        gifs = self.previews(hit.ids, self._request_folder())
        records = hit.records()
        gallery = [
            (str(g), f"{r['rank']}. {r['caption']} ({r['score']:.3f}, {r['id']})")
            for g, r in zip(gifs, records, strict=True)
        ]
        table = [[r["rank"], r["id"], r["caption"], round(r["score"], 4)] for r in records]
        return gallery, table, {"prompt": prompt, "retrieved": records}

    def generate(
        self,
        prompt: Any,
        k: Any,
        scale: Any,
        mode: str,
        seed: Any,
        steps: Any,
        guidance: Any,
        image: Any = None,
    ) -> tuple:
        """Without and with memory, side by side; the report and the files to download."""
        from dit_mem.evaluation.video_io import write_mp4
        from dit_mem.generation import generate

        prompt, k, scale = self._prompt(prompt), self._k(k), self._scale(scale)
        inputs = self._image(image)
        if not isinstance(mode, str) or mode not in MODES:
            raise UserError(f"memory mode must be one of {', '.join(MODES)}; got {mode!r}")
        memory_mode = MODES[mode]
        try:
            cfg = dataclasses.replace(
                self.cfg,
                k=k,
                memory_strength=scale,
                memory_mode="both" if memory_mode == "none" else memory_mode,
                seed=whole_number(seed, "seed", 0),
                steps=whole_number(steps, "steps", 1, STEPS_MAX),
                guidance_scale=real_number(guidance, "guidance", 0.0, GUIDANCE_MAX),
            )
        except (TypeError, ValueError) as e:  # GenerationConfig checks every value
            raise UserError(str(e)) from None
        folder = self._request_folder()
        without = generate(self.pipe, cfg, prompt, cfg.seed, no_memory=True, inputs=inputs)
        files, shown = [], []
        runs = [("no_memory", without)]
        if memory_mode != "none":
            runs.append(("memory", generate(self.pipe, cfg, prompt, cfg.seed, inputs=inputs)))
        for name, result in runs:
            files.append(write_mp4(folder / f"{name}.mp4", result.frames, fps=cfg.fps))
            shown.append(
                write_mp4(folder / f"{name}_shown.mp4", _enlarged(result.frames), fps=cfg.fps)
            )
        report = {
            "prompt": prompt,
            "seed": cfg.seed,
            "memory_mode": memory_mode,
            "memory_scale": scale,
            "retrieved": runs[-1][1].retrieved.records() if memory_mode != "none" else [],
            "settings": runs[-1][1].settings,
        }
        sidecar = folder / "memory.json"
        sidecar.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        files.append(sidecar)
        gallery = []
        if memory_mode != "none":
            ids = [r["id"] for r in report["retrieved"]]
            gallery = [
                (str(g), f"{r['rank']}. {r['caption']} ({r['score']:.3f})")
                for g, r in zip(self.previews(ids, folder), report["retrieved"], strict=True)
            ]
        with_memory = str(shown[1]) if len(shown) > 1 else None
        return str(shown[0]), with_memory, report, [str(f) for f in files], gallery

    def search(self, query: Any, k: Any) -> tuple[list, list]:
        """Bank browser: the captions nearest to ``query`` (no previews needed to read them)."""
        gallery, table, _ = self.retrieve(query, whole_number(k, "hits", 1))
        return table, gallery


@contextlib.contextmanager
def _message_on_page():
    """A bad input (or a file problem) becomes a message on the page, not a stack trace."""
    import gradio as gr

    try:
        yield
    except (*user_errors(), FloatingPointError) as e:
        log.info("request refused: %s", e)  # one line in the server's log, not a traceback
        raise gr.Error(str(e), print_exception=False) from None


def _settings(page: MemoryPage):
    """The rows of settings: k, λ, memory mode; seed, steps, guidance."""
    import gradio as gr

    cfg = page.cfg
    with gr.Row():
        k = gr.Slider(
            1, min(max(10, cfg.k), page.bank_size), value=cfg.k, step=1, label="k (memory videos)"
        )
        scale = gr.Number(value=cfg.memory_strength, label="memory scale λ")
        mode = gr.Radio(list(MODES), value=next(iter(MODES)), label="memory mode")
    with gr.Row():
        seed = gr.Number(value=cfg.seed, minimum=0, step=1, label="seed")
        steps = gr.Slider(1, STEPS_MAX, value=cfg.steps, step=1, label="steps")
        guidance = gr.Slider(
            0.0, GUIDANCE_MAX, value=cfg.guidance_scale, step=0.5, label="guidance"
        )
    return k, scale, mode, seed, steps, guidance


def _bank_browser(page: MemoryPage):
    """The accordion that searches the bank's captions: its inputs, button and outputs."""
    import gradio as gr

    with gr.Accordion("Bank browser: search the bank's captions", open=False):
        with gr.Row():
            query = gr.Textbox(label="search captions", scale=4, elem_id="query")
            size = page.bank_size
            hits = gr.Slider(1, min(50, size), value=min(10, size), step=1, label="hits")
            search_btn = gr.Button("Search", elem_id="search")
        table = gr.Dataframe(headers=["rank", "id", "caption", "score"], label="hits")
        found = gr.Gallery(label="previews", columns=8, height="auto")
    return query, hits, search_btn, table, found


def build_app(page: MemoryPage):
    """The Gradio ``Blocks`` of the page (not launched)."""
    import gradio as gr

    cfg = page.cfg
    with gr.Blocks(title="DiT-Mem: memory for video diffusion", delete_cache=CACHE) as app:
        gr.Markdown(
            "# DiT-Mem: what memory retrieved, and what it did\n"
            f"Base model `{cfg.base_model}`, memory bank of **{page.bank_size} videos**. "
            "Type a prompt, **Retrieve** to see the memory videos it brings, **Generate** to "
            "compare the video without and with that memory."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", scale=4, elem_id="prompt")
            retrieve_btn = gr.Button("Retrieve", elem_id="retrieve")
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        gr.Examples(page.examples, inputs=[prompt], label="Example prompts")
        k, scale, mode, seed, steps, guidance = _settings(page)
        image = None
        if page.takes_image:
            label = "image (the first frame)" + ("" if page.needs_image else ", optional")
            image = gr.Image(type="filepath", label=label, elem_id="image")
        memory = gr.Gallery(label="Retrieved memory", columns=5, height="auto", elem_id="memory")
        with gr.Row():
            without = gr.Video(label="without memory", elem_id="without", autoplay=True, loop=True)
            with_memory = gr.Video(label="with memory", elem_id="with", autoplay=True, loop=True)
        report = gr.JSON(label="retrieval report")
        files = gr.File(label="download (mp4s and the JSON sidecar)", file_count="multiple")
        query, hits, search_btn, table, found = _bank_browser(page)

        def retrieve(prompt, k):
            with _message_on_page():
                gallery, _, record = page.retrieve(prompt, k)
                return gallery, record

        track = gr.Progress(track_tqdm=True)  # Gradio's way: the default marks the parameter

        def generate(prompt, k, scale, mode, seed, steps, guidance, image=None, progress=track):
            with _message_on_page():
                return page.generate(prompt, k, scale, mode, seed, steps, guidance, image)

        def search(query, hits):
            with _message_on_page():
                return page.search(query, hits)

        # preprocess=False: the handlers get the inputs as sent and check every one themselves
        # (Gradio's own conversion would fail on text in a number with a generic error, and
        # round a fractional seed without a word)
        raw = {"preprocess": False}
        retrieve_btn.click(retrieve, [prompt, k], [memory, report], api_name="retrieve", **raw)
        generate_btn.click(
            generate,
            [prompt, k, scale, mode, seed, steps, guidance, *([image] if image else [])],
            [without, with_memory, report, files, memory],
            api_name="generate",
            **raw,
        )
        search_btn.click(search, [query, hits], [table, found], api_name="search", **raw)
    return app


def serve(cfg, host: str = "127.0.0.1", port: int = 7860, examples: list[str] | None = None):
    """Load the pipeline of ``cfg`` once and serve the page (blocks until stopped)."""
    from dit_mem.generation import load_pipeline, resolve_config

    cfg = resolve_config(dataclasses.replace(cfg, progress=True))  # steps feed the page's bar
    pipe = load_pipeline(cfg)
    page = MemoryPage(pipe, cfg, examples or REAL_EXAMPLES)
    app = build_app(page)
    app.queue(default_concurrency_limit=1)  # one request at a time: a shared pipeline
    log.info("serving on http://%s:%d (outputs in %s)", host, port, page.out)
    import shutil
    import signal

    def stop(signum, frame):  # SIGTERM stops the server as Ctrl-C does, cleaning up
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        app.launch(
            server_name=host, server_port=port, show_error=False, allowed_paths=[str(page.out)]
        )
    finally:  # the request files go with the server (Gradio's cache too: delete_cache)
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(page.out, ignore_errors=True)
