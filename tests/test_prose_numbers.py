"""No hand-typed computed numbers in the book's prose (issue #26).

A decimal number in a chapter's markdown is either printed by one of that chapter's cells (so nbval
pins it: if a rerun changes it, the stored output no longer matches, and this test then finds the
prose stale), or it is a constant that prose may quote, listed in ``ALLOWED`` with its reason: a
number of the paper, a constant of a schedule or a metric, an input or a step of a derivation in a
question or its answer. Anything else is a number someone typed from an output, and it fails here.

Covered means: the same token appears in an output of the chapter (stdout, text/plain,
text/markdown or text/html), or, for a number of three or more significant digits, an output has
it with more decimals (0.9559 covers 0.956). Numbers in code (fenced blocks, inline code, a
literalinclude) and glued to a word (v2.3, 1e-4's digits) are not prose.
"""

from __future__ import annotations

import copy
import json
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))

# Fenced blocks: prose inside an admonition (answers, solutions) is checked; code, literalinclude
# and other directives are not.
FENCE = re.compile(r"^[ \t]*(`{3,}|:{3,})[ \t]*(\{[^}\n]*\})?[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
PROSE_DIRECTIVES = ("{admonition}", "{note}", "{tip}", "{warning}", "{important}", "{hint}")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)|https?://\S+")
NUMBER = re.compile(r"(?<![\w.\\])\d+\.\d+(?![\w.]*\d)")
OUTPUT_NUMBER = re.compile(r"\d+\.\d+")

