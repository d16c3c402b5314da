"""The per-platform torch pin and the arm64 root's target-aware marker evaluation, without a
network or root: fast, so these run in the default suite (the emulated peer is
``test_arm64.py``, marker ``deploy``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from arm64root import TARGET_ENV, applies, fake_cpuinfo, target_constraints
from packaging.requirements import Requirement

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"

X86_LINUX = {**TARGET_ENV, "platform_machine": "x86_64"}
MAC_ARM = {**TARGET_ENV, "sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}


@pytest.mark.parametrize(
    ("env", "pin"),
    [(TARGET_ENV, "==2.10.0"), (X86_LINUX, "==2.13.0"), (MAC_ARM, None)],
    ids=["linux-aarch64", "linux-x86_64", "macos-arm64"],
)
def test_constraints_pin_torch_per_platform(env, pin):
    """aarch64 Linux gets PyPI's newest CPU-only aarch64 torch, x86-64 Linux the CPU build the
    README names, macOS PyPI's normal torch (no pin); hivemind is pinned everywhere."""
    pins = target_constraints(CONSTRAINTS, env)
    assert (str(pins["torch"]) if "torch" in pins else None) == pin
    assert str(pins["hivemind"]) == "==1.1.12"


def test_markers_are_evaluated_for_the_target_not_the_host():
    """torch's CUDA dependencies are for x86-64 only: on the aarch64 target they do not apply,
    whatever machine resolves them (pip download --platform would fetch them)."""
    cuda = Requirement(
        'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux" and platform_machine == "x86_64"'
    )
    assert not applies(cuda)
    assert applies(cuda, env=X86_LINUX)
    assert applies(Requirement("numpy>=1.17"))


def test_extras_apply_only_when_asked_for():
    req = Requirement('pytest==8.3.5; extra == "dev"')
    assert not applies(req)
    assert applies(req, extras=["dev"])


def test_fake_cpuinfo_describes_arm_cores():
    text = fake_cpuinfo(2)
    assert text.count("processor\t:") == 2
    assert "CPU implementer\t: 0x41" in text and "x86" not in text
