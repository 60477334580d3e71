"""Unit-test fixtures shared by modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.hypervisor.fake import FakeHypervisor


@pytest.fixture
def fake_ctx(clean_env: Path) -> Context:
    """An engine Context on a fresh catalog with the FakeHypervisor in place of libvirt."""
    return Context(load_config(), _hv=FakeHypervisor())
