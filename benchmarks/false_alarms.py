"""How often does an unchanged suite fail? Run by hand: ``python benchmarks/false_alarms.py [RUNS] [PATH...]``.

For each suite (default: ``examples/``): one ``pytest --trainperf-update-baselines`` into a temporary
baseline directory, then RUNS separate ``pytest --trainperf`` processes of the same, unchanged code
against it, with the plugin's default settings. Counts the cells that failed (false alarms) and the
cells flagged as improved, and the figures of whole grids (``tp.relative``, ``tp.scaling``) that
failed, per run and in all, and writes them to ``docs/false-alarms.md``.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_trainperf.env import cpu_model  # noqa: E402

OUT = ROOT / "docs" / "false-alarms.md"
SUMMARY = re.compile(r"^(\d+) cells? measured: (.*)$", re.M)
FIGURES = re.compile(r"^(\d+) figures? of whole grids: (.*)$", re.M)


def pytest(args: list[str]) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout, done.returncode


def _parse(total: str, parts: str, prefix: str = "") -> dict[str, int]:
    out = {f"{prefix}total": int(total)}
    for part in parts.split(", "):
        n, status = part.split(" ", 1)
        out[f"{prefix}{status}"] = int(n)
    return out


def counts(output: str, code: int) -> dict[str, int]:
    found = SUMMARY.findall(output)
    if not found:
        raise RuntimeError(f"no trainperf summary in:\n{output[-2000:]}")
    out = _parse(*found[-1])
    figures = FIGURES.findall(output)
    if figures:
        out.update(_parse(*figures[-1], prefix="figures "))
    out["failed run"] = int(code != 0)
    return out


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    suites = sys.argv[2:] or ["examples/"]
    rows = []
    for suite in suites:
        with tempfile.TemporaryDirectory() as baselines:
            started = time.time()
            pytest(["--trainperf-update-baselines", f"--trainperf-baselines={baselines}", suite])
            update_s = time.time() - started
            per_run = []
            started = time.time()
            for _ in range(runs):
                per_run.append(counts(*pytest(["--trainperf", f"--trainperf-baselines={baselines}", suite])))
            run_s = (time.time() - started) / runs
        cells = sum(r["total"] for r in per_run)
        regressed = sum(r.get("regressed", 0) for r in per_run)
        improved = sum(r.get("improved", 0) for r in per_run)
        figures = sum(r.get("figures total", 0) for r in per_run)
        figures_failed = sum(r.get("figures regressed", 0) for r in per_run)
        failing_runs = sum(r["failed run"] for r in per_run)
        rows.append(f"| `{suite}` | {runs} | {cells} | {regressed} ({regressed / cells:.1%}) | "
                    f"{figures} | {figures_failed} ({figures_failed / max(figures, 1):.1%}) | {failing_runs} | "
                    f"{improved} ({improved / cells:.1%}) | {update_s:.0f} s | {run_s:.0f} s |")
        print(rows[-1], flush=True)
    command = f"python benchmarks/false_alarms.py {runs} {' '.join(suites)}"
    OUT.write_text(f"""# False alarms: unchanged code against its own baseline

Measured with `{command}` on {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}.
One update, then {runs} separate `pytest --trainperf` processes of the same code, default settings
(10% step-time tolerance widened to the noise band of 5 update rounds, shifted-null Mann-Whitney test,
Benjamini-Hochberg across each grid, one confirmation, threads = torch's count less one, glibc malloc
thresholds fixed; figures of whole grids: 5% on a relative timing, 0.25 on an exponent, widened by
their noise bands, timing figures confirmed by one re-measurement of their cells).

| suite | runs | cells compared | cells failed (false alarms) | figures compared | figures failed | runs that failed | cells flagged improved | update wall time | compare wall time per run |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
