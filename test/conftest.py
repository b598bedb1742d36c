from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    from dualpath.models import MODELS_DIR, ensure_unpacked

    for d in MODELS_DIR.iterdir():  # tokenizer.json ships xz-compressed
        ensure_unpacked(d)
    return ROOT
