"""The chapters whose outputs come from long iterative computations print the same digits on
another machine.

nbval compares every chapter with its stored outputs once, under this machine's defaults. A
computation that feeds its own result back many times (gradient denoising's steps: each moves
the image by a fixed amount along a gradient taken where the last step landed) amplifies the
last bits of float32 arithmetic, which depend on the CPU's vector width, the thread count and
the BLAS kernel chosen. Chapter 8 runs its short probe in float64 (``diffad.denoise``), which
holds it to the printed digit; the long runs (chapter 8's trajectory, chapter 14's Fig. 7 row)
outgrow even float64, and the chapters print what they conclude from them instead. This test
runs both chapters under another configuration (another thread count, AVX2 kernels for ATen,
oneDNN and MKL), so an output that depends on the machine fails here and not on a newcomer's machine.

Slow (91 s in the test command on 2 cores). It is handed out last, after the chapters and the unit
tests (``conftest.py``), and reads the cache the chapters filled (book/cache: data, scored maps)
instead of recomputing; anything not there yet it computes under the cache's locks.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The chapters with long iterative computations: gradient denoising (chapter 8, and chapter 14's
# Fig. 7 row).
ITERATIVE_CHAPTERS = ("book/08_gradient_denoising.ipynb", "book/14_scorecard.ipynb")


def other_thread_count() -> str:
    """A thread count other than the one the chapters ran with: the test command's workers run one
    thread each on two cores (conftest.py), so two; one where the chapters ran with more."""
    own = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    return "2" if own == 1 else "1"


# Another machine, as far as one machine can play it: another thread count, AVX2 kernels instead
# of AVX-512 where the CPU has them (ATen's own and oneDNN's), MKL's AVX2 code path.
OTHER_THREADS = other_thread_count()
OTHER_MACHINE = {
    "OMP_NUM_THREADS": OTHER_THREADS,
    "MKL_NUM_THREADS": OTHER_THREADS,
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
}


@pytest.mark.slow
@pytest.mark.after_chapters
def test_iterative_chapters_print_the_same_digits_on_another_configuration():
    env = {**os.environ, **OTHER_MACHINE}
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *ITERATIVE_CHAPTERS]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"nbval under {OTHER_MACHINE}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
