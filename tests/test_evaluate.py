"""Evaluation and the command line, end to end on a tiny preset and the tiny built-in dataset."""

import csv
import json

import numpy as np
import pytest

from diffad.cli import main
from diffad.evaluate import (
    METHODS,
    RESULT_COLUMNS,
    evaluate_category,
    read_paper_table1,
    read_results_csv,
    reproduce,
    table1_markdown,
)
from diffad.metrics import INTERVAL_COLUMNS

from conftest import TINY_OVERRIDES


def test_evaluate_category_reports_every_method(tiny_model, tiny_builtin):
    result = evaluate_category(tiny_model, tiny_builtin, "brick")
    methods = [r["method"] for r in result.rows]
    assert methods == ["ensemble", "kl", "rgb", "feature", "spade", "padim", "patchcore"] == list(METHODS)
    for row in result.rows:
        for key in ("pixel_auroc", "pro", "image_auroc"):
            assert 0.0 <= row[key] <= 1.0
    n = len(result.extra["data"].test_images)
    assert result.maps["ensemble"].shape == (n, 32, 32) and result.scores["padim"].shape == (n,)
    assert result.maps["patchcore"].shape == (n, 32, 32) and result.scores["patchcore"].shape == (n,)


def test_the_baselines_share_the_backbones_passes_and_get_the_same_maps(tiny_builtin, tiny_preset, monkeypatch):
    import torch

    from diffad import backbones
    from diffad.evaluate import CategoryData, baseline_rows

    data = CategoryData.load(tiny_builtin, "brick", tiny_preset)
    alone = {}
    for name in ("spade", "padim", "patchcore"):  # each method with an extractor of its own
        rows, maps, scores = baseline_rows(data, tiny_preset, "cpu", (name,))
        alone[name] = (rows[0], maps[name], scores[name])
    counted = []  # per backbone call: whether it passed the batch through the network
    original = backbones.FeatureExtractor._stages

    def counting(self, x):
        before = len(getattr(self, "_memo", None) or {})
        out = original(self, x)
        counted.append(len(getattr(self, "_memo", None) or {}) > before)
        return out

    monkeypatch.setattr(backbones.FeatureExtractor, "_stages", counting)
    rows, maps, scores = baseline_rows(data, tiny_preset, "cpu")
    batches = len(counted) // 3  # three methods, the same batches each: fit on train, predict on test
    assert sum(counted) == batches  # only the first method passed them through the backbone
    for row in rows:
        name = row["method"]
        assert row == alone[name][0]
        assert torch.equal(maps[name], alone[name][1]) and torch.equal(scores[name], alone[name][2])


