"""Memory in the stock diffusers pipelines of every family, the way diffusers add-ons are used.

    pipe = DiTMemPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16)
    pipe.load_memory("checkpoint/DiT-Mem-1.3B.safetensors", bank="memory_bank/")
    out = pipe("a dog runs on the beach", memory="retrieve")    # out.frames, out.memory

Each pipeline here is a stock one plus :class:`MemoryPipelineMixin`: ``DiTMemPipeline``
(``WanPipeline``: Wan2.1 / Wan2.2 T2V, TI2V, A14B), ``DiTMemWanImageToVideoPipeline``,
``DiTMemWanVACEPipeline``, ``DiTMemLTXPipeline`` and ``DiTMemHunyuanVideo15Pipeline``.
``__call__`` takes the stock ``__call__``'s whole signature and runs it: the loop, the scheduler,
guidance (a diffusers guider included), callbacks and outputs are stock diffusers. Memory adds
``memory`` (``"retrieve"``, a ``MemoryTokens``, or ``None``), ``negative_memory`` (the
unconditional rows' memory: by default the same, as in the paper; ``None`` for the conditional
rows only), ``memory_scale`` (λ; 0 turns memory off) and ``k``. Without memory the call is the
stock pipeline's, bit for bit. ``DiTMemPipeline.from_pretrained`` picks the flavour from the
folder's ``model_index.json``, as diffusers' ``AutoPipelineFor*`` classes do.
"""

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    ClassifierFreeGuidance,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    T5EncoderModel,
    T5TokenizerFast,
    UMT5EncoderModel,
)

from dit_mem.backbone.families.wan import WAN_NEGATIVE_PROMPT  # noqa: F401 (re-exported)
from dit_mem.backbone.injection import (
    MEMORY_STRENGTH_KEY,
    MEMORY_TOKENS_KEY,
    NEGATIVE_MEMORY_TOKENS_KEY,
    experts,
    get_attachment,
)
from dit_mem.errors import UserError
from dit_mem.loaders import MemoryLoaderMixin
from dit_mem.memory.encoder import MemoryEncoder
from dit_mem.memory.tokens import MemoryTokens, as_memory_tokens, check_memory_scale
from dit_mem.models.base_model import (
    STOCK_PIPELINES,
    BaseModel,
    component_names,
    describe_base_model,
)
from dit_mem.models.wan import COMPONENTS as WAN_COMPONENTS
from dit_mem.models.wan import load_wan_components
from dit_mem.retrieval.retriever import RetrievalResult
from dit_mem.utils.logging import get_logger

logger = get_logger(__name__)

RETRIEVE = "retrieve"
MEMORY_RECORD = "memory.json"  # beside model_index.json: the memory a saved pipeline had
MEMORY_RECORD_FORMAT = "dit-mem-pipeline-memory/1"
MEMORY_ARGUMENTS = ("memory", "negative_memory", "memory_scale", "k")


class _Same:
    """The default of ``negative_memory``: the conditional rows' memory."""

    def __repr__(self) -> str:
        return "SAME"


SAME = _Same()
NO_MEMORY = "none"  # negative_memory="none": no memory in the unconditional branch (as None)


@dataclass
class DiTMemPipelineOutput(WanPipelineOutput):
    """The stock output (``frames``) plus what memory was retrieved for each prompt (``None``:
    none). ``to_tuple()`` (and ``return_dict=False``) gives ``(frames,)``, or ``(frames, memory)``.
    """

    memory: list[RetrievalResult] | None = None


