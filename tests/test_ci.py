"""CI use through pytester: JSON/Markdown/JUnit outputs, pytest-xdist aggregation, device assignment,
concurrent baseline updates, and ``python -m pytest_trainperf`` through a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch  # noqa: F401  (loaded before pytester's in-process runs, as conftest.py expects)
from results_schema import validate_results

pytest.importorskip("xdist")

# A tiny real training step per cell: the tests here are about where results go, not about timing.
WORKLOAD = """
import torch
from torch import nn
import pytest_trainperf as tp

EXTRA = {extra}

@tp.grid(batch_size=[2, 4], width=[8, 16])
def test_mlp(trainperf, batch_size, width):
    torch.manual_seed(0)
    model = nn.Linear(width, 1).to(trainperf.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(batch_size, width, generator=torch.Generator().manual_seed(1)).to(trainperf.device)

    def step():
        opt.zero_grad(set_to_none=True)
        scratch = torch.ones(EXTRA * 2**18) if EXTRA else None
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        del scratch
        return loss

    trainperf.train(step, steps=3, warmup=1, items_per_step=batch_size)
"""
CELLS = ["batch_size=2-width=8", "batch_size=2-width=16", "batch_size=4-width=8", "batch_size=4-width=16"]
ONE_THREAD = "[pytest]\ntrainperf_threads = 1\n"
XDIST = ("-p", "no:cacheprovider")
"""xdist runs: workers are processes of their own; the controller runs in-process."""


@pytest.fixture(autouse=True)
def _one_thread(pytester: pytest.Pytester) -> None:
    pytester.makeini(ONE_THREAD)


def workload(extra: int = 0) -> str:
    return WORKLOAD.format(extra=extra)


def test_help_lists_the_ci_options(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--trainperf-json=PATH*", "*--trainperf-markdown=PATH*",
                                 "*--trainperf-devices=DEVICES*"])
    for ini in ("trainperf_json", "trainperf_markdown", "trainperf_devices"):
        assert ini in result.stdout.str()


@pytest.mark.parametrize(("arg", "expected"), [
    ("--trainperf-devices=cuda:0,gpu1", "*--trainperf-devices*expected a comma-separated list of devices*"
                                        "got 'cuda:0,gpu1'*"),
    ("--trainperf-devices=auto", "*--trainperf-devices*expected a comma-separated list of devices*got 'auto'*"),
    ("--trainperf-json=out/", "*--trainperf-json*expected a file path*got 'out/'*"),
])
def test_bad_ci_option_is_refused_at_parse_time(pytester: pytest.Pytester, arg: str, expected: str) -> None:
    result = pytester.runpytest(arg)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_json_markdown_and_junit_without_xdist(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = pytester.path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(test_rec="""
        def test_eval(trainperf):
            trainperf.record("accuracy", 0.9, higher_is_better=True)
    """)
    result = pytester.runpytest("--trainperf", "--trainperf-json=out/r.json", "--trainperf-markdown=out/r.md",
                                "--junitxml=out/junit.xml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["trainperf: JSON results: out/r.json", "trainperf: Markdown report: out/r.md",
                                 "trainperf: Markdown report appended to $GITHUB_STEP_SUMMARY"])
    doc = json.loads((pytester.path / "out" / "r.json").read_text())
    validate_results(doc)
    (cell,) = doc["cells"]
    assert cell["nodeid"] == "test_rec.py::test_eval" and cell["status"] == "new"
    markdown = (pytester.path / "out" / "r.md").read_text()
    assert summary.read_text() == "earlier step\n" + markdown + "\n"
    case = ET.parse(pytester.path / "out" / "junit.xml").getroot().find(".//testcase")
    assert case is not None
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["trainperf.status"] == "new" and props["trainperf.environment"].startswith("cpu | ")


def test_xdist_workers_send_their_cells_to_one_summary_json_and_markdown(pytester: pytest.Pytester,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    summary = pytester.path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(extra=4))  # 4 MiB more peak memory: a regression in every cell
    summary.write_text("")
    result = pytester.runpytest("-n", "2", *XDIST, "--trainperf", "--trainperf-json=r.json",
                                           "--trainperf-markdown=r.md", "--junitxml=junit.xml")
    result.assert_outcomes(failed=4)
    out = result.stdout.str()
    assert out.count("4 cells measured: 4 regressed") == 1
    assert out.count("test_work.py::test_mlp · peak_memory") == 1
    doc = json.loads((pytester.path / "r.json").read_text())
    validate_results(doc)
    assert sorted(c["cell"] for c in doc["cells"]) == sorted(CELLS)
    assert {k: v for k, v in doc["summary"].items() if k != "machine"} == {"cells": 4, "regressed": 4}
    assert doc["summary"]["machine"]["cells"] == 4  # how this runner compared, over the cells of both workers
    memory = [m for c in doc["cells"] for m in c["verdict"]["metrics"] if m["name"] == "peak_memory"]
    assert all(m["status"] == "regressed" and m["current"] - m["baseline"] == 4 * 2**20 for m in memory)
    markdown = (pytester.path / "r.md").read_text()
    assert summary.read_text() == markdown + "\n"
    assert markdown.index("### Regressions") < markdown.index("#### `test_work.py::test_mlp` · peak_memory (MiB)")
    assert markdown.count("**REGR**") >= 4
    cases = ET.parse(pytester.path / "junit.xml").getroot().findall(".//testcase")
    assert len(cases) == 4
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["trainperf.status"] == "regressed"
        assert float(props["trainperf.peak_memory.change"]) > 0 and float(props["trainperf.step_time"]) > 0


def test_each_worker_measures_on_its_own_device(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_dev="""
        import os
        from pytest_trainperf.plugin import SESSION_KEY

        def test_device(request):
            worker = os.environ["PYTEST_XDIST_WORKER"]
            device = request.config.stash[SESSION_KEY].settings.device
            (request.config.rootpath / f"{worker}.txt").write_text(device)
    """)
    # --dist each: every worker runs the test once
    result = pytester.runpytest("-n", "2", "--dist", "each", *XDIST, "--trainperf-devices=cpu,cuda:1")
    result.assert_outcomes(passed=2)
    found = {w: (pytester.path / f"{w}.txt").read_text() for w in ("gw0", "gw1")}
    assert found == {"gw0": "cpu", "gw1": "cuda:1"}


def test_four_workers_updating_one_file_lose_no_cell(pytester: pytest.Pytester) -> None:
    cells = [f"n={n}" for n in range(12)]
    pytester.makepyfile(test_rec="""
        import pytest_trainperf as tp

        @tp.grid(n=list(range(12)))
        def test_rec(trainperf, n):
            trainperf.record("value", float(n))
    """)
    threads = os.cpu_count() or 1  # 4 workers x all the cores each: oversubscribed on any machine
    result = pytester.runpytest("-n", "4", *XDIST, "--trainperf-update-baselines",
                                f"--trainperf-threads={threads}", "--trainperf-json=r.json")
    result.assert_outcomes(passed=12)
    out = result.stdout.str()
    assert out.count("baselines updated: 12 values in 1 file") == 1
    result.stdout.fnmatch_lines([f"trainperf warning: 4 pytest-xdist workers x {threads} measuring thread*: "
                                 "CPU timings compete for cores, so step_time and throughput are unsound in this "
                                 "run; the exact metrics (flops, peak_memory, loss and recorded values) are still "
                                 "sound.*"])
    assert out.count("trainperf warning:") == 1
    baselines = pytester.path / "baselines"
    (env,) = json.loads((baselines / "test_rec.json").read_text())["environments"].values()
    assert sorted(env["tests"]["test_rec"]) == sorted(cells)
    assert [p.name for p in baselines.iterdir()] == ["test_rec.json"]  # no temporary file left behind
    doc = json.loads((pytester.path / "r.json").read_text())
    assert len(doc["baseline_changes"]) == 12 and len(doc["warnings"]) == 1


# ------------------------------------------------------------------ python -m pytest_trainperf


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_trainperf", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})


def test_cli_merges_shards_diffs_sessions_and_shows_baselines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-json=old.json").assert_outcomes(
        passed=4)
    shard = "test_work.py::test_mlp[batch_size=2-width=8]"
    pytester.makepyfile(test_work=workload(extra=4))
    pytester.runpytest("--trainperf", "--trainperf-json=a.json", shard).assert_outcomes(failed=1)
    pytester.runpytest("--trainperf", "--trainperf-json=b.json", "--deselect", shard).assert_outcomes(
        failed=3)
    root = pytester.path

    merged = cli("merge", "a.json", "b.json", "-o", "all.json", cwd=root)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == "all.json: 4 cells from 2 files"
    doc = json.loads((root / "all.json").read_text())
    validate_results(doc)
    assert sorted(c["cell"] for c in doc["cells"]) == sorted(CELLS)

    twice = cli("merge", "a.json", "all.json", "-o", "bad.json", cwd=root)
    assert twice.returncode == 2 and not (root / "bad.json").exists()
    assert f"error: all.json: {shard} (environment cpu | " in twice.stderr
    assert "is also in a.json; expected shards with distinct cells" in twice.stderr

    (root / "foreign.json").write_text('{"some": "other tool"}')
    foreign = cli("merge", "a.json", "foreign.json", "-o", "bad.json", cwd=root)
    assert foreign.returncode == 2 and "foreign.json: not a pytest-trainperf result file" in foreign.stderr

    diff = cli("diff", "old.json", "all.json", "--markdown", "diff.md", cwd=root)
    assert diff.returncode == 1, diff.stderr
    assert "4 cells measured: 4 regressed" in diff.stdout
    assert f"regressed: {shard}" in diff.stdout and "  peak_memory: baseline " in diff.stdout
    assert "### Regressions" in (root / "diff.md").read_text()
    same = cli("diff", "old.json", "old.json", cwd=root)
    assert same.returncode == 0 and "4 cells measured: 4 unchanged" in same.stdout

    show = cli("show", "baselines/test_work.json", "--show", "peak_memory,loss", cwd=root)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert lines[0] == "baselines/test_work.json" and lines[1].startswith("environment: cpu | ")
    assert any(line.startswith("test_mlp · peak_memory (") for line in lines) and "test_mlp · loss" in lines
    assert "new" not in show.stdout.split("REGR regressed")[0] and "%" not in show.stdout
    missing = cli("show", "baselines/nothing.json", cwd=root)
    assert missing.returncode == 2 and "baselines/nothing.json: no such baseline file" in missing.stderr
