"""diffusers' own tests of each family, run unchanged with memory attached and none given.

    git clone https://github.com/huggingface/diffusers && \\
    python benchmarks/peer_suites.py --tests diffusers/tests --family all

Runs each family's model tests from a diffusers checkout twice (two pytest processes in this
environment): once stock, once with every transformer of the family that the tests build getting
``attach_memory`` right after construction (its class's ``__init__`` wrapped for the session; a
model loaded with ``from_pretrained`` goes through it too). Memory is never given, so the
attached runs must pass exactly what the stock runs pass. ``--pipelines`` adds the family's
pipeline tests (they need Hub tokenizers: online, or a filled ``HF_HOME``).

Not a test of this repository: it needs diffusers' test folder, which its PyPI package does not
ship. The last results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODEL_TESTS = {
    "wan": ["test_models_transformer_wan.py", "test_models_transformer_wan_vace.py"],
    "ltx": ["test_models_transformer_ltx.py"],
    "hunyuan15": ["test_models_transformer_hunyuan_1_5.py"],
}
PIPELINE_TESTS = {
    "wan": [
        "wan/test_wan.py",
        "wan/test_wan_22.py",
        "wan/test_wan_image_to_video.py",
        "wan/test_wan_vace.py",
    ],
    "ltx": ["ltx/test_ltx.py"],
    "hunyuan15": ["hunyuan_video1_5/test_hunyuan_1_5.py"],
}


# -- as a pytest plugin (``-p peer_suites``, in the test process) ---------------------------
_ATTACHED: list[str] = []
_OUTCOMES: dict[str, str] = {}


def pytest_configure(config) -> None:
    family = os.environ.get("DIT_MEM_PEER_FAMILY")
    if family:
        stack = contextlib.ExitStack()
        stack.enter_context(memory_attached(family, _ATTACHED))
        config.add_cleanup(stack.close)


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":
        _OUTCOMES[report.nodeid] = report.outcome


def pytest_unconfigure(config) -> None:
    out = os.environ.get("DIT_MEM_PEER_OUT")
    if out:
        Path(out).write_text(json.dumps({"outcomes": _OUTCOMES, "attached": len(_ATTACHED)}))


@contextlib.contextmanager
def memory_attached(family_name: str, attached: list):
    """Every new transformer of the family gets ``attach_memory`` at the end of ``__init__``."""
    from dit_mem import attach_memory
    from dit_mem.backbone.families import families

    family = next(f for f in families() if f.name == family_name)
    originals = {cls: cls.__init__ for cls in family.injection.transformer_classes}

    def wrap(cls, init):
        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self) is cls:
                attach_memory(self)
                attached.append(type(self).__name__)

        return __init__

    for cls, init in originals.items():
        cls.__init__ = wrap(cls, init)
    try:
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


# -- the driver ---------------------------------------------------------------------------
def run(files: list[Path], family: str, with_memory: bool) -> tuple[dict[str, str], int]:
    """One pytest process over ``files``; ``(outcome per test id, models attached)``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DIT_MEM_PEER_OUT": str(Path(tmp) / "out.json")}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        if with_memory:
            env["DIT_MEM_PEER_FAMILY"] = family
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "peer_suites"]
        subprocess.run([*cmd, *map(str, files)], env=env, cwd=files[0].parents[3], check=False)
        result = json.loads((Path(tmp) / "out.json").read_text())
    return result["outcomes"], result["attached"]


def summarize(outcomes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing ran"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tests", type=Path, required=True, help="a diffusers checkout's tests/ folder"
    )
    ap.add_argument("--family", choices=(*MODEL_TESTS, "all"), default="all")
    ap.add_argument("--pipelines", action="store_true", help="also the family's pipeline tests")
    args = ap.parse_args(argv)
    if not (args.tests / "models" / "transformers").is_dir():
        raise SystemExit(f"{args.tests}: not diffusers' tests/ folder (no models/transformers/)")
    rows, same = [], True
    for family in MODEL_TESTS if args.family == "all" else [args.family]:
        files = [args.tests / "models" / "transformers" / f for f in MODEL_TESTS[family]]
        if args.pipelines:
            files += [args.tests / "pipelines" / f for f in PIPELINE_TESTS[family]]
        files = [f for f in files if f.is_file()]
        stock, _ = run(files, family, with_memory=False)
        ours, attached = run(files, family, with_memory=True)
        differ = sorted(k for k in stock.keys() | ours.keys() if stock.get(k) != ours.get(k))
        same &= not differ
        rows.append((family, summarize(stock), summarize(ours), attached, differ))
    print("\n| family | stock | memory attached, none given | models attached | differ |")
    print("|---|---|---|---:|---|")
    for family, stock, ours, attached, differ in rows:
        print(f"| {family} | {stock} | {ours} | {attached} | {', '.join(differ) or 'none'} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
