"""Training-device selection: ``auto`` falls back to the CPU, a GPU this torch cannot use is a one-line error."""

from __future__ import annotations

import pytest
import torch

from deepshare_convert.cli.app import run
from deepshare_convert.errors import DeepShareError
from deepshare_convert.training.device import resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x"])
def test_unknown_device_is_refused(name):
    with pytest.raises(DeepShareError, match="device"):
        resolve_device(name)


@no_cuda
def test_cuda_without_gpu_is_refused_in_one_line():
    with pytest.raises(DeepShareError, match="sees no CUDA GPU") as e:
        resolve_device("cuda:0")
    assert "\n" not in str(e.value)


@no_cuda
@pytest.mark.parametrize("command", [["retrain", "--recipe", "recipes/digits_demo.yaml"],
                                     ["snl", "digits_cnn", "--data", "digits", "--budget", "10%"]])  # fmt: skip
def test_cli_refuses_cuda_before_any_work(command, tmp_path, capsys):
    assert run([*command, "-o", str(tmp_path / "out"), "--device", "cuda"]) != 0
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "out").exists()  # refused before the run directory was made
