"""benchmarks/gpu_check.py cannot rot: its dry run (every section on the CPU at tiny sizes) runs here in a
subprocess, as it runs on a GPU, and writes the JSON a GPU run writes; a section that raises is recorded
and the others still run."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ("a_t4_config", "b_card_plan", "c_correctness", "d_checkpoint_resume", "e_scoring")


def _numbers(obj, path="$"):
    """Every number in a JSON tree, with its path (bools are not numbers here)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _numbers(value, f"{path}[{index}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _skipped(value) -> bool:
    return isinstance(value, dict) and set(value) == {"skipped"} and "no GPU" in value["skipped"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_dry_run_writes_every_section_with_finite_numbers(dry_run):
    result, stdout = dry_run
    assert result["dry_run"] is True and result["device"] == "cpu" and result["gpu"] is None
    assert list(result["sections"]) == list(SECTIONS)
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section.get("traceback"))
        assert _positive(section["seconds"])
        assert f"[{name}] ok" in stdout
    bad = [(path, value) for path, value in _numbers(result) if not math.isfinite(value)]
    assert not bad
    assert result["total_seconds"] < 120


@pytest.mark.parametrize("name", ["a_t4_config", "b_card_plan"])
def test_training_sections_measure_the_plans(dry_run, name):
    section = dry_run[0]["sections"][name]
    assert _positive(section["steps_per_second"]) and _positive(section["seconds_per_step"])
    assert _positive(section["flops_per_step"]) and _positive(section["flops_per_second"])
    assert section["timed_steps"] == 2
    losses = section["losses"]
    assert losses["all_losses_finite"] is True and losses["steps"] == 2 and len(losses["loss"]) == 2
    assert losses["skipped_steps"] == 0 and losses["nonfinite_steps_not_skipped"] == 0
    assert _skipped(section["memory"]) and _skipped(section["share_of_peak_flops"])
    plan = section["plan"]
    assert plan["peak_bytes"] > 0 and plan["flops_per_step"] == section["flops_per_step"]
    if name == "a_t4_config":  # planned as for a T4 whatever the machine: fp16 + GradScaler
        assert plan["accelerator"]["name"] == "T4" and plan["accelerator"]["compute_capability"] == [7, 5]
        assert section["precision_planned"] == "fp16" and section["grad_scaler"] is True
        assert losses["grad_scaler"] is True
        assert _skipped(section["memory_cap"])
    else:  # the machine's own plan: on a CPU, fp32
        assert plan["device"] == "cpu" and section["precision_run"] == "fp32"
        assert section["assumed_utilisation"] == 0.35 and _skipped(section["measured_over_assumed"])


def test_correctness_section_compares_devices_and_precisions(dry_run):
    section = dry_run[0]["sections"]["c_correctness"]
    agreement = section["fp32_agreement"]
    expected = {"loss", "loss_mse", "loss_vb", "loss_feature", "gradients", "weights_after_one_step",
                "score_raw_kl", "score_raw_rgb", "score_raw_feature"}
    assert set(agreement) == expected
    for key, value in agreement.items():  # the CPU against itself: the same bits
        assert value["within_tolerance"] is True and value["max_abs_diff"] <= 1e-4, key
        assert value["max_abs_diff"] == 0.0, key
        assert _positive(value["max_abs_value"]), key  # a real comparison, not of zeros
    assert section["all_within_tolerance"] is True and section["tolerance"] == 1e-4
    assert agreement["gradients"]["tensors"] > 10
    effects = section["precision_effects"]
    assert _skipped(effects["tf32"])
    assert 0.0 <= effects["kl_pixel_auroc_fp32"] <= 1.0
    for name in ("bf16_autocast", "fp16_autocast"):  # lower precision moves the maps, a little
        effect = effects[name]
        for kind in ("kl", "feature"):
            assert effect[kind]["finite"] is True
            assert 0.0 < effect[kind]["max_abs_diff_over_range"] < 0.5, (name, kind)
        assert abs(effect["kl_pixel_auroc_shift"]) < 0.1


def test_checkpoint_section_resumes_exactly(dry_run):
    section = dry_run[0]["sections"]["d_checkpoint_resume"]
    assert _positive(section["checkpoint_bytes"]) and _positive(section["save_seconds"])
    assert section["grad_scaler"] is True and section["precision_planned"] == "fp16"
    assert {"unet", "ema", "optimizer", "rng", "scaler"} <= set(section["checkpoint_keys"])
    comparison = section["resumed_against_uninterrupted"]
    for key in ("unet", "ema", "optimizer_state"):
        assert comparison[key]["max_abs_diff"] == 0.0 and comparison[key]["tensors"] > 10, key
    assert comparison["loss_uninterrupted"] == comparison["loss_resumed"]
    assert comparison["scale_resumed"] == comparison["scale_uninterrupted"] > 0
    assert comparison["step_resumed"] == comparison["step_uninterrupted"] == section["steps_before_checkpoint"] + 1
    assert comparison["identical"] is True


def test_scoring_section_measures_score_raw(dry_run):
    section = dry_run[0]["sections"]["e_scoring"]
    assert _positive(section["images_per_second"]) and _positive(section["unet_flops_per_image"])
    assert section["maps_finite"] is True and section["images"] == 2
    assert _skipped(section["share_of_fp32_peak_flops"])


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_a_section_that_raises_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    gpu_check = _load_script()
    ran = []

    def fine(name):
        def section(setup):
            ran.append(name)
            return {"value": 1.5}
        return section

    def broken(setup):
        ran.append("b")
        raise RuntimeError("CUDA out of memory (planted)")

    sections = tuple((name, broken if name.startswith("b") else fine(name[0])) for name, _ in gpu_check.SECTIONS)
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 1  # a failed section: exit status 1
    assert ran == ["a", "b", "c", "d", "e"]
    result = json.loads(out.read_text())
    assert list(result["sections"]) == list(SECTIONS)
    failed = result["sections"]["b_card_plan"]
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: CUDA out of memory (planted)"
    assert "planted" in failed["traceback"]
    for name in SECTIONS:
        if name != "b_card_plan":
            assert result["sections"][name] == {"status": "ok", "value": 1.5,
                                                 "seconds": result["sections"][name]["seconds"]}

    out.unlink()
    assert gpu_check.main(["--dry-run", "--out", str(out), "--sections", "a,e"]) == 0
    assert list(json.loads(out.read_text())["sections"]) == ["a_t4_config", "e_scoring"]


def test_jsonable_keeps_the_file_valid_json():
    gpu_check = _load_script()
    import torch

    assert gpu_check.jsonable({"a": (1, float("inf")), "b": torch.tensor(2.5), "c": float("nan")}) == {
        "a": [1, "inf"], "b": 2.5, "c": "nan"}
    assert gpu_check.gpu_slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
    assert gpu_check.gpu_slug("Tesla T4") == "t4"
