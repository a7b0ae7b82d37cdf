"""Exact work counts of the instrumented step (measure/work.py): what each sees of a step, how they are
stored with a baseline, and that a defect injected into a baselined cell fails it naming the cause."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pytest_trainperf import judge, stats, store  # noqa: E402
from pytest_trainperf.measure.work import TRAFFIC_METRICS, count_work  # noqa: E402
from pytest_trainperf.records import Breakdown, Fingerprint, Measurement, Metric, Status  # noqa: E402

# ------------------------------------------------------------------ what the counter sees

X = torch.arange(8.0) - 3
MASK = X > 0
REPEATS = torch.tensor([1, 2, 0, 1, 1, 2, 1, 1])


@pytest.mark.parametrize(("name", "fn", "expected"), [
    ("item", lambda: X.sum().item(), "aten._local_scalar_dense"),
    ("bool", lambda: bool(X.sum() > 0), "aten._local_scalar_dense"),
    ("float", lambda: float(X.sum()), "aten._local_scalar_dense"),
    ("if tensor", lambda: 1 if MASK.any() else 0, "aten._local_scalar_dense"),
    ("equal", lambda: torch.equal(X, X), "aten.equal"),
    ("nonzero", lambda: torch.nonzero(MASK), "aten.nonzero"),
    ("where(mask)", lambda: torch.where(MASK), "aten.nonzero"),
    ("mask index", lambda: X[MASK], "aten.index"),
    ("mask assignment", lambda: X.clone().__setitem__(MASK, 0.0), "aten.index_put_"),
    ("masked_select", lambda: X.masked_select(MASK), "aten.masked_select"),
    ("unique", lambda: torch.unique(REPEATS), "aten._unique2"),
    ("unique dim", lambda: torch.unique(REPEATS.view(2, 4), dim=0), "aten.unique_dim"),
    ("unique_consecutive", lambda: torch.unique_consecutive(REPEATS), "aten.unique_consecutive"),
    ("repeat_interleave", lambda: torch.repeat_interleave(X, REPEATS), "aten.repeat_interleave"),
])
def test_each_kind_of_host_sync_is_counted_once_at_its_source_line(name: str, fn: object, expected: str) -> None:
    with count_work() as work:
        fn()  # type: ignore[operator]
    ((site, n),) = work.syncs.items()
    assert n == 1
    assert site.startswith(f"{Path(__file__).name}:") and site.endswith(f"({expected})"), site
    line = int(site.split(":")[1].split()[0])
    source = Path(__file__).read_text().splitlines()[line - 1].strip()
    assert f"`{source[:80]}`" in site  # the test's own line, not a frame inside torch


@pytest.mark.parametrize(("name", "fn"), [
    ("repeat_interleave with output_size", lambda: torch.repeat_interleave(X, REPEATS, output_size=9)),
    ("repeat_interleave by an int", lambda: torch.repeat_interleave(X, 2)),
    ("integer index", lambda: X[torch.tensor([0, 2])]),
    ("cpu of a cpu tensor", lambda: X.cpu()),
    ("tolist of a cpu tensor", lambda: X.tolist()),  # dispatches nothing on the CPU: not seen
    ("arithmetic", lambda: (X * 2).sum()),
])
def test_what_does_not_wait_for_the_device_is_not_a_sync(name: str, fn: object) -> None:
    with count_work() as work:
        fn()  # type: ignore[operator]
    assert not work.syncs


def test_on_an_accelerator_a_sync_op_on_a_cpu_tensor_is_not_counted() -> None:
    step = torch.tensor(3.0)  # as an optimizer keeps its step counter, on the CPU beside CUDA parameters
    with count_work("cuda") as accelerator:
        step.item()
    with count_work("cpu") as cpu:
        step.item()
    assert not accelerator.syncs and sum(cpu.syncs.values()) == 1
    assert accelerator.ops == cpu.ops == {"aten._local_scalar_dense": 1}


def test_traffic_counts_inputs_and_outputs_views_nothing_and_an_in_place_op_read_and_written() -> None:
    a, b = torch.ones(256), torch.ones(256)  # 1 KiB each
    with count_work() as work:
        c = a + b  # 2 read, 1 written
        v = c.view(16, 16).t()  # views: nothing moves
        v.mul_(2)  # in place: 1 read (self) and 1 written
    del v
    assert work.traffic == {"aten.add": 3 * 1024, "aten.mul_": 2 * 1024}
    assert work.ops == {"aten.add": 1, "aten.view": 1, "aten.t": 1, "aten.mul_": 1}
    metrics = {m.name: m.value for m in work.metrics(flops=1024.0)}
    assert metrics["memory_traffic"] == metrics["memory_traffic_fp32"] == 5 * 1024
    assert metrics["ops"] == 4 and metrics["host_syncs"] == 0
    assert metrics["low_precision_share"] == 0
    assert math.isclose(metrics["arithmetic_intensity"], 1024 / (5 * 1024))


def test_an_upcast_moves_traffic_from_bf16_to_fp32_and_names_the_ops() -> None:
    x = torch.ones(64, dtype=torch.bfloat16)
    with count_work() as low:
        (x * x).sum()
    with count_work() as up:
        (x.float() * x.float()).sum()
    low_share, up_share = ({m.name: m.value for m in w.metrics()}["low_precision_share"] for w in (low, up))
    assert low_share == 100 and up_share < 100
    assert set(up.fp32_by_op) == {"aten._to_copy", "aten.mul", "aten.sum"} and not low.fp32_by_op


def test_the_split_by_dtype_and_the_intensity_are_reported_and_the_counts_gated_exactly() -> None:
    for name in ("host_syncs", "ops", "memory_traffic", "low_precision_share"):
        assert stats.DEFAULT_TOLERANCES[name] == 0
    for name in (*TRAFFIC_METRICS, "arithmetic_intensity"):
        assert stats.DEFAULT_TOLERANCES[name] == math.inf


# ------------------------------------------------------------------ judged and stored (pure)


def _cell(syncs: float, parts: tuple[tuple[str, float], ...]) -> Measurement:
    return Measurement(test="test_x", cell="default", params=(), metrics=(Metric("host_syncs", syncs),),
                       breakdowns=(Breakdown("host_syncs", parts, "", "new sync sites"),))


def test_a_new_sync_fails_naming_its_source_line() -> None:
    before = _cell(1, (("model.py:10 `x.item()` (aten._local_scalar_dense)", 1.0),))
    now = _cell(2, before.breakdowns[0].parts + (("model.py:42 `if loss.item() > 10:` (aten._local_scalar_dense)",
                                                  1.0),))
    verdict = judge.cell(now, before, {})
    assert verdict.status is Status.REGRESSED
    message = judge.failure(verdict, judge.Against("t.py::test_x against its baseline", "cpu"))
    assert "  host_syncs: baseline 1, now 2, change +100%" in message
    assert ("    new sync sites: +1 model.py:42 `if loss.item() > 10:` (aten._local_scalar_dense)"
            in message.splitlines())


def test_growth_lists_the_largest_first_and_ignores_parts_that_shrank() -> None:
    before = Breakdown("ops", (("aten.mm", 4.0), ("aten.add", 10.0), ("aten.copy_", 1.0)))
    now = Breakdown("ops", (("aten.mm", 4.0), ("aten.add", 2.0), ("aten.copy_", 49.0), ("aten._to_copy", 48.0)))
    assert stats.grown_parts(now, before) == ("+48 aten._to_copy", "+48 aten.copy_")
    traffic = Breakdown("memory_traffic", (("aten.clone", 2048.0),), "B")
    assert stats.grown_parts(traffic, Breakdown("memory_traffic", ())) == ("+2.00 KiB aten.clone",)


def test_a_sync_site_moved_by_an_edit_above_it_is_not_new() -> None:
    before = Breakdown("host_syncs", (("m.py:10 `x.item()` (aten._local_scalar_dense)", 1.0),))
    moved = Breakdown("host_syncs", (("m.py:12 `x.item()` (aten._local_scalar_dense)", 1.0),
                                     ("m.py:20 `y.item()` (aten._local_scalar_dense)", 1.0)))
    assert stats.grown_parts(moved, before) == ("+1 m.py:20 `y.item()` (aten._local_scalar_dense)",)
    twice = Breakdown("host_syncs", (("m.py:12 `x.item()` (aten._local_scalar_dense)", 1.0),
                                     ("m.py:30 `x.item()` (aten._local_scalar_dense)", 1.0)))
    assert stats.grown_parts(twice, before) == ("+1 m.py:30 `x.item()` (aten._local_scalar_dense)",)


def test_breakdowns_round_trip_through_a_baseline_file_and_old_files_still_read(tmp_path: Path) -> None:
    fp = Fingerprint(device="cpu", device_type="cpu", torch="2", cuda=None, threads=1, cpu="cpu")
    cell = _cell(1, (("model.py:42 `if loss.item() > 10:` (aten._local_scalar_dense)", 1.0),))
    path = tmp_path / "b.json"
    store.update(path, fp, [cell])
    assert store.read(path).lookup(fp.key, "test_x", "default") == cell
    doc = json.loads(path.read_text())
    del doc["environments"][fp.key]["tests"]["test_x"]["default"]["breakdowns"]  # as written before them
    path.write_text(json.dumps(doc))
    assert store.read(path).lookup(fp.key, "test_x", "default") == Measurement(
        test="test_x", cell="default", params=(), metrics=cell.metrics)


def test_breakdowns_and_growth_round_trip_through_a_result_file() -> None:
    from pytest_trainperf import results
    from pytest_trainperf.records import CellResult

    before = _cell(0, ())
    now = _cell(1, (("model.py:42 `if loss.item() > 10:` (aten._local_scalar_dense)", 1.0),))
    fp = Fingerprint(device="cpu", device_type="cpu", torch="2", cuda=None, threads=1, cpu="cpu")
    verdict = judge.cell(now, before, {})
    assert verdict.metrics[0].grown == ("+1 model.py:42 `if loss.item() > 10:` (aten._local_scalar_dense)",)
    session = results.SessionResults(cells=(CellResult("t.py::test_x", "t.py", "test_x", "default", (), verdict,
                                                       fp),))
    assert results.loads("r.json", results.dump(session)) == session


@pytest.mark.parametrize(("breakdowns", "expected"), [
    ({"ops": {"parts": [["aten.mm", 1]]}}, "breakdowns.ops: expected the breakdown of a metric of the cell"),
    ({"host_syncs": {"parts": [["a", 1], ["a", 2]]}}, "breakdowns.host_syncs.parts[1]"),
    ({"host_syncs": {"parts": [["a", -1]]}}, "breakdowns.host_syncs.parts[0]"),
    ({"host_syncs": {"parts": [["a"]]}}, "breakdowns.host_syncs.parts: expected a list of [name, number] pairs"),
    ({"host_syncs": {"parts": [], "extra": 1}}, "breakdowns.host_syncs: expected an object"),
])
def test_a_bad_breakdown_is_refused_naming_where(tmp_path: Path, breakdowns: dict, expected: str) -> None:
    fp = Fingerprint(device="cpu", device_type="cpu", torch="2", cuda=None, threads=1, cpu="cpu")
    path = tmp_path / "b.json"
    store.update(path, fp, [Measurement(test="t", cell="c", params=(), metrics=(Metric("host_syncs", 0.0),))])
    doc = json.loads(path.read_text())
    doc["environments"][fp.key]["tests"]["t"]["c"]["breakdowns"] = breakdowns
    path.write_text(json.dumps(doc))
    with pytest.raises(store.BaselineError, match=r".*" + expected.replace("[", r"\[").replace("]", r"\]")):
        store.read(path)


# ------------------------------------------------------------------ through the plugin

MODEL = '''
import torch
from torch import nn
import pytest_trainperf as tp


@tp.tolerance(step_time={step_tolerance})  # this file judges the exact counts; a loaded runner may not move it
def test_mlp(trainperf):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(16, 32).to(torch.bfloat16)
    y = x.sum(dim=1, keepdim=True)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        {inject}
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=3, warmup=1)
'''
INI = "[pytest]\ntrainperf_threads = 1\ntrainperf_rounds = 1\n"


def model(inject: str = "pass", step_tolerance: float = 100.0) -> str:
    return MODEL.replace("{inject}", inject).replace("{step_tolerance}", repr(step_tolerance))


def line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.mark.parametrize(("inject", "expected"), [
    ("if loss.item() > 1e9: print('diverged')",
     ["*trainperf regression: host_syncs +inf%*", "  host_syncs: baseline 0, now 1, *",
      "    new sync sites: +1 test_model.py:{line} `if loss.item() > 1e9: print('diverged')` "
      "(aten._local_scalar_dense)",
      "test_model.py::test_mlp · host_syncs", "*1.00*", "+inf% REGR"]),  # its heatmap
    ("out = out[out > -1e9].view_as(out)",
     ["  host_syncs: baseline 0, now 1, *",
      "    new sync sites: +1 test_model.py:{line} `out = out[out > -1e9].view_as(out)` (aten.index)"]),
    ("loss = nn.functional.mse_loss(out.float(), y.float())",
     ["  low_precision_share: baseline 100 %, now *",
      "    ops whose float32 traffic appeared or grew: *aten._to_copy*"]),
    ("loss = loss.clone()",
     ["  ops: baseline *, now *", "    ops that appeared or grew: +1 aten.clone",
      "  memory_traffic: baseline *, now *", "    ops whose traffic appeared or grew: +4 B aten.clone"]),
], ids=["item", "mask index", "upcast", "clone"])
def test_an_injected_defect_fails_the_cell_naming_it(pytester: pytest.Pytester, inject: str,
                                                     expected: list[str]) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_model=model())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    changed = model(inject)
    pytester.makepyfile(test_model=changed)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    line = line_of((pytester.path / "test_model.py").read_text(), inject)
    result.stdout.fnmatch_lines([e.replace("{line}", str(line)) for e in expected], consecutive=False)
    assert "step_time: baseline" not in result.stdout.str()


def test_unchanged_code_counts_the_same_in_separate_processes(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_model=model())
    path = pytester.path / "baselines" / "test_model.json"
    counts = []
    for run in (pytester.runpytest, pytester.runpytest_subprocess):  # this process, then a fresh one
        run("--trainperf-update-baselines").assert_outcomes(passed=1)
        (env,) = json.loads(path.read_text())["environments"].values()
        cell = env["tests"]["test_mlp"]["default"]
        counts.append(({n: cell["metrics"][n]["value"] for n in ("host_syncs", "ops", "memory_traffic",
                                                                   "low_precision_share", "flops")},
                       cell["breakdowns"]))
    assert counts[0] == counts[1]
    assert counts[0][0]["ops"] > 0 and counts[0][0]["memory_traffic"] > 0 and counts[0][0]["host_syncs"] == 0
    assert counts[0][0]["low_precision_share"] == 100
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 cell measured: 1 unchanged*"])


def test_a_baseline_without_the_work_counts_passes_and_reports_them_new(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_model=model())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    path = pytester.path / "baselines" / "test_model.json"
    doc = json.loads(path.read_text())
    (env,) = doc["environments"].values()
    cell = env["tests"]["test_mlp"]["default"]
    new = ("host_syncs", "ops", "memory_traffic", "low_precision_share", "arithmetic_intensity", *TRAFFIC_METRICS)
    for name in new:
        cell["metrics"].pop(name, None)
    cell["order"] = [n for n in cell["order"] if n not in new]
    del cell["breakdowns"]
    path.write_text(json.dumps(doc))  # as an earlier version wrote it
    for strict in ((), ("--trainperf-strict",)):  # strict fails a cell without a baseline; this one has one
        result = pytester.runpytest("--trainperf", *strict)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*1 cell measured: 1 new*"])  # its new metrics, until an update adds them


ANOTHER_CPU = "Another CPU Model 9000"


def move_to_another_cpu(path: Path) -> str:
    """Rewrite the baseline file as if measured on a host that differs only in its CPU model; its key."""
    doc = json.loads(path.read_text())
    (env,) = doc["environments"].values()
    fingerprint = env["fingerprint"]
    fingerprint["cpu"] = ANOTHER_CPU
    if fingerprint["device_type"] == "cpu":
        fingerprint["device"] = ANOTHER_CPU  # a CPU device is named by its model
    key = Fingerprint(**fingerprint).key
    doc["environments"] = {key: env}
    path.write_text(json.dumps(doc))
    return key


def test_a_baseline_from_another_cpu_judges_the_exact_work_metrics_and_not_the_timings(
        pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_model=model(step_tolerance=0.1))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    slow = model("time.sleep(0.05)", step_tolerance=0.1).replace("import torch\n", "import time\nimport torch\n", 1)
    pytester.makepyfile(test_model=slow)
    quick = ("--trainperf", "--trainperf-confirm=0", "--trainperf-confirm-against=none")
    same_host = pytester.runpytest(*quick)  # on the host that measured it, the slowdown fails
    same_host.assert_outcomes(failed=1)
    same_host.stdout.fnmatch_lines(["*trainperf regression: step_time +*"])
    other = move_to_another_cpu(pytester.path / "baselines" / "test_model.json")
    result = pytester.runpytest(*quick)  # another CPU: the same slowdown is not judged; the counts are
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*judged across hosts: same device type, torch and threads; another CPU: cells "
                                 f"with no baseline here had their exact work metrics judged against {other}*"])
    assert "nothing was compared" not in result.stdout.str()
    strict = pytester.runpytest(*quick, "--trainperf-strict")  # its timings are not gated: strict still fails it
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*test_mlp* has no baseline for this environment in *(--trainperf-strict)"])
    pytester.makepyfile(test_model=model("loss = loss.clone()"))
    result = pytester.runpytest(*quick)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*trainperf regression: *ops +*",
        "environment: * (judged across hosts: same device type, torch and threads; another CPU; against the "
        f"baseline of {other}: the exact work metrics only, timings not judged)",
        "    ops that appeared or grew: +1 aten.clone"], consecutive=False)
    assert "step_time: baseline" not in result.stdout.str()


def test_only_the_cpu_may_differ_for_a_baseline_to_judge_across_hosts() -> None:
    here = Fingerprint(device="X", device_type="cpu", torch="2.9", cuda=None, threads=2, cpu="X", malloc="glibc-fixed")
    baseline = Measurement(test="t", cell="c", params=(), metrics=(Metric("ops", 1.0),))
    for there, judged in [(replace(here, device="Y", cpu="Y"), True),
                          (replace(here, device="Y", cpu="Y", threads=4), False),
                          (replace(here, device="Y", cpu="Y", torch="2.10"), False),
                          (replace(here, device="Y", cpu="Y", malloc="system"), False),
                          (here, False)]:  # the same environment: its own baseline, not another host's
        file = store.BaselineFile(path=Path("b.json"), environments={
            there.key: store.Environment(fingerprint=there, cells={("t", "c"): baseline})})
        assert (file.across_hosts(here, "t", "c") is not None) is judged, there
    gpu = Fingerprint(device="H100", device_type="cuda", torch="2.9", cuda="12.8", threads=2, cpu="X")
    assert replace(gpu, cpu="Y").across_hosts_key == gpu.across_hosts_key
    assert replace(gpu, device="A100", cpu="Y").across_hosts_key != gpu.across_hosts_key


def test_across_hosts_only_the_exact_work_metrics_are_kept_from_the_baseline() -> None:
    names = ("step_time", "throughput", "peak_memory", "loss", "flops", "flops_bf16", "host_syncs", "ops",
             "memory_traffic", "memory_traffic_fp32", "low_precision_share", "graph_breaks", "recompiles",
             "unique_graphs", "compile_time", "cpu_utilization")
    baseline = Measurement(test="t", cell="c", params=(), metrics=tuple(Metric(n, 1.0) for n in names),
                           loss_curve=(2.0, 1.0), breakdowns=(Breakdown("ops", (("aten.mm", 1.0),), "", "grew"),))
    cut = judge.from_another_host(baseline)
    assert cut.names == ("flops", "flops_bf16", "host_syncs", "ops", "memory_traffic", "memory_traffic_fp32",
                         "low_precision_share", "graph_breaks", "recompiles", "unique_graphs")
    assert cut.loss_curve == () and cut.breakdowns == baseline.breakdowns


def test_tensors_received_from_worker_processes_are_not_counted_what_the_step_does_with_them_is() -> None:
    """A DataLoader with workers rebuilds each batch it receives (``aten.empty`` of no element, then
    ``aten.set_`` onto the shared-memory storage); how many batches arrive during a step is up to the
    workers, so that pair is never counted."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.ones(256, 64)), batch_size=8, num_workers=2)
    it = iter(loader)
    counts = []
    for ahead in (0, 2, 0, 3):
        with count_work() as work:
            unused = [next(it) for _ in range(ahead)]  # received during the step, never used
            (x,) = next(it)
            x.sum()
        counts.append((dict(work.ops), dict(work.traffic)))
        del unused
    for (ops, traffic), ahead in zip(counts, (0, 2, 0, 3), strict=True):
        calls = 1 + ahead  # the loader's own record_function per next(): what the code does, counted
        assert ops == {"profiler._record_function_enter_new": calls, "profiler._record_function_exit": calls,
                       "aten.sum": 1}
        assert traffic["aten.sum"] == 8 * 64 * 4 + 4
        assert sum(traffic.values()) == traffic["aten.sum"]
