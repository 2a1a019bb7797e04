"""The memory refusal: a run whose estimate cannot fit stops with one line, before it starts."""

import pytest

from spinifel.errors import ConfigError
from spinifel.runtime import available_memory_bytes, check_memory

MIB = 2**20


def test_check_memory_refuses_warns_and_passes():
    """Estimate above available / ranks: ConfigError naming algorithm.M and the numbers.

    The issue's case: M = 511 on 2 ranks of a 24 GiB machine estimated 40759.4 MiB per rank
    and went on to die in a FINUFFT malloc with a traceback.
    """
    with pytest.raises(ConfigError, match=r"algorithm\.M.*40759\.4 MiB.*24576\.0 MiB.*2 ranks"
                                          r".*12288\.0 MiB per rank") as e:
        check_memory(int(40759.4 * MIB), 2, available_bytes=24 * 1024 * MIB)
    assert "\n" not in str(e.value)
    # 90 % of the share: a warning; 10 %: nothing; unknown memory: nothing
    assert "tight" in check_memory(9 * 1024 * MIB, 1, available_bytes=10 * 1024 * MIB)
    assert check_memory(1024 * MIB, 1, available_bytes=10 * 1024 * MIB) is None
    with pytest.raises(ValueError):
        check_memory(1, 0, available_bytes=1)


def test_available_memory_takes_the_smaller_of_meminfo_and_cgroup(tmp_path):
    """MemAvailable, capped by the cgroup v2 headroom (a batch job's limit)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   2048 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert available_memory_bytes(str(meminfo), str(cg)) == 2048 * 1024
    (cg / "memory.max").write_text("1048576\n")
    (cg / "memory.current").write_text("524288\n")
    assert available_memory_bytes(str(meminfo), str(cg)) == 524288
    (cg / "memory.max").write_text("max\n")  # no limit
    assert available_memory_bytes(str(meminfo), str(cg)) == 2048 * 1024
    assert available_memory_bytes(str(tmp_path / "absent"), str(cg)) is None
