"""The Split MNIST / Split CIFAR-10 command line (``benchmarks.protocol``): wrong values stop it
at parse time, and missing data is one clear error, never a download traceback."""

from __future__ import annotations

import importlib
import socket
import urllib.error
import urllib.request

import pytest
import torch

from benchmarks import protocol
from benchmarks.protocol import main, parse_args
from benchmarks.split_cifar10 import BENCHMARK as CIFAR
from benchmarks.split_mnist import BENCHMARK as MNIST


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--iters", "0"], "argument --iters: 0 is less than 1"),
        (["--iters", "-5"], "argument --iters: -5 is less than 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 is less than 1"),
        (["--threads", "-1"], "argument --threads: -1 is less than 1"),
        (["--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--workers", "0"], "argument --workers: 0 is less than 1"),
        (["--synthetic", "-3"], "argument --synthetic: -3 is less than 1"),
        (["--synthetic", "0"], "argument --synthetic: 0 is less than 1"),
        (["--fisher-chunk", "0"], "argument --fisher-chunk: 0 is less than 1"),
        (["--lambdas", "0"], "argument --lambdas: '0': λ must be finite and > 0"),
        (["--lambdas", "1e5", "-1"], "argument --lambdas: '-1': λ must be finite and > 0"),
        (["--lambdas", "inf"], "argument --lambdas: 'inf': λ must be finite and > 0"),
        (["--lambdas", "nan"], "argument --lambdas: 'nan': λ must be finite and > 0"),
        (["--device", "tpu"], "argument --device: 'tpu' is no device; use cpu or cuda"),
        (["--device", "mps"], "argument --device: 'mps': the benchmarks run on cpu or cuda"),
        (["--device", "cuda:99"], "argument --device: 'cuda:99'"),
        (["--seeds", "1", "99999999999999999999"], "99999999999999999999 is not a 64-bit"),
        (["--seeds", "x"], "argument --seeds: invalid int value: 'x'"),
    ],
)
def test_wrong_values_are_errors_of_the_command_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(MNIST, argv)
    assert exit_info.value.code == 2  # argparse's error, with the usage
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith("usage: python -m benchmarks.split_mnist")


def test_lambda_zero_points_to_the_run_without_ewc(capsys):
    with pytest.raises(SystemExit):
        parse_args(CIFAR, ["--lambdas", "0"])
    assert "--methods none" in capsys.readouterr().err


def test_iterations_not_given_take_the_default_and_zero_is_refused(capsys):
    assert parse_args(MNIST, []).iters == 2000
    assert parse_args(MNIST, ["--quick"]).iters == 500
    assert parse_args(MNIST, ["--iters", "1"]).iters == 1
    with pytest.raises(SystemExit):  # was taken for "not given": 2000 iterations
        parse_args(MNIST, ["--quick", "--iters", "0"])
    assert "argument --iters: 0 is less than 1" in capsys.readouterr().err


def test_runs_of_other_iterations_or_batch_sizes_go_beside_the_committed_ones():
    """Without ``--out``, runs of the protocol's iterations and batch size go to the committed
    folder of this repository (from any working directory); others to folders named after
    theirs (``--iters 5`` was appended to the committed runs.jsonl, and the report then
    rewrote the committed results.md)."""
    results = protocol.RESULTS
    assert results.is_absolute() and (results / "split_mnist" / "runs.jsonl").exists()
    assert parse_args(MNIST, []).out == results / "split_mnist"
    assert parse_args(MNIST, ["--quick"]).out == results / "split_mnist_quick"
    assert parse_args(MNIST, ["--iters", "5"]).out == results / "split_mnist_iters5"
    assert parse_args(MNIST, ["--quick", "--iters", "2000"]).out == (
        results / "split_mnist_quick_iters2000"
    )
    assert parse_args(CIFAR, ["--synthetic", "--batch-size", "8"]).out == (
        results / "split_cifar10_synthetic_batch8"
    )


def test_progress_lines_tell_lambdas_apart_and_an_empty_data_variable_is_unset(monkeypatch):
    """Two λ of one order of magnitude printed alike (``.0e``: "λ=2e+05" for 2.5e5 and
    1.5e5); ``EWC_REG_DATA=`` (set, empty) took the working directory for the data root."""
    spec = protocol.RunSpec("split_mnist", "real", "exact", 2.5e5, 0, 2000, 128)
    assert "λ=2.5e+05 " in spec.describe()
    monkeypatch.setenv("EWC_REG_DATA", "")
    assert parse_args(MNIST, []).data_root == "./data"