def test_reproduce_writes_results_and_resumes(tiny_builtin, tmp_path):
    rows = reproduce(tiny_builtin, tmp_path, "cpu", categories=["brick", "nut"], progress=False, **TINY_OVERRIDES)
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0].keys()) == RESULT_COLUMNS + INTERVAL_COLUMNS
    for row in read_results_csv(tmp_path / "results.csv"):
        for metric in RESULT_COLUMNS[2:]:
            assert row[f"{metric}_lo"] <= row[metric] + 1e-9 and row[metric] <= row[f"{metric}_hi"] + 1e-9
    with np.load(tmp_path / "brick" / "maps.npz") as saved:
        assert {"ensemble", "ensemble_scores", "padim_scores"} <= set(saved.files)
    assert {(r["category"], r["method"]) for r in table} == {
        (c, m) for c in ("brick", "nut") for m in METHODS}
    assert (tmp_path / "brick" / "maps.npz").is_file() and (tmp_path / "nut" / "overlays.png").is_file()
    assert "| brick |" in (tmp_path / "table1.md").read_text()
    assert "CFlow" not in (tmp_path / "table1.md").read_text()  # built-in data: no quoted columns
    intervals = (tmp_path / "intervals.md").read_text()
    assert "| brick | PRO |" in intervals and "patchcore" in intervals and " [" in intervals
    # A finished category is not redone: its recorded metrics are reused as they are.
    done = tmp_path / "nut" / "metrics.json"
    recorded = json.loads(done.read_text())
    recorded[0]["pro"] = 0.123456
    done.write_text(json.dumps(recorded))
    again = reproduce(tiny_builtin, tmp_path, "cpu", categories=["brick", "nut"], progress=False, **TINY_OVERRIDES)
    assert [r for r in again if r["category"] == "nut"][0]["pro"] == 0.123456
    assert read_results_csv(tmp_path / "results.csv")[len(rows) // 2]["pro"] == pytest.approx(0.123456)
    # A category recorded before a baseline existed gets only that baseline run and recorded.
    old = [r for r in recorded if r["method"] != "patchcore"]
    done.write_text(json.dumps(old))
    with np.load(tmp_path / "nut" / "maps.npz") as saved:
        kept = {k: saved[k] for k in saved.files if k != "patchcore"}
    np.savez_compressed(tmp_path / "nut" / "maps.npz", **kept)
    third = reproduce(tiny_builtin, tmp_path, "cpu", categories=["brick", "nut"], progress=False, **TINY_OVERRIDES)
    nut = [r for r in third if r["category"] == "nut"]
    assert [r["method"] for r in nut] == list(METHODS) and nut[0]["pro"] == 0.123456
    assert nut[-1] == pytest.approx([r for r in rows if r["category"] == "nut"][-1])  # the same PatchCore row
    assert [r["method"] for r in json.loads(done.read_text())] == list(METHODS)
    with np.load(tmp_path / "nut" / "maps.npz") as saved:
        assert set(saved.files) == set(kept) | {"patchcore"} and saved["patchcore"].shape == saved["padim"].shape


def test_reproduce_without_intervals_records_none(tiny_builtin, tmp_path):
    """--intervals 0 skips the bootstrap: plain rows, a results.csv without interval columns, no intervals.md."""
    sets = sum((["--set", f"{k}={v!r}"] for k, v in TINY_OVERRIDES.items()), [])
    assert main(["reproduce", "--data-root", str(tiny_builtin), "--out", str(tmp_path), "--category", "brick",
                 "--no-baselines", "--no-figures", "--intervals", "0"] + sets) == 0
    rows = read_results_csv(tmp_path / "results.csv")
    assert [r["method"] for r in rows] == ["ensemble", "kl", "rgb", "feature"]
    with open(tmp_path / "results.csv") as handle:
        assert tuple(next(csv.DictReader(handle)).keys()) == RESULT_COLUMNS
    assert not (tmp_path / "intervals.md").exists() and (tmp_path / "table1.md").is_file()
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="intervals must be a number of bootstrap resamples"):
            reproduce(tiny_builtin, tmp_path / "bad", "cpu", categories=["brick"], intervals=bad)


def test_reproduce_names_missing_categories(tiny_builtin, tmp_path):
    with pytest.raises(ValueError, match=r"\['wood'\] not found.*present"):
        reproduce(tiny_builtin, tmp_path, "cpu", categories=["wood"], progress=False)


def test_table1_puts_paper_numbers_beside_ours():
    paper = read_paper_table1()
    assert paper["bottle"]["ours_pro"] == 95.0 and paper["average"]["padim_pixel_auroc"] == 97.8
    rows = [{"category": "bottle", "method": m, "pixel_auroc": 0.9, "pro": 0.8, "image_auroc": 1.0}
            for m in ("ensemble", "spade", "padim")]
    table = table1_markdown(rows)
    assert "(98.4, 95.5)" in table  # SPADE on bottle, quoted
    assert "(90.0, 80.0)" in table  # ours
    assert "quoted from the paper" in table
    # The built-in data shares no images with MVTec-AD, whatever its folder names.
    assert "(98.4, 95.5)" not in table1_markdown(rows, mvtec=False)
    assert "quoted" not in table1_markdown(rows, mvtec=False)


