"""Launch paths other than horovodrun: plain mpirun, mpi4py communicators, config files, TensorBoard.

The multi-process tests start their own 2 ranks through tests/launch.py (timeouts included).
"""

import importlib.util
import re

import pytest
from launch import REPO, run_ranks

TRAIN = REPO / "examples" / "train.py"
TB_TAGS = ["train/loss", "train/lr", "test/accuracy", "comm/bytes_sent", "comm/bytes_received",
           "comm/dense_bytes", "comm/density", "comm/compress_ms", "comm/wait_ms"]
STEPS = 6


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location("hvd_topk_example_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mpirun_run(tmp_path_factory):
    """examples/train.py under plain ``mpirun -np 2`` (no horovodrun), from a config file."""
    log_dir = tmp_path_factory.mktemp("tb")
    out = run_ranks(TRAIN, "--config", REPO / "configs" / "digits_topk.yaml", "--epochs", "1",
                    "--max-steps", STEPS, "--lr", "0.02", "--no-progress", "--log-dir", log_dir,
                    backend="mpi", np=2, timeout=90)
    return out, log_dir


def test_plain_mpirun_trains(mpirun_run):
    out, _ = mpirun_run
    assert re.search(r"on digits .*, 2 ranks, compression: TopKCompressor\(ratio=0\.01\b", out), out
    m = re.search(r"final test accuracy: ([\d.]+)%", out)
    assert m, out


def test_tensorboard_tags(mpirun_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, log_dir = mpirun_run
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    missing = [t for t in TB_TAGS if t not in tags]
    assert not missing, f"missing TensorBoard tags {missing}; written: {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in acc.Scalars("train/lr")][0] == pytest.approx(0.02)  # flag beats config
    assert all(0 < e.value <= 1 for e in acc.Scalars("comm/density"))
    assert all(e.value > 0 for e in acc.Scalars("comm/bytes_sent"))
    assert len(acc.Scalars("test/accuracy")) == 1
    # What rank 0 printed is what it logged (a plumbing check: 6 steps learn too little to test).
    out, _ = mpirun_run
    printed = float(re.search(r"final test accuracy: ([\d.]+)%", out).group(1))
    assert printed == pytest.approx(100 * acc.Scalars("test/accuracy")[0].value, abs=0.006)


def test_hvd_init_from_mpi4py_comm():
    out = run_ranks("mpi4py_comm_worker.py", backend="mpi", np=2, timeout=60)
    for rank in range(2):
        assert f"rank {rank}/2 mpi4py comm: OK" in out, out


def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_values_used_and_flags_override(train_module, tmp_path):
    cfg = write(tmp_path / "c.yaml", "model: mlp\ntopk: 0.001\nbatch_size: 7\nno-progress: true\n"
                                     "weight-decay: 5e-4\nepochs: 3\n")
    args = train_module.parse_args(["--config", cfg])
    assert (args.model, args.topk, args.batch_size, args.no_progress, args.epochs) == \
        ("mlp", 0.001, 7, True, 3)
    assert args.weight_decay == 5e-4  # YAML reads 5e-4 as a string; argparse's type converts it
    args = train_module.parse_args(["--batch-size", "9", f"--config={cfg}", "--topk", "0.1"])
    assert (args.model, args.topk, args.batch_size, args.epochs) == ("mlp", 0.1, 9, 3)
    assert train_module.parse_args([]).model == "simple_cnn"  # no config: the defaults


@pytest.mark.parametrize("text,expected", [
    ("topk: 0.1\nbatchsize: 3\nlearning_rate: 1\n", "unknown key(s) batchsize, learning_rate"),
    ("model: vgg\n", "invalid choice: 'vgg'"),
    ("topk: 2\n", "--topk must be in [0, 1]"),
    ("fp16: yes please\n", "fp16 is a switch"),
    ("- topk\n", "must be a mapping"),
])
def test_config_rejects_bad_files(train_module, tmp_path, capsys, text, expected):
    cfg = write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as e:
        train_module.parse_args(["--config", cfg])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_missing_config_file_is_an_error(train_module, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["digits_topk", "mnist_topk", "cifar10_resnet18"])
def test_shipped_configs_parse(train_module, name):
    args = train_module.parse_args(["--config", str(REPO / "configs" / f"{name}.yaml")])
    assert args.topk > 0
    assert args.dataset in name