def test_bare_synthetic_keeps_the_benchmarks_size_and_a_size_must_be_positive(capsys):
    assert parse_args(CIFAR, ["--synthetic"]).synthetic == 0  # the benchmark's own small size
    assert parse_args(CIFAR, ["--synthetic", "5000"]).synthetic == 5000
    with pytest.raises(SystemExit):
        parse_args(CIFAR, ["--synthetic", "-3"])
    assert "argument --synthetic: -3 is less than 1" in capsys.readouterr().err


def test_wrong_iterations_record_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--synthetic", "--methods", "none", "--seeds", "0", "--iters", "-5",
            "--out", str(out)]
    with pytest.raises(SystemExit):
        main(MNIST, argv)
    assert not out.exists()  # (a run of -5 iterations used to be appended to runs.jsonl)
    assert "argument --iters" in capsys.readouterr().err


@pytest.fixture
def no_network(monkeypatch):
    """Every connection fails as without internet, and no worker process starts (it would not
    inherit these patches); returns the URLs asked for. (The downloads are torchvision's.)"""
    pytest.importorskip("torchvision")
    asked: list[str] = []

    def no_pool(*args, **kwargs):
        raise AssertionError("workers started before the data was found")

    def urlopen(request, *args, **kwargs):
        asked.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("network unreachable (test)")

    def connect(self, address):
        raise OSError(f"no network in this test (connect to {address})")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(protocol, "ProcessPoolExecutor", no_pool)
    return asked