def test_table1_quotes_patchcore_averages_only():
    from diffad.evaluate import read_quoted_averages

    quoted = read_quoted_averages()["patchcore"]
    assert (quoted["image_auroc"], quoted["pixel_auroc"], quoted["pro"]) == (99.2, 98.1, 94.4)
    assert "patchcore-inspection" in quoted["source"] and "WideResNet-50" in quoted["settings"]
    rows = [{"category": c, "method": m, "pixel_auroc": 0.9, "pro": 0.8, "image_auroc": 1.0}
            for c in ("bottle", "cable") for m in ("ensemble", "spade", "padim", "patchcore")]
    lines = table1_markdown(rows).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "PatchCore†" in header and "PatchCore (ours)" in header
    column = header.index("PatchCore†")
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]}
    assert cells["bottle"][column] == cells["cable"][column] == "–"  # no per-category quotes
    assert cells["average"][column] == "(98.1, 94.4)"
    assert cells["bottle"][header.index("PatchCore (ours)")] == "(90.0, 80.0)"
    assert "PatchCore† from Roth et al." in lines[-1]
    builtin = table1_markdown(rows, mvtec=False)
    assert "PatchCore (ours)" in builtin and "PatchCore†" not in builtin and "98.1" not in builtin


def test_cli_reports_clear_errors(tmp_path, capsys):
    code = main(["reproduce", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
    train = ["train", "--data-root", str(tmp_path), "--category", "x", "--out", str(tmp_path)]
    assert main(train + ["--set", "nope=1"]) == 2
    assert "diffad train: error: unknown preset field(s) ['nope']" in capsys.readouterr().err
    assert main(train + ["--set", "trian_steps=1"]) == 2
    assert "did you mean 'train_steps'" in capsys.readouterr().err
    assert main(train + ["--set", "alpha"]) == 2
    assert "--set expects name=value, got 'alpha'" in capsys.readouterr().err
    for value, message in (("-1", "must be a number in [0, 1], got -1"), ("2", "must be a number in [0, 1], got 2")):
        assert main(train + ["--set", f"alpha={value}"]) == 2
        assert f"diffad train: error: Preset field 'alpha' {message}" in capsys.readouterr().err


def test_cli_set_with_a_value_of_the_wrong_type_is_one_line_and_exit_status_2(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "diffad", "train", "--data-root", str(tmp_path), "--category", "x",
                           "--out", str(tmp_path / "out"), "--set", "train_steps=abc"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "diffad train: error: Preset field 'train_steps' must be an integer >= 1, got 'abc'"]
    assert not (tmp_path / "out").exists()


def test_pro_implementations_are_the_presets_choices():
    from diffad.evaluate import PRO_IMPLEMENTATIONS
    from diffad.presets import PRO_IMPLEMENTATION_NAMES

    assert tuple(PRO_IMPLEMENTATIONS) == PRO_IMPLEMENTATION_NAMES


def test_cli_train_and_evaluate(tiny_builtin, tmp_path, capsys):
    sets = sum((["--set", f"{k}={v!r}"] for k, v in TINY_OVERRIDES.items()), [])
    assert main(["train", "--data-root", str(tiny_builtin), "--category", "brick", "--out", str(tmp_path)] + sets) == 0
    assert main(["evaluate", "--data-root", str(tiny_builtin), "--category", "brick", "--model", str(tmp_path),
                 "--no-baselines"] + sets) == 0
    out = capsys.readouterr().out
    assert "brick" in out and "PRO" in out
    assert (tmp_path / "results.csv").is_file()


def test_a_loaded_model_is_scored_with_the_settings_asked_for(tiny_builtin, tiny_model, tmp_path, capsys):
    """A checkpoint records the scoring settings of its training day; reproduce(model_loader=...)
    and the evaluate command score with those asked for now (alpha 1: the ensemble is the KL map)."""
    old = tiny_model.scored_as(tiny_model.preset.replace(alpha=0.3, top_k=7))
    assert (old.preset.alpha, old.preset.top_k) == (0.3, 7) and old.unet is tiny_model.unet
    assert old.preset.train_steps == tiny_model.preset.train_steps  # training fields are kept
    rows = reproduce(tiny_builtin, tmp_path / "out", "cpu", categories=["brick"], baselines=False,
                     figures=False, progress=False, model_loader=lambda c: old, **{**TINY_OVERRIDES, "alpha": 1.0})
    by_method = {r["method"]: r for r in rows}
    assert by_method["ensemble"]["pro"] == by_method["kl"]["pro"]
    old.save(tmp_path / "model.pt")
    sets = sum((["--set", f"{k}={v!r}"] for k, v in {**TINY_OVERRIDES, "alpha": 1.0}.items()), [])
    assert main(["evaluate", "--data-root", str(tiny_builtin), "--category", "brick", "--model", str(tmp_path),
                 "--no-baselines"] + sets) == 0
    lines = {line.split()[1]: line.split("PRO")[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("brick")}
    assert lines["ensemble"] == lines["kl"]


def test_image_score_can_read_validation_normalised_maps(tiny_preset):
    import torch

    from diffad.evaluate import CategoryData, diffusion_rows
    from diffad.scoring import MAP_TYPES, Normalizer, RawMaps, anomaly_maps, image_scores

    g = torch.Generator().manual_seed(0)
    n = 6
    masks = torch.zeros(n, 16, 16)
    masks[3:, 4:8, 4:8] = 1
    labels = torch.tensor([0, 0, 0, 1, 1, 1])

    def raw(k=2):
        maps = [torch.rand(n, k, 16, 16, generator=g) + 2 * masks[:, None] for _ in MAP_TYPES]
        maps[0][1] += 5.0  # one normal image is globally elevated
        return RawMaps((1, 2), *maps)

    data = CategoryData("x", torch.zeros(0), torch.zeros(0), torch.zeros(n, 3, 16, 16), masks, labels, ["g"] * n)
    test, val = raw(), RawMaps((1, 2), *(torch.rand(4, 2, 16, 16, generator=g) for _ in MAP_TYPES))
    preset = tiny_preset.replace(normalization="per_image", image_normalization="validation", smoothing_sigma=0.0)
    _, maps, scores = diffusion_rows(data, test, val, preset)
    expected_maps = anomaly_maps(test, preset.alpha, "per_image")
    assert torch.allclose(maps["ensemble"], expected_maps["ensemble"])  # pixel maps: per image
    val_maps = anomaly_maps(test, preset.alpha, "validation", Normalizer.fit(val))
    assert torch.allclose(scores["kl"], image_scores(val_maps["kl"], preset.top_k))  # image score: validation
    same = diffusion_rows(data, test, val, preset.replace(image_normalization=None))[2]
    assert torch.allclose(same["kl"], image_scores(expected_maps["kl"], preset.top_k))
    # a sweep that reads one map measures only that one, with the same numbers
    rows = diffusion_rows(data, test, val, preset)[0]
    only, every_map, _ = diffusion_rows(data, test, val, preset, methods=("feature", "ensemble"))
    assert [r["method"] for r in only] == ["ensemble", "feature"] and set(every_map) == set(maps)
    assert only == [r for r in rows if r["method"] in ("ensemble", "feature")]
    with pytest.raises(ValueError, match="unknown diffusion map"):
        diffusion_rows(data, test, val, preset, methods=("padim",))


# ----------------------------------------------------------------- result tables (chapter 10)

def _rows(values: dict) -> list[dict]:
    """Result rows from {(category, method): (pixel_auroc, pro, image_auroc)}."""
    return [{"category": c, "method": m, "pixel_auroc": p, "pro": r, "image_auroc": i}
            for (c, m), (p, r, i) in values.items()]


def test_results_markdown_lists_every_method_and_the_average():
    from diffad.evaluate import method_averages, results_markdown

    rows = _rows({("a", "ensemble"): (0.90, 0.80, 1.00), ("a", "padim"): (0.95, 0.70, 0.50),
                  ("b", "ensemble"): (0.70, 0.60, 0.80), ("b", "padim"): (0.85, 0.90, 0.70)})
    assert method_averages(rows)["padim"] == pytest.approx({"pixel_auroc": 0.90, "pro": 0.80, "image_auroc": 0.60})
    lines = results_markdown(rows).splitlines()
    assert lines[0] == "| category | ensemble | padim |"
    assert lines[2] == "| a | 90.0 / 80.0 / 100.0 | 95.0 / 70.0 / 50.0 |"
    assert lines[4] == "| **average** | 80.0 / 70.0 / 90.0 | 90.0 / 80.0 / 60.0 |"
    only_pro = results_markdown(rows, methods=("padim",), metrics=("pro",))
    assert "| b | 90.0 |" in only_pro and "ensemble" not in only_pro
    with pytest.raises(ValueError, match="spade"):
        results_markdown(rows, methods=("spade",))
    with pytest.raises(ValueError, match="no result rows"):
        results_markdown([])


def test_paper_table1_markdown_quotes_the_csv():
    from diffad.evaluate import paper_table1_markdown

    table = paper_table1_markdown()
    assert "| bottle | (98.4, 95.5) | (98.5, 95.3) | (99.0, 96.8) |" in table
    assert "| **average** | (96.0, 91.7) | (97.8, 92.8) |" in table
    assert "quoted from" in table and len(table.splitlines()) == 2 + 16 + 2
    assert "PatchCore" not in table  # the paper's Table 1 as published; PatchCore is quoted apart


def test_quoted_averages_markdown_sets_patchcore_beside_the_paper():
    from diffad.evaluate import quoted_averages_markdown

    table = quoted_averages_markdown()
    assert "| PaDiM† | (97.8, 92.8) | – | Lu et al. (ICCV 2023), Table 1 |" in table
    assert "| PatchCore† | (98.1, 94.4) | 99.2 | Roth et al. (CVPR 2022)" in table
    assert "all quoted (†), none computed by diffad" in table


def test_paper_pattern_compares_leaders():
    from diffad.evaluate import paper_pattern

    paper = {"average": {"ours_pixel_auroc": 96.7, "padim_pixel_auroc": 97.8, "ours_pro": 93.7, "padim_pro": 92.8}}
    same = _rows({("a", "ensemble"): (0.90, 0.85, 1.0), ("a", "padim"): (0.95, 0.80, 1.0)})
    result = paper_pattern(same, paper=paper)
    assert [r["metric"] for r in result] == ["pixel_auroc", "pro"]
    assert [(r["paper_leader"], r["our_leader"], r["agrees"]) for r in result] == [
        ("padim", "padim", True), ("ensemble", "ensemble", True)]
    assert result[1]["ours"]["ensemble"] == pytest.approx(85.0)
    flipped = _rows({("a", "ensemble"): (0.97, 0.70, 1.0), ("a", "padim"): (0.95, 0.80, 1.0)})
    assert [r["agrees"] for r in paper_pattern(flipped, paper=paper)] == [False, False]
    with pytest.raises(ValueError, match="padim"):
        paper_pattern(same[:1], paper=paper)


def _toy_maps(seed: int, strength: float):
    rng = np.random.default_rng(seed)
    masks = np.zeros((20, 16, 16), dtype=bool)
    for i in range(8, 20):
        masks[i, 4:8, 5:9] = True
    maps = rng.normal(size=masks.shape) + strength * masks
    return masks, maps, masks.reshape(20, -1).any(1).astype(int), maps.reshape(20, -1).max(1)


def test_difference_interval_calls_identical_methods_a_tie_and_a_clear_gap_not():
    from diffad.evaluate import difference_interval

    masks, good, labels, good_scores = _toy_maps(0, 3.0)
    same = difference_interval(masks, labels, (good, good_scores), (good, good_scores), n_resamples=200)
    assert all(v["difference"] == 0 and v["tie"] for v in same.values())
    _, weak, _, weak_scores = _toy_maps(1, 0.3)
    gap = difference_interval(masks, labels, (good, good_scores), (weak, weak_scores), n_resamples=200)
    assert gap["pixel_auroc"]["difference"] > 0 and not gap["pixel_auroc"]["tie"]
    assert gap["pixel_auroc"]["lo"] <= gap["pixel_auroc"]["difference"] <= gap["pixel_auroc"]["hi"]


def test_interval_markdown_shows_each_metric_with_its_interval():
    from diffad.evaluate import interval_markdown, metric_row

    masks, maps, labels, scores = _toy_maps(2, 1.0)
    row = metric_row("toy", "kl", masks, maps, labels, scores, intervals=100)
    text = interval_markdown([row], ("kl",))
    assert f"{100 * row['pro']:.1f} [{100 * row['pro_lo']:.1f}, {100 * row['pro_hi']:.1f}]" in text
    with pytest.raises(ValueError, match="no intervals"):
        interval_markdown([metric_row("toy", "kl", masks, maps, labels, scores)], ("kl",))


def test_paper_scoring_keeps_the_timesteps_and_takes_the_papers_scoring():
    from diffad.presets import PAPER, get_preset, with_paper_scoring

    cpu = get_preset("cpu")
    scored = with_paper_scoring(cpu)
    assert (scored.alpha, scored.smoothing_sigma, scored.top_k, scored.image_normalization) == (
        PAPER.alpha, 0.0, PAPER.top_k, None)
    assert scored.test_timesteps == cpu.test_timesteps and scored.train_steps == cpu.train_steps


def test_spread_markdown_gives_mean_and_range_over_seeds():
    from diffad.evaluate import spread_markdown

    rows = [{"category": "brick", "method": "ensemble", "seed": s, "pixel_auroc": v, "pro": v, "image_auroc": v}
            for s, v in ((0, 0.90), (1, 0.94), (2, 0.92))]
    text = spread_markdown(rows)
    assert "| brick | ensemble | 0, 1, 2 | 92.0 (90.0-94.0) |" in text and "interval" not in text.split("\n")[2]


def test_spread_against_intervals_finds_the_widest_range_relative_to_its_interval():
    from diffad.evaluate import spread_against_intervals

    def row(category, seed, value, width):
        fields = {m: value for m in ("pixel_auroc", "pro", "image_auroc")}
        for m in ("pixel_auroc", "pro", "image_auroc"):
            fields[f"{m}_lo"], fields[f"{m}_hi"] = value - width / 2, value + width / 2
        return {"category": category, "method": "ensemble", "seed": seed, **fields}

    # brick: range 3 points against intervals of 4 and 2 (mean 3); nut: range 1 against 5
    rows = [row("brick", 0, 0.90, 0.04), row("brick", 1, 0.93, 0.02), row("nut", 0, 0.95, 0.05),
            row("nut", 1, 0.96, 0.05), {**row("nut", 2, 0.5, 0.0), "method": "kl"}]
    found = spread_against_intervals(rows)["pro"]
    assert found["category"] == "brick" and found["method"] == "ensemble"  # kl is not asked for
    assert (found["range"], found["interval"]) == pytest.approx((3.0, 3.0))


def test_averages_markdown_sets_results_side_by_side():
    from diffad.evaluate import averages_markdown

    def rows(value):
        return [{"category": c, "method": m, "pixel_auroc": value, "pro": value / 2, "image_auroc": 1.0}
                for c in ("brick", "nut") for m in ("kl", "padim")]

    text = averages_markdown({"built-in": rows(0.9), "cross-check": rows(0.8)}, ("kl",))
    assert "| method | built-in | cross-check |" in text
    assert "| kl | 90.0 / 45.0 / 100.0 | 80.0 / 40.0 / 100.0 |" in text
    with pytest.raises(ValueError, match="missing"):
        averages_markdown({"built-in": rows(0.9)}, ("ensemble",))


def test_compare_saved_reads_what_reproduce_saved(tmp_path):
    from diffad.evaluate import compare_saved

    masks, maps, labels, scores = _toy_maps(3, 2.0)
    np.savez(tmp_path / "maps.npz", masks=masks, labels=labels, kl=maps, kl_scores=scores,
             padim=maps[::-1].copy(), padim_scores=scores[::-1].copy())
    result = compare_saved(tmp_path, "kl", "kl", n_resamples=50)
    assert result["pro"]["difference"] == 0 and result["pro"]["tie"]
    with pytest.raises(ValueError, match="lacks"):
        compare_saved(tmp_path, "kl", "spade", n_resamples=10)
