"""The scorecard's verdicts follow from the numbers by their stated rules."""

from types import SimpleNamespace

import pytest

from diffad.studies import scorecard


def _diff(value, tie=False):
    return {"difference": value, "lo": value - 0.01, "hi": value + 0.01, "tie": tie}


def test_paired_claim_rules():
    ahead = {"a": {"pixel_auroc": _diff(0.02), "pro": _diff(0.0, tie=True)}}
    assert scorecard.paired_claim("x", "y", ahead, "ch").verdict == "replicated"
    ties = {"a": {"pixel_auroc": _diff(0.0, True), "pro": _diff(0.001, True)}}
    assert scorecard.paired_claim("x", "y", ties, "ch").verdict == "partly"
    behind = {"a": {"pixel_auroc": _diff(-0.02), "pro": _diff(-0.03)}, "b": {"pixel_auroc": _diff(0.01),
                                                                             "pro": _diff(0.0, True)}}
    claim = scorecard.paired_claim("x", "y", behind, "ch")
    assert claim.verdict == "not replicated" and "ahead 1, behind 2, tie 1" in claim.measured


def test_alpha_claim_compares_the_mix_with_the_better_branch():
    sweep = {a: {"pixel_auroc": 0.9, "pro": 0.8, "image_auroc": 0.9} for a in (0.0, 0.5, 1.0)}
    sweep[0.5] = {"pixel_auroc": 0.95, "pro": 0.8, "image_auroc": 0.85}
    claim = scorecard.alpha_claim(sweep)
    assert claim.verdict == "partly" and "pixel AUROC: 0.5 minus the better branch +5.0" in claim.measured


def test_noise_hides_claim_needs_falling_contrast_and_a_ratio_above_one():
    good = SimpleNamespace(timesteps=(5, 50), contrast=[4.0, 1.0], error_ratio=[1.5, 1.1])
    flat = SimpleNamespace(timesteps=(5, 50), contrast=[4.0, 4.5], error_ratio=[0.9, 0.8])
    assert scorecard.noise_hides_claim({"scratch": good}).verdict == "replicated"
    assert scorecard.noise_hides_claim({"scratch": good, "stain": flat}).verdict == "partly"


def test_unified_claim_prefers_the_compute_matched_model():
    confounded = scorecard.unified_claim({"ensemble": -0.09, "padim": 0.02}, None)
    assert confounded.verdict == "not replicated"
    fair = scorecard.unified_claim({"ensemble": -0.09, "padim": -0.06}, -0.005)
    assert fair.verdict == "replicated" and "compute-matched diffusion model -0.5" in fair.measured
    # costs little, but PaDiM gains more when pooled: one part of two
    cheap = scorecard.unified_claim({"ensemble": -0.09, "padim": 0.01}, 0.0)
    assert cheap.verdict == "partly" and "PaDiM +1.0; compute-matched diffusion model +0.0" in cheap.measured
    assert scorecard.unified_claim({"ensemble": -0.04, "padim": -0.01}, None).verdict == "not replicated"


def test_claims_refuse_unknown_verdicts_and_render():
    with pytest.raises(ValueError, match="verdict must be one of"):
        scorecard.Claim("a", "b", "c", "maybe", "d")
    claim = scorecard.untested_claim("Backbone", "EfficientNet best", "needs hub weights", "chapter 11")
    assert "**not tested**" in scorecard.scorecard_markdown([claim])
    denoise = scorecard.denoise_claim(10.0, 6.0, 0.05, 0.01)
    assert denoise.verdict == "replicated"
    assert "PaDiM loss 10.0, about 40% lower after" in denoise.measured
    # the fall to the nearest 5%: the loss's third digit moves between machines, this does not
    assert scorecard.denoise_claim(97.9, 59.5, 0.088, 0.008).measured == scorecard.denoise_claim(
        97.9, 59.9, 0.088, 0.008).measured
    assert scorecard.denoise_claim(10.0, 12.0, 0.01, 0.05).verdict == "not replicated"


def _gain(value, low, high, better="KL"):
    return {"difference": value, "lo": low, "hi": high, "better": better}


def test_alpha_gain_claim_judges_paired_gains_by_the_paired_rule():
    summary = {"gain": {"pixel_auroc": _gain(0.02, 0.01, 0.03), "pro": _gain(0.03, 0.01, 0.05, "feature"),
                        "image_auroc": _gain(0.0, -0.01, 0.01)},
               "best": {"pixel_auroc": 0.4, "pro": 0.5, "image_auroc": 0.1}}
    claim = scorecard.alpha_gain_claim(summary)
    assert claim.verdict == "replicated"  # ahead on two metrics, a tie on the third, behind nowhere
    assert "PRO: 0.5 minus the feature map +3.0 [+1.0, +5.0], best alpha 0.5" in claim.measured
    summary["gain"]["image_auroc"] = _gain(-0.05, -0.08, -0.02)
    assert scorecard.alpha_gain_claim(summary).verdict == "partly"
    summary["gain"]["pixel_auroc"] = _gain(-0.05, -0.08, -0.02)
    assert scorecard.alpha_gain_claim(summary).verdict == "not replicated"


def test_one_rule_for_both_kinds_of_part():
    assert scorecard.paired_verdict(1, 0) == "replicated"
    assert scorecard.paired_verdict(0, 0) == "partly"
    assert scorecard.paired_verdict(2, 2) == "partly"
    assert scorecard.paired_verdict(2, 3) == "not replicated"
    rule = scorecard.rule_markdown()
    for phrase in ("paper's scoring", "paired 95% bootstrap interval", "**replicated**", "**partly**",
                   "**not replicated**", "**not tested**"):
        assert phrase in rule


def test_judged_shows_both_scorings_or_one_for_a_claim_that_scores_no_map():
    paper = scorecard.Claim("KL vs RGB", "KL better", "ahead 3", "replicated", "ch 11")
    preset = scorecard.Claim("KL vs RGB", "KL better", "behind 3", "not replicated", "ch 11")
    noise = scorecard.Claim("Fig. 2", "noise hides", "contrast falls", "replicated", "ch 4")
    table = scorecard.judged_markdown([scorecard.Judged(paper, preset), scorecard.Judged(noise)], "cpu")
    assert "measured, the cpu preset's scoring" in table
    assert "| ahead 3 | **replicated** | behind 3 | **not replicated** |" in table
    assert "the same: no map is scored | **replicated** |" in table
    assert scorecard.Judged(paper, preset).verdicts == ("replicated", "not replicated")
    with pytest.raises(ValueError, match="same claim"):
        scorecard.Judged(paper, noise)


def test_chapters_11_and_14_print_the_same_rule():
    """The rule is printed by both chapters from the library: their stored outputs hold it word for word."""
    import json
    from pathlib import Path

    book = Path(__file__).resolve().parents[1] / "book"
    for name in ("11_ablations.ipynb", "14_scorecard.ipynb"):
        outputs = [
            "".join(o.get("data", {}).get("text/markdown", ""))
            for c in json.loads((book / name).read_text())["cells"] if c["cell_type"] == "code"
            for o in c.get("outputs", [])
        ]
        assert scorecard.RULE in outputs, name
