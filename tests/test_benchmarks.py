"""Tests of the benchmark scripts: protocol pieces on tiny data, short end-to-end runs of both
benchmarks, ``runs.jsonl`` resume and the report. No downloads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import _timing, report
from benchmarks.protocol import (
    LAMBDA_GRID,
    VARIANTS,
    RunSpec,
    batch_indices,
    evaluate,
    head,
    main,
    plan_runs,
    read_runs,
    record_key,
    task_split,
    task_subset,
)
from benchmarks.split_cifar10 import BENCHMARK as CIFAR
from benchmarks.split_mnist import BENCHMARK as MNIST

SHARED_MNIST = Path("/work/shared/data")


def test_task_split_is_a_seeded_partition_into_pairs():
    for seed in range(5):
        tasks = task_split(seed)
        assert [len(t) for t in tasks] == [2] * 5
        assert sorted(c for t in tasks for c in t) == list(range(10))
        assert task_split(seed) == tasks
    assert len({tuple(map(tuple, task_split(s))) for s in range(5)}) == 5


def test_task_subset_keeps_the_classes_and_remaps_labels():
    x = torch.arange(6.0).unsqueeze(1)
    y = torch.tensor([3, 7, 3, 1, 7, 0])
    xs, ys = task_subset(x, y, [7, 3])
    assert xs.squeeze(1).tolist() == [0.0, 1.0, 2.0, 4.0]
    assert ys.tolist() == [1, 0, 1, 0]


def test_head_picks_the_task_units_in_order():
    out = torch.arange(10.0).repeat(3, 1)
    assert head([7, 2], "cpu")(out).tolist() == [[7.0, 2.0]] * 3


class FixedLogits(nn.Module):
    """Returns logits stored per input value (inputs are sample indices)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long().squeeze(1)]


def test_evaluate_scores_with_the_task_head_only():
    logits = torch.zeros(4, 10)
    logits[:, 9] = 100.0  # an outside unit that would win without masking
    logits[0, 2], logits[1, 5], logits[2, 2], logits[3, 2] = 1.0, 1.0, 1.0, 1.0
    x = torch.arange(4.0).unsqueeze(1)
    y = torch.tensor([0, 1, 1, 0])  # local labels of classes [2, 5]
    acc = evaluate(FixedLogits(logits), x, y, head([2, 5], "cpu"), batch_size=3)
    assert acc == pytest.approx(75.0)


def test_batch_indices_cover_each_epoch_once():
    idx = list(batch_indices(10, 4, 6, torch.Generator().manual_seed(0)))
    assert [len(i) for i in idx] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(idx[:3]).tolist()) == list(range(10))


def test_plan_runs_orders_typical_lambdas_first_without_duplicates():
    grid = dict.fromkeys(VARIANTS[:-1], LAMBDA_GRID)
    specs = plan_runs("b", "real", VARIANTS, [0, 1], grid, 10, 8)
    assert len(specs) == len(set(specs)) == 2 * (5 * 14 + 1)
    first = specs[:12]
    assert {s.method for s in first if s.strength is None} == {"none"}
    assert {(s.method, s.strength) for s in first if s.strength is not None} >= {
        ("exact", 1e5), ("exact", 1e6), ("sample", 1e8), ("batched", 1e11)}


def test_record_key_matches_spec_after_a_json_round_trip():
    spec = RunSpec("split_mnist", "real", "exact", 1e13, 2, 2000, 128)
    record = json.loads(json.dumps({**spec.__dict__, "accuracy": 50.0}))
    assert record_key(record) == spec.key()


def _mnist_data_args() -> list[str]:
    if (SHARED_MNIST / "MNIST").is_dir() and importlib.util.find_spec("torchvision"):
        # real data: only variants whose Fisher is cheap on a whole task
        return ["--data-root", str(SHARED_MNIST), "--methods", "exact_n500", "batched", "none"]
    return ["--synthetic", "--methods", *VARIANTS]


