"""torch.export artifacts (.pt2): written with metadata, loaded by the service's engine like
TorchScript ones, refused with a clear message when they are something else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.artifact import load_artifact
from models.placeholder import (
    PLACEHOLDER_FILE,
    PlaceholderSmoothing,
    placeholder_metadata,
    shipped_weights_dir,
)
from models.resattunet import ResAttUnet
from models.training.export import save_exported
from service.errors import ModelError
from workers.denoise import DenoiseEngine


def test_exported_placeholder_runs_like_the_torchscript_one(tmp_path: Path) -> None:
    metadata = placeholder_metadata().model_copy(update={"name": "placeholder-export"})
    path = save_exported(PlaceholderSmoothing(), metadata, tmp_path / "p.pt2")
    exported = DenoiseEngine(path)
    scripted = DenoiseEngine(shipped_weights_dir() / PLACEHOLDER_FILE)
    assert exported.metadata == metadata
    stack = torch.rand(3, 3, 37, 50)  # padded to 40 x 56 by the engine, cropped back
    torch.testing.assert_close(exported.denoise(stack), scripted.denoise(stack))


def test_exported_resattunet_takes_sizes_that_are_not_multiples_of_16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = ResAttUnet(3, filters=(4, 8, 16)).eval()
    metadata = placeholder_metadata().model_copy(update={"name": "r", "arch": "resattunet"})
    module, _ = load_artifact(save_exported(network, metadata, tmp_path / "r.pt2"))
    for height, width in ((24, 40), (64, 32)):
        stack = torch.randn(2, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(module(stack), network(stack), rtol=1e-4, atol=1e-5)


def test_refuses_what_is_not_an_exported_program(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt2"
    text.write_text("hello")
    with pytest.raises(ModelError, match=r"notes\.pt2 is not a torch\.export program"):
        load_artifact(text)
    renamed = tmp_path / "script.pt2"
    shutil.copy(shipped_weights_dir() / PLACEHOLDER_FILE, renamed)
    with pytest.raises(ModelError, match=r"must be named \*\.pt"):
        load_artifact(renamed)
    with pytest.raises(ModelError, match=r"must be named \*\.pt2"):
        save_exported(PlaceholderSmoothing(), placeholder_metadata(), tmp_path / "x.pt")


def test_exported_program_of_wrong_depth_is_refused_at_load(tmp_path: Path) -> None:
    metadata = placeholder_metadata()
    path = save_exported(PlaceholderSmoothing(), metadata, tmp_path / "p.pt2")
    # Rewrite the program with metadata claiming depth 5: the probe must catch it.
    program = torch.export.load(str(path))
    lying = metadata.model_copy(update={"depth": 5})
    torch.export.save(
        program, str(tmp_path / "lying.pt2"), extra_files={"tomocast.json": lying.model_dump_json()}
    )
    with pytest.raises(ModelError, match="depth=5"):
        load_artifact(tmp_path / "lying.pt2")


@pytest.mark.gpu
def test_exported_tomogan_runs_fp16_on_cuda_like_fp32_on_cpu(tmp_path: Path) -> None:
    from models.tomogan import TomoGANGenerator

    torch.manual_seed(0)
    metadata = placeholder_metadata().model_copy(update={"name": "t", "arch": "tomogan"})
    path = save_exported(TomoGANGenerator(3), metadata, tmp_path / "t.pt2")
    cpu = DenoiseEngine(path, "cpu")
    cuda = DenoiseEngine(path, "cuda", warmup_shape=(2, 64, 64))
    assert cuda.dtype == torch.float16
    stack = torch.rand(2, 3, 61, 53)
    expected = cpu.denoise(stack)
    got = cuda.denoise(stack.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 * float(expected.abs().max()))
