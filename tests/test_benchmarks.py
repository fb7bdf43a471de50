"""Smoke test of ``benchmarks/memory_overhead.py`` at its reduced size on CPU (issue 7).

Also guards the benchmark's baseline: the paper's form (1,000 dense memory tokens as queries and
keys, ``dit_mem.backbone.reference``) must give the same transformer output as our injection
(10 distinct tokens with log-multiplicity bias) on every attention route.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_overhead.py"


@pytest.fixture(scope="module")
def bench():
    return load("memory_overhead")


@pytest.fixture(scope="module")
def result(bench):
    args = bench.parse_args(
        [
            "--device",
            "cpu",
            "--size",
            "reduced",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--threads",
            "2",
        ]
    )
    threads = torch.get_num_threads()
    try:
        yield bench.main(args)
    finally:
        torch.set_num_threads(threads)


EXPECTED_ROWS = {
    "none": "(1) no memory",
    "paper": "(2) paper",
    "ours-auto": "(3) ours, auto",
    "ours-lse": "(3) ours, lse",
    "ours-joint": "(3) ours, joint",
    "train-paper": "(4) paper form, UMT5 every step",
    "train-paper-cached": "(4) paper form, cached text",
    "train-ours": "(4) ours, auto (→ lse), cached text",
    "train-ours-umt5": "(4) ours, auto (→ lse), UMT5 every step",
}


def test_table_has_every_row(result):
    assert set(result.cases) == set(EXPECTED_ROWS)
    rows = [ln for ln in result.table.splitlines() if ln.startswith("| (")]
    assert len(rows) == len(EXPECTED_ROWS)
    for key, label in EXPECTED_ROWS.items():
        case = result.cases[key]
        assert case.label.startswith(label)
        assert len(case.times_ms) == 1 and case.median_ms > 0
        assert any(row.startswith(f"| {case.label} |") for row in rows)
    assert "reference" in rows[0] and "%" in rows[1]  # overhead over (1)
    assert "throughput" in rows[-1]  # training relative to the paper's form
    assert "torch" in result.header[1] and "diffusers" in result.header[1]


def test_paper_form_equals_ours(result):
    checks = result.checks
    assert checks["outputs finite"] == 1.0
    assert checks["memory effect (rel. diff none vs paper)"] > 1e-3  # memory matters here
    for route in ("auto", "lse", "joint"):
        assert checks[f"paper vs ours {route} (rel. diff)"] < 1e-5, route


@pytest.mark.parametrize("family", ["ltx", "hunyuan15"])
def test_every_family_runs_and_the_paper_form_equals_ours(bench, family):
    args = bench.parse_args(
        ["--family", family, "--device", "cpu", "--size", "reduced", "--repeats", "1"]
        + ["--warmup", "0", "--threads", "2", "--skip-training"]
    )
    out = bench.main(args)
    assert {"none", "paper", "ours-auto", "ours-joint"} <= set(out.cases)
    assert all(v < 1e-5 for k, v in out.checks.items() if k.startswith("paper vs ours"))


def test_bad_route_or_backend_is_rejected(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--routes", "flash"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--family", "hunyuan15", "--routes", "lse"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--attention-backend", "fast"])


def test_training_gradients_match(bench):
    """Both training steps (the package's training_loss with the paper's encoder and blocks, and
    with ours) give the encoder the same gradients (gradient checkpointing on)."""
    import functools

    from dit_mem import attach_memory, detach_memory
    from dit_mem.backbone.reference import PaperFormMemory, paper_encode
    from dit_mem.training.loss import FlowMatchingObjective
    from dit_mem.training.trainer import training_loss

    size = bench.get_size("wan", "reduced")
    device, dtype = torch.device("cpu"), torch.float32
    dit = bench.build_dit("wan", size, device, dtype)
    dit.transformer.enable_gradient_checkpointing()
    encoder = bench.build_encoder(size, device)  # eval: no dropout, no shuffling
    g = torch.Generator().manual_seed(0)
    batch = {
        "x0": torch.randn(1, *size.latent, generator=g),
        "memory": torch.randn(1, 2, *size.latent, generator=g),
        "text": bench.texts(dit, size, device),
    }
    objective = FlowMatchingObjective()

    def grads(model_encoder):
        encoder.zero_grad(set_to_none=True)
        loss = training_loss(dit, model_encoder, objective, batch, torch.Generator().manual_seed(7))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in encoder.parameters()]

    paper = PaperFormMemory(dit.transformer)
    loss_p, grads_p = grads(functools.partial(paper_encode, encoder))
    paper.remove()
    attach_memory(dit.transformer)
    loss_o, grads_o = grads(encoder)
    detach_memory(dit.transformer)
    assert loss_p == pytest.approx(loss_o, rel=1e-5)
    num = sum((a - b).pow(2).sum() for a, b in zip(grads_p, grads_o, strict=True))
    den = sum(b.pow(2).sum() for b in grads_o)
    assert den > 0 and (num / den).sqrt() < 1e-4
