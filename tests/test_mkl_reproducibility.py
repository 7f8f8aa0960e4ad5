"""diffad asks MKL for strict conditional numerical reproducibility unless the user chose otherwise."""

import os
import subprocess
import sys


def _mkl_cbwr_after_import(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if env_value is not None:
        env["MKL_CBWR"] = env_value
    code = "import os, diffad; print(os.environ.get('MKL_CBWR'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_diffad_sets_strict_mkl_reproducibility():
    assert _mkl_cbwr_after_import(None) == "AUTO,STRICT"


def test_a_users_own_mkl_setting_is_kept():
    assert _mkl_cbwr_after_import("COMPATIBLE") == "COMPATIBLE"
