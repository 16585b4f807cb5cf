"""The engine end to end on the tiny random model: real loading, chat template, generation, result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch

from scp_node.engine.medgemma import (
    TEST_MODEL_NAME,
    EngineError,
    MedGemmaEngine,
    dtype_for,
    model_name_and_version,
    resolve_device,
)
from scp_node.engine.modeldir import ModelDirError, weights_sha256
from scp_node.engine.preprocess import SeriesSkipped
from scp_node.engine.prompts import build_messages, profile_for_modality
from scp_node.engine.result import AnalysisResult, SourceImageRef

from .conftest import DATA, XRAY_DIR, need


def test_identity_says_test_model(engine, model_dir: Path) -> None:
    identity = engine.identity
    assert identity.is_test_model
    assert identity.name == TEST_MODEL_NAME and "TEST MODEL" in identity.name and "random" in identity.name
    assert len(identity.name) <= 64 and len(identity.version) <= 64  # DICOM LO
    assert identity.weights_sha256 == weights_sha256(model_dir)
    assert identity.version == f"test-{identity.weights_sha256[:12]}"
    assert (identity.device, identity.dtype) == ("cpu", "float32")
    assert engine.image_size == 896


def test_analyse_chest_xray(engine) -> None:
    path = need(XRAY_DIR / "DX_chest_canon_966_fixed_J2KR.dcm")
    result = engine.analyse_series([path])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert isinstance(result, AnalysisResult)
    assert result.modality == "DX"
    assert result.sources == [SourceImageRef(ds.SOPClassUID, ds.SOPInstanceUID, None)]
    assert result.prompt_profile == "cxr-report"
    assert isinstance(result.findings_text, str) and "<unused9" not in result.findings_text
    assert 1 <= result.generated_tokens <= 8
    assert result.seconds > 0
    assert result.model == engine.identity


def test_analyse_ct_volume(engine, ct_files: list[Path]) -> None:
    result = engine.analyse_series(ct_files)
    assert result.modality == "CT" and result.prompt_profile == "ct-volume"
    assert len(result.sources) == 85
    headers = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files)}
    z = [float(headers[s.sop_instance_uid].ImagePositionPatient[2]) for s in result.sources]
    assert all(b < a for a, b in zip(z, z[1:]))  # head to foot
    assert 1 <= result.generated_tokens <= 8
    assert result.model.is_test_model


def test_greedy_generation_is_deterministic(engine) -> None:
    prepared = engine.prepare([need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")])
    messages = build_messages(prepared, profile_for_modality("CR"))
    first = engine.generate(messages, max_new_tokens=16)
    second = engine.generate(messages, max_new_tokens=16)
    assert first.text == second.text and first.generated_tokens == second.generated_tokens
    assert first.input_tokens > 256  # one image = 256 soft tokens plus text


def test_series_that_cannot_be_analysed_raises_series_skipped(engine) -> None:
    with pytest.raises(SeriesSkipped, match="Structured Report"):
        engine.analyse_series([need(DATA / "sr_examples" / "dcmqi" / "sr.dcm")])


def test_missing_model_directory_fails_on_load(tmp_path: Path) -> None:
    engine = MedGemmaEngine(tmp_path / "missing", device="cpu")
    with pytest.raises(ModelDirError, match="does not exist"):
        engine.load()
    assert not engine.loaded


def test_device_and_dtype_rules() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert dtype_for(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda:0")
        assert dtype_for(torch.device("cuda:0")) in (torch.bfloat16, torch.float32)
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(EngineError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(EngineError):
        resolve_device("mps")


@pytest.mark.parametrize(
    "relative,expected",
    [
        ("medgemma-1.5-4b-it", ("MedGemma 1.5 4B", "1.5")),
        ("hub/models--google--medgemma-1.5-4b-it/snapshots/0123abcd", ("MedGemma 1.5 4B", "1.5")),
        ("medgemma-4b-it", ("MedGemma 1 4B", "1")),
        ("some-model", ("Gemma 3 image-text model (some-model)", "sha256-" + "ab" * 6)),
    ],
)
def test_model_name_from_directory(tmp_path: Path, relative: str, expected: tuple[str, str]) -> None:
    folder = tmp_path / relative
    folder.mkdir(parents=True)
    assert model_name_and_version(folder, "ab" * 32, test_model=False) == expected


def test_package_import_stays_light() -> None:
    code = (
        "import sys, scp_node.engine as e; "
        "heavy = [m for m in ('torch', 'transformers', 'pydicom') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert e.ModelIdentity and e.check_model_dir; "
        "assert e.SeriesSkipped.__name__ == 'SeriesSkipped'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
