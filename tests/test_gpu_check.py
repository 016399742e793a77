"""benchmarks/gpu_check.sh: its dry run (every step of the GPU check on the CPU with tiny models) and its options."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tool_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args, timeout=1500):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=tool_env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=timeout)


def test_wrong_or_missing_options_are_refused():
    proc = _run("--gpus", "8", timeout=60)
    assert proc.returncode == 2 and "unknown option '--gpus'" in proc.stderr
    proc = _run("--dry-run", timeout=60)
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "check"
    proc = _run("--dry-run", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["passed"] and summary["dry_run"], proc.stdout[-4000:]
    assert [s["step"] for s in summary["steps"]] == ["environment", "gpu_tests", "mfu_base", "giant_zero3", "demo_data",
                                                    "demo_tokenizer", "demo_pretrain", "demo_report"]
    files = {p.name for p in out.iterdir()}
    assert files == {"environment.json", "gpu_tests.xml", "mfu_base_bf16.json", "giant_zero3.json",
                     "pretrain_demo.json", "summary.json", "gpu_check.log"}  # <= 8: what the GPU tool brings back
    tests = (out / "gpu_tests.xml").read_text()
    assert 'tests="4"' in tests and 'failures="0"' in tests and 'errors="0"' in tests and 'skipped="0"' in tests
    mfu = json.loads((out / "mfu_base_bf16.json").read_text())
    assert {"backbone_pair", "pretrain_precomputed", "pretrain_deepspeed"} <= set(mfu["cases"])
    giant = json.loads((out / "giant_zero3.json").read_text())
    assert set(giant["cases"]) == {"pretrain_deepspeed"} and giant["config"]["zero_stage"] == 3
    demo = json.loads((out / "pretrain_demo.json").read_text())
    assert demo["steps"] == 4 and demo["eval_rows"], demo
