"""Shared fixtures for the engine tests: real DICOM data from ../shared/data and one tiny test model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CT_DIR = DATA / "ct_chest_lidc0001" / "CT"
XRAY_DIR = DATA / "xray_chest"


def need(path: Path) -> Path:
    """The shared data set's ``path``: missing, it fails in CI and skips elsewhere (the one rule of
    tests/support/paths.py)."""
    from tests.support.paths import need_data

    return need_data(path)


@pytest.fixture(scope="session")
def ct_files() -> list[Path]:
    return sorted(need(CT_DIR).glob("*.dcm"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random MedGemma-architecture model, built once per test session."""
    from scp_node.engine.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny-medgemma", seed=0)


@pytest.fixture(scope="session")
def engine(model_dir: Path):
    from scp_node.engine.medgemma import MedGemmaEngine

    eng = MedGemmaEngine(model_dir, device="cpu", max_new_tokens=8, structured=False)
    eng.load()
    return eng


#: Small answer bounds keep constrained generation on CPU short (the worst case is ~600 tokens).
SMALL_BOUNDS = dict(max_findings=2, location_chars=16, description_chars=40, impression_chars=40,
                    recommendation_chars=24)


@pytest.fixture(scope="session")
def structured_engine(model_dir: Path):
    from scp_node.engine.medgemma import MedGemmaEngine
    from scp_node.engine.schema import SchemaBounds

    eng = MedGemmaEngine(model_dir, device="cpu", structured=True, schema_bounds=SchemaBounds(**SMALL_BOUNDS),
                         max_batch=4)
    eng.load()
    return eng


@pytest.fixture(scope="session")
def ct_prepared(ct_files: list[Path]):
    from scp_node.engine.preprocess import prepare_series

    return prepare_series(ct_files)