# chapter -> number -> why prose may quote it without a cell printing it.
PAPER = "quoted from the paper"
ALLOWED: dict[str, dict[str, str]] = {
    "01_introduction": {
        "2.2": "the size in GB of OpenAI's checkpoint, a property of the download",
        "0.4": "16 of 4096 pixels, worked out in the sentence",
        "0.01": "sqrt(1 - alpha-bar_t) of the linear schedule, a derivation in answer 1",
        "0.59": "sqrt(1 - alpha-bar_t) of the linear schedule, a derivation in answer 1",
        "0.90": "sqrt(1 - alpha-bar_t) of the linear schedule, a derivation in answer 1",
    },
    "02_data": {
        "4.0": "the licence's version (CC BY-NC-SA 4.0)",
        "0.25": "an input of question 1",
        "1.2": "an input of question 1",
        "0.02": "beta_T of the paper's linear schedule, a constant",
        "0.9937": "alpha-bar at step 20 of the linear schedule, a derivation in a question",
        "1.1": "answer 1's derivation",
        "0.079": "answer 2's derivation",
        "0.997": "answer 2's derivation",
        "1.3": "answer 2's derivation",
        "0.63": "answer 2's derivation",
    },
    "03_features": {
        "0.9": "k_0.9, the name of a quantity (the share of variance), in a question",
        "0.450": "answer 1's derivation (ImageNet statistics rescaled)",
        "0.030": "answer 1's derivation (ImageNet statistics rescaled)",
        "2.25": "answer 2's derivation",
        "2.12": "answer 2's derivation",
        "4.37": "answer 2's derivation",
        "0.19": "answer 2's derivation",
        "6.6": "answer 3's derivation (a ratio of channel counts)",
    },
    "04_diffusion": {
        "0.5": "f = (v + 1) / 2 at v = 0, a derivation",
        "1.2": "beta_1 of the linear schedule (1.2e-4), a derivation in a question",
        "2.2": "beta_1 / beta~_1, a constant of the linear schedule (chapter 5 prints it)",
        "1.29": "beta_t / beta~_t at t = 5, a constant of the linear schedule (chapter 5 prints it)",
        "1.16": "beta_t / beta~_t at t = 10, a constant of the linear schedule (chapter 5 prints it)",
        "1.09": "beta_t / beta~_t at t = 20, a constant of the linear schedule (chapter 5 prints it)",
        "1.42": "beta_t / beta~_t of the paper's respaced schedule, a constant of the linear schedule (chapter 5 prints it)",
        "1.03": "beta_t / beta~_t of the paper's respaced schedule, a constant of the linear schedule (chapter 5 prints it)",
        "1.01": "beta_t / beta~_t of the paper's respaced schedule, a constant of the linear schedule (chapter 5 prints it)",
        "1.02": "1 - f at f = -0.02, answer 2's derivation",
    },
    "05_kl_score": {
        "0.3": "PRO's false-positive limit, a constant of the metric",
        "0.2508": "log(1.285), a step of answer 1's derivation",
        "0.7782": "1/1.285, a step of answer 1's derivation",
        "0.0145": "g(1.285) in nats, a step of answer 1's derivation",
        "0.15": "an input of answer 2's worked example",
        "0.03": "0.3 squared over three channels, a step of answer 2's worked example",
        "0.0225": "a step of answer 2's worked example",
        "0.1": "a step of answer 2's worked example",
    },
    "06_feature_score": {
        "0.5": "an input of a question",
        "2.5": "the width of a grid cell in pixels, an input of a question",
        "0.25": "answer 3's derivation",
        "0.6": "answer 3's derivation",
    },
    "07_ensemble": {
        "0.09": "sigma_F / (1 + sigma_F) at 0.1, answer 1's derivation",
        "7.9": "sqrt((1 - q) / q) at q = 1/64, answer 2's derivation",
        "2.66": "the standard normal's upper 1/256 quantile, answer 2's derivation",
        "3.0": "the mean of a normal map's top pixels, answer 2's derivation",
        "9.8": "the crossing point of answer 2's derivation",
        "0.10": "the crossing point of answer 2's derivation",
        "1.7": "sqrt((1 - q) / q) at q = 1/4, answer 2's derivation",
    },
    "08_gradient_denoising": {
        "0.02": "the paper's step size s, a constant",
        "0.9998": "sqrt(1 - 0.02^2), a derivation",
        "2.5": "0.02 of the [-1, 1] range in grey levels, answer 1's derivation",
        "0.0004": "s^2 at s = 0.02, answer 1's derivation",
        "0.1": "answer 1's derivation",
        "0.90": "answer 1's derivation",
        "0.000025": "s^2 at s = 0.005, answer 1's derivation",
        "0.998": "answer 1's derivation",
    },
    "09_metrics": {
        "0.4444": "4/9, answer 2's derivation",
    },
    "10_table1": {
        "1.0": "the cpu preset's alpha, a constant of the preset (chapter 10b's ledger prints it)",
        "0.5": "the paper's alpha, a constant of the paper preset, and an input of answer 1's derivation",
        "0.3": "PRO's false-positive limit, a constant of the metric, in answer 1",
        "0.15": "answer 1's derivation",
        "0.23": "answer 1's derivation",
    },
    "10b_checks": {
        "0.9": "an input of question 1",
        "0.03": "an input of question 1",
        "1.96": "the normal quantile of a 95% interval, answer 1's derivation",
        "0.039": "answer 1's derivation",
        "0.00008": "answer 1's derivation",
        "0.0089": "answer 1's derivation",
        "0.0175": "answer 1's derivation",
        "0.012": "answer 1's derivation",
        "0.048": "answer 1's derivation",
        "0.0008": "answer 1's derivation",
        "0.028": "answer 1's derivation",
        "0.055": "answer 1's derivation",
    },
    "11_ablations": {
        "1.29": "beta_t / beta~_t of the linear schedule at t = 5, a constant (chapter 5 prints it)",
        "1.16": "beta_t / beta~_t of the linear schedule at t = 10, a constant (chapter 5 prints it)",
        "1.09": "beta_t / beta~_t of the linear schedule at t = 20, a constant (chapter 5 prints it)",
        "1.42": "beta_t / beta~_t of the paper's respaced schedule, a constant (chapter 5 prints it)",
        "1.03": "beta_t / beta~_t of the paper's respaced schedule, a constant (chapter 5 prints it)",
        "1.01": "beta_t / beta~_t of the paper's respaced schedule, a constant (chapter 5 prints it)",
        "0.015": "the mismatch bound in nats, answer 1's derivation",
    },
    "11b_unified": {
        "1.1": f"Table 2's PRO loss of the unified model, {PAPER}",
        "0.970": "alpha-bar of the linear schedule, a derivation in a question",
        "0.654": "alpha-bar of the linear schedule, a derivation in a question",
        "0.9937": "alpha-bar of the linear schedule, a derivation in a question",
        "0.9991": "alpha-bar of the linear schedule, a derivation in a question",
        "0.17": "answer 1's derivation (noise of the linear schedule)",
        "0.985": "answer 1's derivation (noise of the linear schedule)",
        "0.59": "answer 1's derivation (noise of the linear schedule)",
        "0.81": "answer 1's derivation (noise of the linear schedule)",
        "3.4": "answer 1's derivation (noise of the linear schedule)",
        "0.030": "answer 1's derivation (noise of the linear schedule)",
        "0.079": "answer 1's derivation (noise of the linear schedule)",
        "2.6": "answer 1's derivation (noise of the linear schedule)",
    },
    "13_authors_code": {
        "0.5": "the mean and std the TensorFlow weights expect, constants",
        "0.99": "the cpu preset's EMA rate, a constant of the preset",
        "0.997": "the paper's EMA rate, a constant of the preset",
    },
    "15_your_object": {
        "0.01": "the 1% false-alarm rate, an input of answer 1",
    },
}


def _prose(markdown: str) -> str:
    """A markdown cell's prose: code blocks, inline code and link targets removed, admonitions kept."""
    def keep(match: re.Match) -> str:
        directive = (match.group(2) or "").strip()
        return match.group(3) if directive in PROSE_DIRECTIVES else "\n"

    previous = None
    while previous != markdown:  # a ::: admonition may hold a ``` block
        previous, markdown = markdown, FENCE.sub(keep, markdown)
    return LINK_TARGET.sub("", INLINE_CODE.sub("", markdown))