class MemoryPipelineMixin(MemoryLoaderMixin):
    """``__call__`` with memory around a stock pipeline's (see the module docstring)."""

    _stock: type[DiffusionPipeline]  # the stock pipeline this flavour extends

    def __init_subclass__(cls, **kwargs):
        """A flavour (``class F(MemoryPipelineMixin, StockPipeline)``) derives from its stock
        pipeline: the ``memory_encoder`` optional component, the offload order with the encoder
        before the transformer, and ``__call__`` with the stock signature plus memory's. A user's
        subclass of a flavour inherits them."""
        super().__init_subclass__(**kwargs)
        stocks = [b for b in cls.__bases__ if not issubclass(b, MemoryPipelineMixin)]
        if not stocks:
            return
        stock = cls._stock = stocks[0]
        cls._optional_components = [*stock._optional_components, "memory_encoder"]
        seq = stock.model_cpu_offload_seq.replace("transformer", "memory_encoder->transformer", 1)
        cls.model_cpu_offload_seq = seq
        cls.__call__ = _memory_call(stock)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, memory_bank: Any = SAME, **kwargs):
        """diffusers' ``from_pretrained``; ``DiTMemPipeline.from_pretrained`` gives the flavour the
        folder's ``model_index.json`` names (a ``WanVACEPipeline`` folder gives a
        ``DiTMemWanVACEPipeline``, and so on).

        A pipeline saved with memory loaded comes back with it: its ``memory_encoder`` attached
        to every expert at the saved scale and route, and the bank its ``memory.json`` names
        opened again; ``memory_bank=`` gives another bank (a ``MemoryBank``, a folder or Hub id),
        or ``None`` for none.
        """
        hub = {
            k: kwargs[k]
            for k in ("cache_dir", "revision", "token", "local_files_only")
            if k in kwargs
        }
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **hub)
        # DiTMemPipeline picks the flavour, as AutoPipeline does; a named flavour is that class
        # (a Wan2.2 TI2V folder loads as DiTMemWanImageToVideoPipeline too, as in diffusers)
        flavour = FLAVOURS.get(config.get("_class_name"), cls) if cls is DiTMemPipeline else cls
        if flavour is not cls:
            logger.info(
                "%s holds a %s: loading %s",
                pretrained_model_name_or_path,
                config["_class_name"],
                flavour.__name__,
            )
        pipe = super(MemoryPipelineMixin, flavour).from_pretrained(
            pretrained_model_name_or_path, **kwargs
        )
        if getattr(pipe, "memory_encoder", None) is not None:
            pipe._restore_memory(pretrained_model_name_or_path, memory_bank, hub)
        return pipe

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``; with memory loaded, the encoder is saved as the
        ``memory_encoder`` component and ``memory.json`` records the scale, the route and where
        the bank is (a reference: the bank itself is not copied), so ``from_pretrained`` gives
        the pipeline back with its memory."""
        from dit_mem.utils import write_json_atomic

        record = self._memory_record()
        folder = Path(save_directory)
        if record is not None:  # before the stock save, which may push the folder to the Hub
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / MEMORY_RECORD, record)
        elif (folder / MEMORY_RECORD).is_file():
            (folder / MEMORY_RECORD).unlink()  # no memory now: a stale record would restore one
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _memory_record(self) -> dict | None:
        if getattr(self, "memory_encoder", None) is None:
            return None
        models = experts(self)
        attachment = get_attachment(models[0]) if models else None
        bank = self.memory_bank
        if bank is not None and getattr(bank, "source", None) is None:
            logger.warning("the memory bank has no source to record: it is not saved")
        return {
            "format": MEMORY_RECORD_FORMAT,
            "attached": attachment is not None,
            "scale": self._memory_scale,
            "route": attachment.route if attachment is not None else "auto",
            "bank": getattr(bank, "source", None),
        }

    def _restore_memory(self, source, memory_bank: Any, hub: dict) -> None:
        from dit_mem.bank import MemoryBank
        from dit_mem.utils.io import read_json_mapping

        path = Path(source) / MEMORY_RECORD
        if not path.is_file():
            if Path(source).exists():
                path = None
            else:
                from dit_mem.utils.hub import resolve_file

                try:
                    path = resolve_file(source, MEMORY_RECORD, **hub)
                except FileNotFoundError:
                    path = None
        record = {"attached": True, "scale": 1.0, "route": "auto", "bank": None}
        if path is not None:
            record |= read_json_mapping(path)
            if record.get("format") != MEMORY_RECORD_FORMAT:
                raise UserError(f"{path}: not a {MEMORY_RECORD_FORMAT} record")
        bank = memory_bank
        if bank is SAME:
            bank = None
            if record["bank"] is not None:
                try:
                    options = {k: v for k, v in hub.items() if k != "revision"}
                    bank = MemoryBank.from_source(record["bank"], **options)
                except (OSError, ValueError) as e:
                    raise FileNotFoundError(
                        f"{path}: the memory bank it names cannot be opened ({e}); pass "
                        "memory_bank= (a MemoryBank, a bank folder or Hub id, or None for none)"
                    ) from None
        if record["attached"]:
            self.load_memory(
                self.memory_encoder, bank=bank, scale=record["scale"], route=record["route"]
            )
        else:
            self.memory_bank = (
                bank
                if bank is None or isinstance(bank, MemoryBank)
                else (MemoryBank.from_pretrained(bank))
            )
            self.set_memory_scale(record["scale"])

    def _call_with_memory(self, args, kwargs, memory, negative_memory, memory_scale, k):
        call = inspect.signature(self._stock.__call__).bind(self, *args, **kwargs).arguments
        del call["self"]
        scale = self._memory_scale if memory_scale is None else check_memory_scale(memory_scale)
        attention_kwargs, hits = memory_call(
            self,
            memory,
            negative_memory,
            scale,
            k,
            prompt=call.get("prompt"),
            prompt_embeds=call.get("prompt_embeds"),
            per_prompt=call.get("num_videos_per_prompt") or 1,
            attention_kwargs=call.get("attention_kwargs"),
            load_hint="pipe.load_memory(encoder, bank=...)",
        )
        # the stock call, memory (if any) in attention_kwargs (the transformer's hook takes it)
        output = self._stock.__call__(self, **{**call, "attention_kwargs": attention_kwargs})
        return self._output(output, hits, call)

    @staticmethod
    def _output(output, hits, call: dict):
        if not call.get("return_dict", True):
            return tuple(output) if hits is None else (*output, hits)
        return DiTMemPipelineOutput(frames=output.frames, memory=hits)


# --------------------------------------------------------------------------------------
# One call's memory: every pipeline (ours, and modular ones through dit_mem.modular) uses this
# --------------------------------------------------------------------------------------
def memory_call(
    pipe: Any,
    memory: Any,
    negative_memory: Any,
    scale: float,
    k: int,
    *,
    prompt: str | list[str] | None,
    prompt_embeds: torch.Tensor | None,
    per_prompt: int,
    attention_kwargs: dict | None,
    load_hint: str,
) -> tuple[dict | None, list[RetrievalResult] | None]:
    """``attention_kwargs`` carrying a call's memory, and what was retrieved (``None``: given).

    ``pipe``: a pipeline, or a modular pipeline's components (its experts, ``memory_bank``,
    ``memory_encoder``, ``vae`` and execution device are read). ``memory``: ``"retrieve"`` (the
    top ``k`` of the bank for each prompt, encoded by the encoder; the VAE fills a lazy bank),
    ``MemoryTokens`` or a dense tensor; broadcast like the prompts (one per prompt ×
    ``per_prompt`` videos) and cast to the execution device and the experts' dtype
    (``load_hint`` says how to load memory).
    ``negative_memory``: :data:`SAME`, ``None`` (or ``"none"``, where ``None`` means "not
    given", as in modular pipelines) or memory of its own. Without memory (``None``, or λ = 0)
    the given ``attention_kwargs`` come back as they are (the stock call).
    """
    given = [key for key in attention_kwargs or {} if "memory" in key]
    models = experts(pipe) if getattr(pipe, "transformer", None) is not None else []
    attached = bool(models) and all(get_attachment(m) is not None for m in models)
    if memory is None or scale == 0:
        if memory is None and negative_memory is not SAME and negative_memory is not None:
            raise UserError("negative_memory was given without memory")
        if given and not attached:
            raise UserError(
                f"attention_kwargs carry {given}, but no memory is attached to this pipeline: "
                "call pipe.load_memory(...) (or dit_mem.attach_memory(pipe)) first"
            )
        return attention_kwargs, None
    if given:
        raise UserError(f"give memory as memory=..., not also in attention_kwargs ({given})")
    if not attached:
        raise UserError(
            f"memory was given, but this pipeline has none loaded: call {load_hint} first (or "
            "dit_mem.attach_memory(pipe) to pass MemoryTokens)"
        )
    device = pipe._execution_device
    if isinstance(prompt, str | list):
        batch = 1 if isinstance(prompt, str) else len(prompt)
    elif prompt_embeds is not None:
        batch = prompt_embeds.shape[0]
    else:
        raise UserError("Provide either `prompt` or `prompt_embeds`.")
    hits = None
    if isinstance(memory, str):
        if memory != RETRIEVE:
            raise UserError(f"memory must be {RETRIEVE!r}, MemoryTokens or None, got {memory!r}")
        bank, encoder = getattr(pipe, "memory_bank", None), getattr(pipe, "memory_encoder", None)
        memory, hits = _retrieve(
            bank, encoder, prompt, k, device, getattr(pipe, "vae", None), load_hint
        )

    def prepare(given: Any, name: str) -> MemoryTokens:
        return _broadcast(given, name, batch, per_prompt).to(device=device, dtype=models[0].dtype)

    kwargs = {**(attention_kwargs or {}), MEMORY_TOKENS_KEY: prepare(memory, "memory")}
    kwargs[MEMORY_STRENGTH_KEY] = scale
    if isinstance(negative_memory, str):
        if negative_memory != NO_MEMORY:
            raise UserError(
                f"negative_memory must be MemoryTokens, None ({NO_MEMORY!r}) or the default (same)"
            )
        negative_memory = None
    if negative_memory is not SAME:  # the unconditional rows' own memory (or none)
        kwargs[NEGATIVE_MEMORY_TOKENS_KEY] = (
            None if negative_memory is None else prepare(negative_memory, "negative_memory")
        )
    return kwargs, hits


def _broadcast(given: Any, name: str, batch: int, per_prompt: int) -> MemoryTokens:
    """Checked memory for ``batch`` prompts × ``per_prompt`` videos (shared, one per prompt
    repeated prompt-major as the prompt embeddings, or one per video)."""
    if isinstance(given, str):
        raise UserError(
            f"{name} must be MemoryTokens, a dense [B, L, D] tensor, {RETRIEVE!r} or None"
        )
    given = as_memory_tokens(given, name)
    if given.batch_size == batch and per_prompt > 1:
        return given.repeat_batch(per_prompt)
    if given.batch_size not in (1, batch * per_prompt):
        raise UserError(
            f"{name} has batch {given.batch_size}; expected 1 (shared), {batch} (one per "
            f"prompt) or {batch * per_prompt} (one per video)"
        )
    return given


def _retrieve(bank, encoder, prompt, k: int, device, vae, load_hint: str):
    """``(memory, hits)``: the top ``k`` of ``bank`` for each prompt, encoded by ``encoder`` (the
    VAE fills a lazy bank's videos on first use)."""
    if bank is None or encoder is None:
        raise UserError(f'memory="retrieve" needs a memory bank and encoder: {load_hint}')
    if prompt is None:
        raise UserError('memory="retrieve" needs the prompt text (not only prompt_embeds)')
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"k must be an integer ≥ 1, got {k!r}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return bank.memory(prompts, encoder, k=k, device=device, vae=vae)


# --------------------------------------------------------------------------------------
# The flavours: a stock pipeline + the mixin + an optional ``memory_encoder`` component
# --------------------------------------------------------------------------------------
def _memory_call(stock: type[DiffusionPipeline]):
    """The ``__call__`` of a flavour: the stock ``__call__``'s arguments, then memory's.

    The signature is the stock's with :data:`MEMORY_ARGUMENTS` appended, so ``help()``, IDEs and
    :meth:`inspect.signature` show every argument without this module repeating twenty of them.
    """

    @torch.no_grad()
    def __call__(self, *args, memory=None, negative_memory=SAME, memory_scale=None, k=5, **kwargs):
        """The stock ``__call__`` (every argument), with memory.

        Args:
            memory: ``"retrieve"`` (the top-``k`` videos of the loaded bank for each prompt,
                encoded by the loaded encoder), ``MemoryTokens`` (batch 1, one per prompt, or one
                per video), a dense ``[B, L, D]`` tensor, or ``None`` (the stock pipeline).
            negative_memory: the unconditional rows' memory; by default the same (the paper),
                ``None`` (or ``"none"``) for the conditional rows only, or other ``MemoryTokens``.
            memory_scale: λ for this call (default: :meth:`set_memory_scale`'s, 1); 0: off.
            k: videos to retrieve per prompt.

        Returns a :class:`DiTMemPipelineOutput` (``frames``, ``memory``: what was retrieved).
        """
        return self._call_with_memory(args, kwargs, memory, negative_memory, memory_scale, k)

    stock_call = inspect.signature(stock.__call__)
    ours = [p for n, p in inspect.signature(__call__).parameters.items() if n in MEMORY_ARGUMENTS]
    __call__.__signature__ = stock_call.replace(parameters=[*stock_call.parameters.values(), *ours])
    return __call__


class DiTMemPipeline(MemoryPipelineMixin, WanPipeline):
    """``WanPipeline`` (Wan2.1 / Wan2.2 T2V, TI2V, A14B) with DiT-Mem's memory."""

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        memory_encoder: MemoryEncoder | None = None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        self.register_modules(memory_encoder=memory_encoder)


class DiTMemWanImageToVideoPipeline(MemoryPipelineMixin, WanImageToVideoPipeline):
    """``WanImageToVideoPipeline`` (Wan2.1 / Wan2.2 I2V) with DiT-Mem's memory."""

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        image_processor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModel = None,
        transformer: WanTransformer3DModel = None,
        transformer_2: WanTransformer3DModel = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        memory_encoder: MemoryEncoder | None = None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            image_processor=image_processor,
            image_encoder=image_encoder,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        self.register_modules(memory_encoder=memory_encoder)


class DiTMemWanVACEPipeline(MemoryPipelineMixin, WanVACEPipeline):
    """``WanVACEPipeline`` (Wan2.1 VACE) with DiT-Mem's memory."""

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanVACETransformer3DModel = None,
        transformer_2: WanVACETransformer3DModel = None,
        boundary_ratio: float | None = None,
        memory_encoder: MemoryEncoder | None = None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
        )
        self.register_modules(memory_encoder=memory_encoder)


class DiTMemLTXPipeline(MemoryPipelineMixin, LTXPipeline):
    """``LTXPipeline`` (LTX-Video) with DiT-Mem's memory."""

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLLTXVideo,
        text_encoder: T5EncoderModel,
        tokenizer: T5TokenizerFast,
        transformer: LTXVideoTransformer3DModel,
        memory_encoder: MemoryEncoder | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        self.register_modules(memory_encoder=memory_encoder)


class DiTMemHunyuanVideo15Pipeline(MemoryPipelineMixin, HunyuanVideo15Pipeline):
    """``HunyuanVideo15Pipeline`` (HunyuanVideo-1.5 T2V) with DiT-Mem's memory."""

    def __init__(
        self,
        text_encoder: Qwen2_5_VLTextModel,
        tokenizer: Qwen2Tokenizer,
        transformer: HunyuanVideo15Transformer3DModel,
        vae: AutoencoderKLHunyuanVideo15,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: ByT5Tokenizer,
        guider: ClassifierFreeGuidance,
        memory_encoder: MemoryEncoder | None = None,
    ):
        super().__init__(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            guider=guider,
        )
        self.register_modules(memory_encoder=memory_encoder)


_BY_STOCK = {
    flavour._stock.__name__: flavour
    for flavour in (
        DiTMemPipeline,
        DiTMemWanImageToVideoPipeline,
        DiTMemWanVACEPipeline,
        DiTMemLTXPipeline,
        DiTMemHunyuanVideo15Pipeline,
    )
}
# stock and saved class names (model_index.json's "_class_name") → flavour: the names
# dit_mem.models reads a folder by, each to the flavour of its stock pipeline
FLAVOURS: dict[str, type] = {name: _BY_STOCK[stock] for name, stock in STOCK_PIPELINES.items()}


def flavour_of(stock_name: str) -> type:
    """The memory pipeline for a stock pipeline class name (``ValueError`` if none)."""
    if stock_name not in FLAVOURS:
        known = sorted({f._stock.__name__ for f in FLAVOURS.values()})
        raise UserError(f"no memory pipeline for {stock_name!r}; supported: {', '.join(known)}")
    return FLAVOURS[stock_name]


def runner_of(base: BaseModel, image: bool = False) -> type:
    """The memory flavour that runs a call on ``base``; ``image``: the call has an image."""
    return flavour_of(base.stock_runner(image).__name__)


def load_base_model(
    source: str | Path | BaseModel,
    dtype: torch.dtype = torch.bfloat16,
    *,
    skip: tuple[str, ...] = (),
    vae_dtype: torch.dtype | None = None,
):
    """A base model folder (either layout, or a Hub id) as its memory flavour: a diffusers folder
    through the flavour's own ``from_pretrained`` (picked from ``model_index.json``), so all the
    folder carries is kept (both experts and ``boundary_ratio`` of Wan2.2 A14B,
    ``expand_timesteps`` of Wan2.2 TI2V, its scheduler); the original Wan2.1 release layout
    becomes the same pipeline as its diffusers twin. Generation and training load here.

    ``skip``: components left out (``None``); ``vae_dtype``: the VAE's dtype (default ``dtype``).
    """
    base = describe_base_model(source)
    skip = tuple(c for c in skip if c not in base.family.init_components)
    if base.layout == "diffusers":
        dtypes = dtype if vae_dtype is None else {"default": dtype, "vae": vae_dtype}
        return flavour_of(base.pipeline).from_pretrained(
            base.folder, dtype=dtypes, **dict.fromkeys(skip), memory_bank=None
        )
    wanted = [c for c in WAN_COMPONENTS if c not in skip]
    parts = load_wan_components(base.folder, dtype, components=wanted, vae_dtype=vae_dtype or dtype)
    scheduler = None
    if "scheduler" not in skip:
        import diffusers

        config = parts.scheduler_config
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    components = {k: getattr(parts, k) for k in ("tokenizer", "text_encoder", "transformer", "vae")}
    return flavour_of(base.pipeline)(**components, scheduler=scheduler)


def load_transformers(source: str | Path | BaseModel, dtype: torch.dtype = torch.bfloat16):
    """``(experts, base)``: the base model's transformer(s), frozen (Wan2.2 A14B: two)."""
    base = describe_base_model(source)
    skip = tuple(c for c in component_names(base) if c not in base.experts)
    pipe = load_base_model(base, dtype, skip=skip)
    experts = [getattr(pipe, name).eval().requires_grad_(False) for name in base.experts]
    return experts, base
