"""What replicated: each claim of the paper, the measurement that tests it here, and a verdict.

Each ``*_claim`` function turns measurements (computed by the chapters' own library calls) into a
:class:`Claim`; the verdict follows from the numbers by the rule of :data:`RULE`, never by hand.
Every claim whose measurement scores maps is judged twice, under the paper's scoring and under the
preset's (:class:`Judged`); chapters 11 and 14 print :data:`RULE` itself, so they state it alike.

The book's last chapter computes the measurements and prints :func:`judged_markdown`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffad.tables import markdown_table

VERDICTS = ("replicated", "partly", "not replicated", "not tested")
METRICS = {"pixel_auroc": "pixel AUROC", "pro": "PRO", "image_auroc": "image AUROC"}

# The one statement of how a verdict follows from the numbers (chapters 11 and 14 print it).
RULE = """**How a verdict follows from the numbers.** Every claim whose measurement scores anomaly maps \
is judged twice on the same models: under the paper's scoring (per-image z-scores of the KL maps, \
no blur, the paper's top-k and alpha 0.5; `presets.with_paper_scoring`) and under the preset's. A \
claim is split into parts. Where a part compares two maps of the same test images, it is judged by \
the paired 95% bootstrap interval of their difference: *ahead* when the interval lies above 0, \
*behind* when it lies below 0, a *tie* when it holds 0; the claim is then **replicated** when it \
is ahead somewhere and behind nowhere, **not replicated** when it is behind more often than ahead, \
and **partly** otherwise (ties only, or as often behind as ahead). Where a part has no images to \
pair (an average against a quoted one, a change in PRO, a loss that falls), it holds or fails by \
the sign of the measurement: **replicated** when every part holds, **not replicated** when none \
does, **partly** otherwise. A claim the setting here cannot test is **not tested**."""


@dataclass(frozen=True)
class Claim:
    """One claim of the paper with what was measured here and the verdict."""

    name: str
    paper: str
    measured: str
    verdict: str
    where: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _share(agreeing: int, total: int) -> str:
    return "replicated" if agreeing == total else "not replicated" if agreeing == 0 else "partly"


def paired_verdict(ahead: int, behind: int) -> str:
    """The rule for parts judged by paired intervals: ahead somewhere and behind nowhere, replicated;
    behind more often than ahead, not replicated; otherwise (ties only, or as often behind), partly."""
    return "replicated" if ahead and not behind else "not replicated" if behind > ahead else "partly"


def rule_markdown() -> str:
    """:data:`RULE`, for a chapter to display."""
    return RULE


def noise_hides_claim(sweeps: dict) -> Claim:
    """Fig. 2 from :func:`diffad.studies.analysis.noise_sweep` results (defect kind -> NoiseSweep): noise
    hides the defect (its contrast falls with t) and the model's estimate singles it out (the
    inside/outside error ratio exceeds 1 at some t)."""
    parts, agreeing = [], 0
    for kind, sweep in sweeps.items():
        contrast = np.asarray(sweep.contrast, dtype=float)
        ratio = np.asarray(sweep.error_ratio, dtype=float)
        best = int(np.argmax(ratio))
        ok = contrast[-1] < contrast[0] and ratio[best] > 1.0
        agreeing += ok
        parts.append(f"{kind}: contrast {contrast[0]:.1f} -> {contrast[-1]:.1f} from t = {sweep.timesteps[0]} to "
                     f"{sweep.timesteps[-1]}; error inside/outside up to {ratio[best]:.1f} (t = {sweep.timesteps[best]})")
    return Claim("Fig. 2: noise hides the anomaly", "more noise hides the defect; the model fills in normal content",
                 "; ".join(parts), _share(agreeing, len(sweeps)), "chapter 4")


def paired_claim(name: str, paper: str, comparisons: dict[str, dict], where: str,
                 metrics: tuple[str, ...] = ("pixel_auroc", "pro")) -> Claim:
    """A claim that method A is at least as good as B, from paired differences per category
    (:func:`diffad.evaluate.compare_saved`): replicated when A is ahead somewhere and behind
    nowhere, not replicated when it is behind more often than ahead, partly otherwise (ties)."""
    ahead = behind = ties = 0
    for result in comparisons.values():
        for metric in metrics:
            r = result[metric]
            ties += r["tie"]
            ahead += (not r["tie"]) and r["difference"] > 0
            behind += (not r["tie"]) and r["difference"] < 0
    verdict = paired_verdict(ahead, behind)
    mean = {m: 100 * np.mean([c[m]["difference"] for c in comparisons.values()]) for m in metrics}
    measured = (f"{len(comparisons)} categories x {len(metrics)} metrics: ahead {ahead}, behind {behind}, tie {ties} "
                "(paired 95% intervals); mean difference " +
                ", ".join(f"{METRICS[m]} {v:+.1f}" for m, v in mean.items()))
    return Claim(name, paper, measured, verdict, where)


def alpha_claim(by_alpha: dict[float, dict[str, float]]) -> Claim:
    """Fig. 5 from the alpha sweep averaged over categories (alpha -> metric -> value): the mix
    at alpha 0.5 beats both branches alone (alpha 0 and 1), metric by metric."""
    gains = {m: by_alpha[0.5][m] - max(by_alpha[0.0][m], by_alpha[1.0][m]) for m in METRICS}
    best = {m: max(by_alpha, key=lambda a: by_alpha[a][m]) for m in METRICS}
    measured = "; ".join(f"{label}: 0.5 minus the better branch {100 * gains[m]:+.1f}, best alpha {best[m]:.1f}"
                         for m, label in METRICS.items())
    return Claim("Fig. 5: the ensemble beats either branch", "alpha = 0.5 best; PRO +0.7 over the feature map alone",
                 measured, _share(sum(g > 0 for g in gains.values()), len(gains)), "chapters 7 and 11")