def prose_numbers(nb: dict) -> list[tuple[int, str, str]]:
    """(cell index, number, the words around it) of every decimal number in the markdown prose."""
    found = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = _prose("".join(cell["source"]))
        for match in NUMBER.finditer(text):
            around = " ".join(text[max(0, match.start() - 60):match.end() + 30].split())
            found.append((index, match.group(), around))
    return found


def output_text(nb: dict) -> str:
    """Everything the chapter's cells printed or displayed as text."""
    parts = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if output["output_type"] == "stream":
                parts.append("".join(output["text"]))
            for mime in ("text/plain", "text/markdown", "text/html"):
                value = output.get("data", {}).get(mime)
                if value is not None:
                    parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)


def _significant(number: str) -> int:
    return len(number.replace(".", "").lstrip("0"))


def covered(number: str, printed: set[str]) -> bool:
    """Printed as it stands, or (three significant digits or more) printed with more decimals."""
    if number in printed:
        return True
    if _significant(number) < 3:
        return False
    places = Decimal(1).scaleb(-len(number.split(".")[1]))
    value = Decimal(number)
    return any(len(p.split(".")[1]) > len(number.split(".")[1])
               and value in (Decimal(p).quantize(places, ROUND_HALF_UP), Decimal(p).quantize(places, ROUND_HALF_EVEN))
               for p in printed)


def uncovered(nb: dict, allowed: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
    """The prose numbers that no output of the notebook prints and ``allowed`` does not list."""
    allowed = allowed or {}
    printed = set(OUTPUT_NUMBER.findall(output_text(nb)))
    return [(i, n, around) for i, n, around in prose_numbers(nb) if n not in allowed and not covered(n, printed)]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------- the rule on examples

def synthetic(prose: str, printed: str) -> dict:
    return {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": [prose]},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": ["print(pro)"],
         "outputs": [{"output_type": "stream", "name": "stdout", "text": [printed]}]},
    ]}


def test_a_planted_typed_number_fails():
    nb = synthetic("The ensemble's PRO rose to 0.953, well above the KL map.", "PRO 0.9125\n")
    assert [n for _, n, _ in uncovered(nb)] == ["0.953"]


def test_a_printed_number_passes_and_rounding_needs_three_digits():
    assert uncovered(synthetic("PRO rose to 0.912.", "PRO 0.9125\n")) == []  # 0.9125 -> 0.912 (half even)
    assert uncovered(synthetic("PRO rose to 0.913.", "PRO 0.9125\n")) == []  # and half up
    assert uncovered(synthetic("PRO rose to 0.9125.", "PRO 0.9125\n")) == []
    # a short number is not read off a longer one: 0.9 is not "covered" by 0.9125
    assert [n for _, n, _ in uncovered(synthetic("PRO rose by 0.9 points.", "PRO 0.9125\n"))] == ["0.9"]


def test_code_and_allowed_numbers_are_not_prose():
    prose = ("Run `alpha=0.5`; the paper reports 0.7.\n\n```python\nx = 0.25\n```\n\n"
             "```{admonition} Answers\n:class: dropdown\nThe answer is 0.42.\n```\n")
    nb = synthetic(prose, "nothing\n")
    assert [n for _, n, _ in uncovered(nb)] == ["0.7", "0.42"]  # the answer's prose is checked
    assert [n for _, n, _ in uncovered(nb, {"0.7": PAPER})] == ["0.42"]
    assert prose_numbers(synthetic("anomalib v2.3 and 1.5x", ""))[0][1] == "1.5"


def test_a_typed_number_planted_in_a_chapter_fails():
    path = next(p for p in NOTEBOOKS if p.stem.startswith("07"))
    nb = copy.deepcopy(load(path))
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": ["PRO at alpha 0.5 is 0.9517."]})
    before = uncovered(load(path), ALLOWED.get(path.stem))
    found = uncovered(nb, ALLOWED.get(path.stem))
    assert [entry[1] for entry in found if entry not in before] == ["0.9517"], found


# ------------------------------------------------------------------------------ the book itself

@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_prose_number_is_printed_or_allowed(path):
    found = uncovered(load(path), ALLOWED.get(path.stem))
    assert not found, "typed numbers that no cell prints (print them from a cell, reword, or allow with a reason):\n" + \
        "\n".join(f"  cell {i}: {n}  ...{around}..." for i, n, around in found)


def test_the_allow_list_is_needed():
    """Every allowed number still occurs in its chapter's prose and is not printed there anyway."""
    stale = []
    for stem, numbers in ALLOWED.items():
        nb = load(ROOT / "book" / f"{stem}.ipynb")
        printed = set(OUTPUT_NUMBER.findall(output_text(nb)))
        in_prose = {n for _, n, _ in prose_numbers(nb)}
        stale += [(stem, n) for n in numbers if n not in in_prose or covered(n, printed)]
    assert not stale, f"allow-list entries no longer needed: {stale}"


def test_every_reason_is_given():
    assert all(reason.strip() for numbers in ALLOWED.values() for reason in numbers.values())
