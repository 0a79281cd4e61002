"""Threads follow the cores this process may use: affinity and the cgroup's CPU quota (#19)."""

import os

from prunekit.threads import usable_cores


def test_cgroup_v2_quota_caps_the_cores(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert usable_cores(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU -> still one thread
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota: affinity decides
    assert usable_cores(tmp_path) == affinity


def test_cgroup_v1_quota_and_no_cgroup(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 1
    assert usable_cores(tmp_path / "missing") == len(os.sched_getaffinity(0))
