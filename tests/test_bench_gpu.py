"""``bench/gpu.py --smoke``: the GPU benchmark's own code on the tiny models, on CPU, so the
table a lent GPU prints is known to come out (no figure here is a GPU's, and none is judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
ROWS = (
    ("tiny SD 1.x", "lorapipe, caches on"),
    ("tiny SD 1.x", "per-step encoding"),
    ("tiny SDXL", "lorapipe, caches on"),
    ("tiny SDXL", "per-step encoding"),
    ("generation, tiny SD 1.x", "lorapipe, batch 8"),
    ("generation, tiny SD 1.x", "one pipeline call per image"),
)


def test_the_smoke_run_prints_every_row_of_the_table() -> None:
    finished = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    table = [line for line in finished.stdout.splitlines() if line.startswith("| ")]
    header, _, *rows = table
    assert header.split(" | ")[1:6] == [
        "variant", "throughput", "peak memory", "achieved", "of bf16 peak"
    ]  # fmt: skip
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert [(run.split(",")[0], variant) for run, variant, *_ in cells] == [
        (run.split(",")[0], variant) for run, variant in ROWS
    ]
    for run, _, throughput, *_ in cells:
        assert float(throughput.split()[0]) > 0, run
    trained = [cell for cell in cells if not cell[0].startswith("generation")]
    assert all("FLOP/s" in cell[4] and "AdamW" in cell[6] for cell in trained)
    assert "lorapipe" in cells[-1][6] and "max pixel difference" in cells[-1][6]
    assert "device: CPU" in finished.stdout