def alpha_gain_claim(summary: dict) -> Claim:
    """Fig. 5 from one scoring of :func:`diffad.studies.scoring_study.scoring_study`: per metric, alpha
    0.5 minus the better branch with its paired interval over the category averages (ahead, tie or
    behind), judged by :func:`paired_verdict`; the best alpha of the grid beside it."""
    parts, ahead, behind = [], 0, 0
    for m, label in METRICS.items():
        g = summary["gain"][m]
        ahead += g["lo"] > 0
        behind += g["hi"] < 0
        parts.append(f"{label}: 0.5 minus the {g['better']} map {100 * g['difference']:+.1f} "
                     f"[{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}], best alpha {summary['best'][m]:.1f}")
    return Claim("Fig. 5: the ensemble beats either branch", "alpha = 0.5 best; PRO +0.7 over the feature map alone",
                 "; ".join(parts), paired_verdict(ahead, behind), "chapter 7b's scoring study")


def pattern_claim(checks: list[dict], method: str = "the method") -> Claim:
    """Table 1's pattern against PaDiM from :func:`diffad.evaluate.paper_pattern`; ``method`` names
    what the method's column holds (the ensemble at the scoring's alpha)."""
    measured = f"{method}: " + "; ".join(f"{METRICS[c['metric']]}: {'same' if c['agrees'] else 'reversed'} "
                         f"(ours {' vs '.join(f'{v:.1f}' for v in c['ours'].values())})" for c in checks)
    return Claim("Table 1: PaDiM ahead on pixel AUROC, the method ahead on PRO",
                 "PaDiM 97.8 / 92.8, the method 96.7 / 93.7 (pixel AUROC / PRO)", measured,
                 _share(sum(c["agrees"] for c in checks), len(checks)), "chapter 10")


def unified_claim(changes: dict[str, float], matched_change: float | None) -> Claim:
    """Table 2 from PRO changes when unified (method -> change, as a fraction). The claim has two
    parts: the diffusion model (``ensemble``) loses little (above -2 points) and less than PaDiM.
    ``matched_change``: the diffusion model's change with the compute-matched unified model, trained
    on the same categories; it decides when given (the other is confounded by less training per
    category)."""
    ours, padim = changes["ensemble"], changes["padim"]
    if matched_change is not None:
        ours = matched_change
    verdict = _share(int(ours > -0.02) + int(ours > padim), 2)
    measured = (f"PRO change when unified: diffusion {100 * changes['ensemble']:+.1f}, PaDiM "
                f"{100 * changes['padim']:+.1f}")
    if matched_change is not None:
        measured += f"; compute-matched diffusion model {100 * matched_change:+.1f}"
    return Claim("Table 2: one model for all categories costs little", "the method -1.1 PRO, PaDiM and DRAEM over -5",
                 measured, verdict, "chapter 11b")


def denoise_claim(loss_before: float, loss_after: float, change_inside: float, change_outside: float) -> Claim:
    """Fig. 7's gradient denoising: the PaDiM loss falls, and the image changes more inside the
    defect than outside it (mean |x_after - x_before| on the [0, 1] scale).

    The loss after the run is given as its fall to the nearest 5%: a hundred normalised steps
    amplify rounding until its third digit differs between CPUs and thread counts, even in
    float64 (:mod:`diffad.denoise`), while the fall to the nearest 5% holds on every machine."""
    ok = [loss_after < loss_before, change_inside > change_outside]
    fall = 5 * round(20 * (1 - loss_after / loss_before))
    measured = (f"PaDiM loss {loss_before:.1f}, about {fall}% lower after; change inside the defect "
                f"{change_inside:.3f}, outside {change_outside:.3f}")
    return Claim("Fig. 7: gradient denoising removes the defect", "the defect fades while the rest stays",
                 measured, _share(sum(ok), len(ok)), "chapter 8")


def untested_claim(name: str, paper: str, why: str, where: str) -> Claim:
    return Claim(name, paper, why, "not tested", where)


def scorecard_markdown(claims: list[Claim]) -> str:
    """The scorecard as a markdown table: claim, the paper, measured here, verdict, where."""
    return markdown_table(["claim", "the paper", "measured here", "verdict", "where"],
                          [[c.name, c.paper, c.measured, f"**{c.verdict}**", c.where] for c in claims])


@dataclass(frozen=True)
class Judged:
    """One claim judged under the paper's scoring and under the preset's. A claim whose measurement
    scores no map (noise, gradient denoising, an untested one) is the same under both (``preset``
    None)."""

    paper_scoring: Claim
    preset_scoring: Claim | None = None

    def __post_init__(self):
        if self.preset_scoring is not None and self.preset_scoring.name != self.paper_scoring.name:
            raise ValueError("both verdicts must judge the same claim")

    @property
    def verdicts(self) -> tuple[str, str]:
        return self.paper_scoring.verdict, (self.preset_scoring or self.paper_scoring).verdict


def judged_markdown(items: list[Judged], preset_name: str = "preset") -> str:
    """The scorecard with both scorings: claim, the paper, and under each scoring what was measured
    and the verdict; a claim that scores no map shows its one measurement and verdict under both."""
    body = []
    for item in items:
        first, second = item.paper_scoring, item.preset_scoring
        same = second is None
        body.append([first.name, first.paper, first.measured, f"**{first.verdict}**",
                     "the same: no map is scored" if same else second.measured,
                     f"**{(second or first).verdict}**", first.where])
    return markdown_table(["claim", "the paper", "measured, the paper's scoring", "verdict",
                           f"measured, the {preset_name} preset's scoring", "verdict", "where"], body)
