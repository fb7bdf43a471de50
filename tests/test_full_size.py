"""``benchmarks/full_size.py`` on the tiny presets (issue 32), so the full-size dry run cannot rot.

The dry run builds each model on fake tensors and counts FLOPs; here the same code runs on the
test suite's tiny models, on a fake CPU and a fake CUDA device, and once on real tensors: fake
tensors must count exactly what real ones run. The value checks the dry run skips for fake
tensors must stay as strict as before for real ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "full_size.py"
KEYS = ("tflops_none", "tflops_memory", "tflops_paper", "train_tflops_memory", "train_tflops_paper")


@pytest.fixture(scope="module")
def full_size():
    return load("full_size")


@pytest.fixture(scope="module")
def rows(full_size):
    return {name: full_size.run_preset(p) for name, p in full_size.tiny_presets().items()}


def test_every_family_runs_on_fake_tensors(rows):
    assert set(rows) == {"tiny-wan", "tiny-ltx", "tiny-hunyuan15"}
    for name, row in rows.items():
        shape, dtype, device = row["output"]
        assert (dtype, device) == ("torch.bfloat16", "cpu"), name
        assert shape[0] == 1 and len(shape) == 5, name
        assert all(row[k] > 0 for k in KEYS), name
        # memory costs something, the paper's dense form costs more, in inference and training
        assert row["tflops_none"] < row["tflops_memory"] < row["tflops_paper"], name
        assert row["train_tflops_paper"] > row["train_tflops_memory"], name
        assert row["memory_tokens"]["dense"] > row["memory_tokens"]["distinct"], name
        assert any("attention" in op for op in row["ops"]), name


def test_fake_tensors_count_what_real_tensors_run(full_size, rows):
    """Same FLOPs, op for op, on real tiny models (HunyuanVideo-1.5 included: its masks and its
    text-to-video branch are answered by the dry run, here they are computed)."""
    torch.manual_seed(0)
    for name in ("tiny-wan", "tiny-hunyuan15"):
        real = full_size.run_preset(full_size.tiny_presets()[name], fake=False)
        for key in (*KEYS, "encoder_tflops"):
            assert real[key] == rows[name][key], (name, key)
        assert real["output"] == rows[name]["output"]


def test_fake_cuda_takes_the_cuda_routes(full_size, rows):
    """Inference of the whole model on a fake CUDA device; the memory attention's training step
    (the lse route's forward and backward, driven by hand: autograd's engine needs a CUDA
    build) at the same shapes."""
    row = full_size.run_preset(full_size.tiny_presets()["tiny-wan"], "cuda")
    assert row["output"][1:] == ["torch.bfloat16", "cuda:0"]
    assert "aten._scaled_dot_product_flash_attention" in row["ops"]
    assert not any("for_cpu" in op for op in row["ops"])
    for key in ("tflops_none", "tflops_memory", "tflops_paper"):
        assert math.isclose(row[key], rows["tiny-wan"][key], rel_tol=1e-12), key
    assert "train_tflops_memory" not in row
    (call,) = row["cuda_memory_attention"]
    q, k, m = row["memory_attention"][0][:3]
    assert call["training_output"][1:] == ["torch.bfloat16", "cuda:0"]
    assert call["training_grads"] == [list(q), list(k), list(k), list(m), list(m), list(m[:2])]
    assert "aten._scaled_dot_product_flash_attention_backward" in call["training_ops"]
    assert call["training_tflops"] > call["inference_tflops"] > 0


def test_main_writes_the_table_and_json(full_size, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert full_size.main(["--preset", "tiny-ltx", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| tiny-ltx | cpu |" in table and "TFLOP paper" in table
    data = json.loads(out.read_text())
    assert set(KEYS) <= set(data["tiny-ltx"])


def test_an_op_without_a_formula_is_reported(full_size):
    full_size.register_missing_formulas()
    aten = torch.ops.aten
    assert full_size.uncounted({aten.mm, aten._scaled_dot_product_flash_attention_for_cpu}) == []
    assert full_size.uncounted({aten._int_mm}) == ["aten._int_mm"]


def test_an_error_names_the_preset_and_the_part(full_size, capsys, monkeypatch):
    broken = full_size.tiny_presets()["tiny-wan"]
    broken.text = {"encoder_hidden_states": (16, 7)}  # the wrong text width
    monkeypatch.setattr(full_size, "tiny_presets", lambda: {"tiny-wan": broken})
    assert full_size.main(["--preset", "tiny-wan"]) == 1
    err = capsys.readouterr().err
    assert "tiny-wan (cpu): forward, no memory in transformer.condition_embedder" in err
    assert "RuntimeError" in err


def test_value_checks_stay_strict_for_real_tensors():
    from dit_mem.memory.tokens import check_plausible, is_fake

    real = torch.full((1, 4, 8), float("nan"))
    assert not is_fake(real)
    with pytest.raises(ValueError, match="memory: the memory tokens holds NaN"):
        check_plausible(real, "memory", "memory tokens")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.full((1, 4, 8), float("nan"))
        assert is_fake(fake)
        check_plausible(fake, "memory", "memory tokens")  # nothing to read: skipped


def test_one_block_against_the_float64_oracle(full_size):
    """``benchmarks/full_size_block.py`` on the tiny Wan: ours in fp32 equals the float64 dense
    form to float32 rounding; in bf16 ours is as close to it as the paper's form in bf16."""
    block = load("full_size_block")
    row = block.run(full_size.tiny_presets()["tiny-wan"], repeats=1)
    assert row["tokens"] == {"video": 80, "memory_dense": 1000, "memory_distinct": 10}
    assert row["err_fp32"] <= 1e-5
    assert row["err_bf16"] <= 2e-2 and row["err_bf16"] <= 1.5 * row["err_bf16_paper"]
    assert len(row["times_s"]["none"]) == len(row["times_s"]["memory"]) == 1
    assert "| tiny-wan | 5×8×8 | 80 |" in block.table([row])


def test_gpu_check_runs_its_code_on_cpu(tmp_path, capsys):
    """``benchmarks/gpu_check.py --tiny``: every call it times on a GPU, and its full-size
    correctness check, on the tiny Wan."""
    check = load("gpu_check")
    out = tmp_path / "gpu.json"
    assert check.main(["--tiny", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["steps"]) == {"native"}
    assert set(result["steps"]["native"]) == {"none", "ours", "paper"}
    assert set(result["train"]) == {"ours", "paper"}
    c = result["correctness"]
    assert c["rel_err_lse"] <= 1e-5 and c["rel_err_joint"] <= 1e-5
    assert c["memory_changes_output"] > 1e-3
    assert "step, ours | native" in capsys.readouterr().out


def test_cached_filter_gains_stay_real_after_a_fake_run():
    """``frequency_gains`` is cached: asked first under fake tensors (or a meta default device),
    it must still give later real calls a real tensor with values."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from dit_mem.memory.encoder import frequency_gains

    args = (3, 5, 7, 11, "high")
    frequency_gains.cache_clear()
    with FakeTensorMode(), torch.device("meta"):
        frequency_gains(*args)
    gains = frequency_gains(*args)
    assert not is_fake(gains) and gains.device.type == "cpu"
    frequency_gains.cache_clear()
    assert torch.equal(gains, frequency_gains(*args))
