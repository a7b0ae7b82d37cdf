"""A compare run where the screen flags nothing: the suite of ``screen.py``, its stored step times doubled
by hand (every cell then runs far faster than its baseline), run in turns with the default (screen, then
confirm) and with ``--trainperf-confirm-against=none`` (the stored verdict alone, standing in for the
compare run before the screen). Prints the wall times and their ratio; the issue-12 goal is at most 1.2.

    python benchmarks/screen_nothing.py --runs 4   # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import screen  # noqa: E402  (the suite, the repository and one pytest run)

MODES = {"confirm": [], "stored only": ["--trainperf-confirm-against=none"]}


def slow_baselines(repo: Path, factor: float = 2.0) -> None:
    """Multiply every stored step time by ``factor`` (and divide throughput by it), then commit."""
    (path,) = (repo / "baselines").glob("*.json")
    doc = json.loads(path.read_text())
    for environment in doc["environments"].values():
        for cells in environment["tests"].values():
            for entry in cells.values():
                for name, scale in (("step_time", factor), ("throughput", 1 / factor)):
                    metric = entry["metrics"][name]
                    for key in ("rounds", "samples"):
                        metric[key] = [v * scale for v in metric[key]]
                    metric["value"] *= scale
    path.write_text(json.dumps(doc, indent=1))
    screen.git(repo, "add", "-A")
    screen.git(repo, "commit", "-qm", "baselines, step times doubled")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="runs of each mode (default %(default)s)")
    args = parser.parse_args(argv)
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="trainperf-nothing-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        screen.make_repo(repo)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--trainperf-update-baselines"], cwd=repo, capture_output=True, check=True)
        slow_baselines(repo)
        for number in range(args.runs):
            order = list(MODES) if number % 2 == 0 else list(reversed(MODES))  # in turns
            for mode in order:
                wall, doc = screen.pytest_run(repo, ["--trainperf", *MODES[mode]], pinned=False)
                cells, failed, confirmed, _, stored = screen.counts(doc)
                walls[mode].append(wall)
                print(f"{mode}: {wall:.1f} s, {cells} cells, {failed} failed, {confirmed} confirmed side by side, "
                      f"step time against the stored baseline {statistics.median(stored):+.1%} (median)", flush=True)
    for mode, values in walls.items():
        print(f"{mode}: median {statistics.median(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})")
    print(f"ratio: {statistics.median(walls['confirm']) / statistics.median(walls['stored only']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