def test_split_mnist_end_to_end_and_resume(tmp_path, capsys):
    args = [*_mnist_data_args(), "--iters", "5", "--seeds", "0", "--lambdas", "1e3",
            "--threads", "1", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    finished = main(MNIST, args)
    assert torch.get_num_threads() == threads  # (--threads 1 held for the runs only)
    records = read_runs(tmp_path / "runs.jsonl")
    methods = args[args.index("--methods") + 1:args.index("--iters")]
    assert len(finished) == len(records) == len(methods)
    for r in records:
        assert r["benchmark"] == "split_mnist" and r["iters"] == 5 and r["batch_size"] == 128
        assert len(r["per_task"]) == 5 and r["accuracy"] == pytest.approx(sum(r["per_task"]) / 5)
        assert r["seconds"] >= r["fisher_seconds"] >= 0 and "version" in r
        assert r["cpu_seconds"] >= r["fisher_cpu_seconds"] >= 0
        assert (r["strength"] is None) == (r["method"] == "none")
    assert main(MNIST, args) == []  # everything already recorded: skipped
    assert "0 to do" in capsys.readouterr().out
    assert len(read_runs(tmp_path / "runs.jsonl")) == len(records)


def test_at_best_lambda_takes_each_variants_best_so_far(tmp_path, capsys):
    rows = [{"benchmark": "split_mnist", "data": "synthetic", "method": "batched",
             "strength": s, "seed": 0, "iters": 1, "batch_size": 128, "accuracy": acc}
            for s, acc in [(1e3, 60.0), (1e4, 70.0), (1e5, 65.0)]]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--synthetic", "--iters", "1", "--threads", "1", "--out", str(tmp_path)]
    finished = main(MNIST, [*common, "--methods", "batched", "--at-best-lambda", "--seeds", "3"])
    assert [(r["strength"], r["seed"]) for r in finished] == [(1e4, 3)]
    with pytest.raises(SystemExit, match="exact"):
        main(MNIST, [*common, "--methods", "exact", "--at-best-lambda"])


def test_best_lambda_is_chosen_on_the_seeds_common_to_every_lambda():
    from benchmarks.report import best, group, held_out_text

    rows = [{"benchmark": "split_mnist", "data": "real", "method": "exact", "strength": s,
             "seed": seed, "iters": 1, "batch_size": 1, "accuracy": acc}
            for s, seed, acc in [(1e3, 0, 70.0), (1e3, 1, 70.0),
                                 (1e4, 0, 65.0), (1e4, 1, 65.0), (1e4, 2, 100.0)]]
    per_lambda = group(rows)[("split_mnist", "real", 1, 1)]["exact"]
    strength, stats = best(per_lambda)
    assert strength == 1e3 and stats.n == 2 and stats.mean == 70.0
    assert held_out_text(per_lambda, per_lambda[1e4]) == "100.00 (1)"  # (seed 2 chose nothing)
    assert held_out_text(per_lambda, stats) == "–"
    per_lambda[1e4] = type(per_lambda[1e4]).of([r for r in rows if r["seed"] == 2])
    assert best(per_lambda)[0] == 1e4  # no seed in common: the plain means decide
    # (and every seed chose: none is held out; before, seed 2 was reported as held out)
    assert held_out_text(per_lambda, per_lambda[1e4]) == "–"


def test_a_record_after_a_torn_line_is_kept(tmp_path):
    """A killed write leaves a line without its newline: the next record was written onto it,
    and both were skipped."""
    from benchmarks.protocol import append_run

    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"seed": 0}) + "\n" + '{"seed": 1, "acc')
    append_run(path, {"seed": 2})
    append_run(path, {"seed": 3})
    assert [r["seed"] for r in read_runs(path)] == [0, 2, 3]


