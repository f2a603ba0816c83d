"""What this machine's CPU runs natively, for tests that force a precision on the CPU."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

# x86 flags of bfloat16 arithmetic in hardware (AVX-512 BF16, AMX). Without them torch
# emulates bfloat16 in float32 with conversions around every op: SmolLM2 trained in bf16
# ran over 13 minutes on an AMD EPYC without AVX-512 where float32 took seconds.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of /proc/cpuinfo's first processor (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_runs_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (else torch emulates them, slowly)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


needs_native_bf16 = pytest.mark.skipif(
    not cpu_runs_bf16(),
    reason=f"forces bfloat16 on a CPU without bfloat16 instructions (none of "
           f"{', '.join(BF16_FLAGS)} in /proc/cpuinfo): torch would emulate it, for many "
           f"minutes on SmolLM2")