@pytest.mark.parametrize(
    ("bench", "folder", "url"),
    [
        (MNIST, "MNIST/raw", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        (CIFAR, "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    ],
    ids=["mnist", "cifar10"],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_missing_data_is_one_clear_error_and_leaves_no_directories(
    bench, folder, url, workers, tmp_path, no_network, capsys
):
    root, out = tmp_path / "data" / "root", tmp_path / "out"
    argv = ["--methods", "none", "--seeds", "0", "--iters", "1", "--workers", workers,
            "--data-root", str(root), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(bench, argv)
    message = str(exit_info.value.code)
    assert message.startswith(f"{bench.name}: ")
    assert f"is not (complete) in {root / folder}" in message
    assert f"data root {root}" in message
    assert url in message
    assert "--data-root" in message and "EWC_REG_DATA" in message
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert no_network and all(u.startswith(url) for u in no_network[:1])  # download was tried
    assert not (tmp_path / "data").exists()  # the directories the attempt made are gone
    assert not out.exists()


def test_a_partial_mnist_folder_names_the_missing_files(tmp_path, no_network) -> None:
    """A data folder holding half of MNIST's files: the error lists the two missing ones
    (torchvision's own message names the first file it tried to download, which is there) and
    the folder and its files stay."""
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for present in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / present).write_bytes(b"")
    argv = ["--methods", "none", "--seeds", "0", "--iters", "1", "--workers", "1",
            "--data-root", str(root), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(MNIST, argv)
    message = str(exit_info.value.code)
    assert "missing: t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)" in message
    assert sorted(p.name for p in raw.iterdir()) == [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]


def test_a_failed_download_keeps_what_was_in_the_root(tmp_path, no_network):
    root = tmp_path / "data"
    (root / "MNIST").mkdir(parents=True)
    (root / "MNIST" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(MNIST, ["--methods", "none", "--seeds", "0", "--iters", "1",
                     "--data-root", str(root), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (root / "MNIST").iterdir()) == ["notes.txt"]


# Every benchmark's command line: bad values stop it at parse time, with argparse's message.
BAD_OPTIONS = {
    "fisher_speed": [
        (["--samples", "0"], "argument --samples: 0 is less than 1"),
        (["--repeats", "-1"], "argument --repeats: -1 is less than 0"),
        (["--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--device", "cuda"], "argument --device: 'cuda': no CUDA device here"),
        (["--models", "mlp,nonesuch"], "--models takes a comma-separated subset of"),
    ],
    "lm_speed": [
        (["--models", "bert"], "--models takes a comma-separated subset of"),
        (["--models", ""], "--models takes a comma-separated subset of"),
        (["--vocab", "0"], "argument --vocab: 0 is less than 1"),
        (["--repeats", "0"], "argument --repeats: 0 is less than 1"),
        (["--device", "cuda"], "argument --device: 'cuda': no CUDA device here"),
    ],
    "memory_budget": [
        (["--samples", "0"], "argument --samples: 0 is less than 1"),
        (["--repeats", "0"], "argument --repeats: 0 is less than 1"),
        (["--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--budgets-mib", "64", "0"], "--budgets-mib: every budget must be positive"),
        (["--device", "cuda"], "argument --device: 'cuda': no CUDA device here"),
    ],
    "penalty_speed": [
        (["--repeats", "0"], "argument --repeats: 0 is less than 1"),
        (["--threads", "1", "0"], "argument --threads: 0 is less than 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 is less than 1"),
        (["--device", "cuda"], "argument --device: 'cuda': no CUDA device here"),
    ],
    "fisher_memory": [
        (["--sizes", "32", "0"], "argument --sizes: 0 is less than 1"),
        (["--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--backends", "auto", "fast"], "argument --backends: invalid choice: 'fast'"),
    ],
    "host_overhead": [
        (["--models", "mlp", "--repeats", "0"], "argument --repeats: 0 is less than 1"),
        (["--models", "mlp", "--samples", "0"], "argument --samples: 0 is less than 1"),
        (["--models", "mlp", "--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--models", "mlp", "--device", "cuda"], "argument --device: 'cuda': no CUDA device"),
    ],
    "timm_speed": [
        ([option, "0"], f"argument {option}: 0 is less than 1")
        for option in ("--batch-size", "--image-size", "--repeats", "--threads")
    ],
    "transformers_speed": [
        (["--width", "6"], "--width must be a multiple of 4"),
        (["--width", "0"], "argument --width: 0 is less than 4"),
        (["--length", "2"], "argument --length: 2 is less than 3"),
        (["--repeats", "0"], "argument --repeats: 0 is less than 1"),
        (["--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 is less than 1"),
        (["--models", "mpnet,nonesuch"], "--models: no classifier for ['nonesuch']"),
    ],
    "product_ways": [(["--repeats", "0"], "argument --repeats: 0 is less than 1")],
    "check_cost": [(["--device", "gpu"], "argument --device: 'gpu' is no device")],
}


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [(name, argv, message) for name, cases in BAD_OPTIONS.items() for argv, message in cases],
)
def test_every_benchmark_refuses_bad_options_at_parse_time(
    name, argv, message, monkeypatch, capsys
):
    """Counts below their least value and a device this machine lacks are errors of the
    command line (before: a StatisticsError after the runs, a RuntimeError, a library error,
    or a value silently ignored)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (no CUDA here)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{name}").main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


COMMANDS = [  # (split_mnist and split_cifar10: protocol's parse_args, tested above)
    "fisher_speed", "lm_speed", "memory_budget",
    "penalty_speed", "fisher_memory", "host_overhead", "timm_speed", "transformers_speed",
    "product_ways", "check_cost", "timm_coverage", "transformers_coverage", "peft_coverage",
]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_benchmark_is_named_as_it_is_run_and_says_what_it_does(name, capsys):
    """``--help`` shows ``python -m benchmarks.x`` (argparse said ``x.py``) and a whole
    sentence (some were cut mid-sentence); it needs none of the optional packages."""
    with pytest.raises(SystemExit):
        importlib.import_module(f"benchmarks.{name}").main(["--help"])
    usage, description = capsys.readouterr().out.split("\n\n")[:2]
    assert usage.startswith(f"usage: python -m benchmarks.{name} ")
    assert description.rstrip().endswith(".")


@pytest.mark.parametrize(
    ("name", "partial"),
    [
        ("timm_speed", ["--models", "resnet18"]),
        ("timm_speed", ["--batch-size", "4"]),
        ("transformers_speed", ["--models", "bert"]),
        ("transformers_speed", ["--length", "16"]),
    ],
)
def test_speed_runs_of_some_models_or_other_sizes_write_no_committed_table(
    name, partial, monkeypatch, tmp_path
):
    """Without ``--out``, only a run of the baseline's models at the default sizes writes the
    baseline's table; another prints its own (it replaced the committed one). (The runs and
    the packages are stood in for: the choice of file is what is tested.)"""
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "run", lambda *args: ["| row |"])
    monkeypatch.setattr(module.metadata, "version", lambda package: "0")
    requirer = module if hasattr(module, "require") else module._coverage
    monkeypatch.setattr(requirer, "require", lambda parser, packages: None)
    module.main(["--repeats", "1", *partial])
    assert list(tmp_path.iterdir()) == []
    module.main(["--repeats", "1"])
    assert len(list(tmp_path.iterdir())) == 1