def test_lambdas_and_at_best_lambda_exclude_each_other(tmp_path, capsys):
    """Before, ``--lambdas`` won without a word."""
    with pytest.raises(SystemExit):
        main(MNIST, ["--synthetic", "--iters", "1", "--methods", "exact", "--seeds", "0",
                     "--threads", "1", "--at-best-lambda", "--lambdas", "1e3",
                     "--out", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_report_of_a_directory_without_runs_says_so_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="no runs in"):
        report.main([str(tmp_path)])


def test_paper_columns_only_beside_runs_of_the_papers_settings():
    from benchmarks.report import group, markdown

    rows = [{"benchmark": "split_mnist", "data": "real", "method": "exact", "strength": 1e5,
             "seed": 0, "iters": iters, "batch_size": 128, "accuracy": 99.0}
            for iters in (500, 2000)]
    tables = {config[2]: markdown(config, summary, "f.png")
              for config, summary in group(rows).items()}
    assert "99.12 ± 0.16" in tables[2000] and "99.12 ± 0.16" not in tables[500]
    assert "left out" in tables[500]


def test_split_cifar10_synthetic_smoke(tmp_path):
    finished = main(CIFAR, ["--synthetic", "--iters", "2", "--batch-size", "16", "--seeds", "1",
                            "--methods", "exact_n500", "none", "--lambdas", "1e5",
                            "--threads", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in finished] == ["none", "exact_n500"]
    assert all(r["data"] == "synthetic" and r["benchmark"] == "split_cifar10" for r in finished)


def test_synthetic_size_is_an_option_and_part_of_the_runs_identity(tmp_path):
    from benchmarks.protocol import _load

    assert len(_load(CIFAR, 3, "unused", "cpu").train_y) == 30
    assert len(_load(CIFAR, 0, "unused", "cpu").train_y) == 100  # the smoke default
    common = ["--iters", "1", "--batch-size", "8", "--seeds", "0", "--methods", "none",
              "--threads", "1", "--out", str(tmp_path)]
    first = main(CIFAR, ["--synthetic", "3", *common])
    assert [r["data"] for r in first] == ["synthetic-3"]
    assert len(main(CIFAR, ["--synthetic", *common])) == 1  # another dataset: not skipped


def test_report_writes_table_and_figure(tmp_path):
    pytest.importorskip("matplotlib")  # (the figure; the benchmarks' extra)
    rows = []
    for seed, offset in enumerate((0.0, 1.0, 2.0)):
        for method, strength, acc in [("exact", 1e5, 98.0), ("exact", 1e6, 96.0),
                                      ("batched", 1e11, 97.0), ("none", None, 85.0)]:
            rows.append({"benchmark": "split_mnist", "data": "real", "method": method,
                         "strength": strength, "seed": seed, "iters": 2000, "batch_size": 128,
                         "accuracy": acc + offset, "per_task": [acc + offset] * 5,
                         "seconds": 10.0, "fisher_seconds": 4.0, "cpu_seconds": 9.0,
                         "fisher_cpu_seconds": 3.0,
                         "device": "cuda" if method == "batched" else "cpu", "torch": "2.x"})
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    table = report.report(tmp_path).read_text()
    exact = "| EXACT | 1e5 | 99.00 ± 0.58 | 3 | – | 10 (4) | 9 (3) | 1e5–1e6 | 99.12 ± 0.16 |"
    assert exact in table
    assert "| None | – | 86.00 ± 0.58 | 3 | – |" in table
    assert "| 1e6 | 97.00 (3) |" in table
    assert ("Devices: cpu (torch 2.x): 9 runs, median 10 s wall, 9 s CPU per run; "
            "cuda (torch 2.x): 3 runs, median 10 s wall, 9 s CPU per run.") in table
    figure = tmp_path / "accuracy_vs_lambda_split_mnist_real_2000it_b128.png"
    assert figure.stat().st_size > 1000


def test_host_overhead_counts_operators(tmp_path):
    from benchmarks import host_overhead

    out = tmp_path / "host.md"
    table = host_overhead.main(
        ["--models", "mlp", "--samples", "2", "--repeats", "1", "--out", str(out)]
    )
    assert out.read_text() == table
    rows = [line.split(" | ") for line in table.splitlines() if "Split MNIST MLP |" in line]
    assert [row[1] for row in rows] == ["plain fwd+bwd", "Fisher, exact", "Fisher, empirical"]
    plain_operators = int(rows[0][2])
    assert 20 <= plain_operators <= 200  # 3 Linear layers, forward and backward
    assert all(int(row[2]) > plain_operators for row in rows[1:])


def test_operator_count_tells_views_apart():
    from benchmarks.host_overhead import OperatorCount

    x = torch.randn(4, 3)
    with OperatorCount() as counter:
        (x * 2).view(12).mul(3).view(3, 4).t()
    assert counter.total == 5 and counter.views == 3  # mul, mul; view, view, t
    assert counter.calls == {"mul": 2, "view": 2, "t": 1}


def test_keeping_threads_restores_the_count_on_error_and_reports_are_written(tmp_path):
    from benchmarks._reports import cpu_name, keeping_threads, write_report

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), keeping_threads():
        torch.set_num_threads(1 if before > 1 else 2)
        raise RuntimeError("a failed run")
    assert torch.get_num_threads() == before
    out = tmp_path / "new" / "report.md"
    assert write_report("| a |\n", out) == "| a |\n" and out.read_text() == "| a |\n"
    assert cpu_name()


def test_host_overhead_counts_a_gpus_ways_on_the_cpu(tmp_path):
    """``--ways launch-bound``: the ResNet's exact Fisher pulls its vectors back in one
    batched pass, so it dispatches fewer operators than with the CPU's looped pull-back."""
    from benchmarks import host_overhead

    def exact_operators(ways: str) -> int:
        table = host_overhead.main(
            ["--models", "resnet", "--samples", "2", "--repeats", "1", "--ways", ways,
             "--out", str(tmp_path / f"{ways}.md")]
        )
        assert f"--ways {ways}" in table
        row = next(line for line in table.splitlines() if "| Fisher, exact |" in line)
        return int(row.split(" | ")[2])

    assert exact_operators("launch-bound") < 0.8 * exact_operators("device")


def test_side_by_side_calls_each_once_untimed_then_in_alternating_rounds():
    order = []
    calls = {"a": lambda: order.append("a") or 1, "b": lambda: order.append("b") or 2}
    timed = _timing.side_by_side(calls, 3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {name: result for name, (_, result) in timed.items()} == {"a": 1, "b": 2}
    assert all(seconds >= 0 for seconds, _ in timed.values())


def test_benchmark_models_keep_recurrent_layers_in_training_mode_for_the_plain_pass():
    """(cuDNN's backward of a recurrent layer refuses eval mode.) Refused where that is not
    the eval function: dropout between layers."""
    from benchmarks.models import LSTMClassifier, evaluated

    model = evaluated(LSTMClassifier(10, vocab_size=20, dim=4).train())
    assert not model.training and model.lstm.training
    with pytest.raises(ValueError, match="dropout"):
        evaluated(nn.Sequential(nn.LSTM(4, 4, num_layers=2, dropout=0.5)))


GPU_CHECKS = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.sh"


def _gpu_checks_env(tmp_path: Path, python: str, device: str = "cpu") -> dict[str, str]:
    """The environment of a dry run of ``scripts/gpu_checks.sh``: its reports in ``tmp_path``,
    ``python`` as its Python, and an ``nvidia-smi`` that succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho fake GPU\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out), "DEVICE": device,
            "PYTHON": python}


def test_gpu_checks_run_only_the_steps_named(tmp_path):
    """``bash scripts/gpu_checks.sh STEP...`` runs those steps (and the GPU's line), each
    timed in the log (Python here is ``true``: the steps' commands do nothing)."""
    import subprocess

    script = GPU_CHECKS
    env = _gpu_checks_env(tmp_path, "true")
    tmp_path = tmp_path / "out"

    def steps(*names: str) -> list[str]:
        subprocess.run(["bash", str(script), *names], env=env, check=True, timeout=60)
        log = (tmp_path / "log").read_text()
        assert "exit 0 after 0 s" in log
        return [line[3:].split(":")[0] for line in log.splitlines() if "exit" in line]

    assert steps("memory_budget", "fisher_speed") == ["gpu", "memory_budget", "fisher_speed"]
    assert "fisher_speed" not in steps("quick") and "tests" in steps("quick")
    assert steps()[-2:] == ["fisher_speed", "fisher_speed_extra"]


def test_gpu_checks_exit_1_when_a_step_fails_or_there_is_no_gpu(tmp_path):
    """Every named step runs, and the script exits 1 if any failed, naming them last in the
    log (it exited 0 whatever happened); asked for CUDA where torch has none, it stops at once
    (tests/test_cuda.py would skip and pass)."""
    import subprocess

    env = _gpu_checks_env(tmp_path, "false")
    done = subprocess.run(["bash", str(GPU_CHECKS), "tests", "penalty_speed"], env=env,
                          capture_output=True, timeout=60)
    log = (tmp_path / "out" / "log").read_text().splitlines()
    assert done.returncode == 1 and log[-1] == "== failed: tests penalty_speed"
    env = _gpu_checks_env(tmp_path, sys.executable, device="cuda")
    done = subprocess.run(["bash", str(GPU_CHECKS), "tests"], env=env, capture_output=True,
                          timeout=120)
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    log = (tmp_path / "out" / "log").read_text()
    assert done.returncode == 1 and "no CUDA device" in log and "== tests" not in log


def test_the_lambda_axis_takes_every_lambda_run():
    """Before, it was the paper's grid alone: λ = 1e-3 or 1e15 lay off the axis."""
    from benchmarks.report import group, lambda_axis

    rows = [{"benchmark": "split_mnist", "data": "real", "method": "exact", "strength": s,
             "seed": 0, "iters": 1, "batch_size": 1, "accuracy": 90.0} for s in (1e-3, 1e15)]
    low, high = lambda_axis(next(iter(group(rows).values())))
    assert low == pytest.approx(1e-3 / 3) and high == pytest.approx(3e15)
    rows = [{**rows[0], "strength": 1e5}]
    grid = (LAMBDA_GRID[0] / 3, LAMBDA_GRID[-1] * 3)
    assert lambda_axis(next(iter(group(rows).values()))) == grid
