"""`engine.cpus`: the engine's compute threads on their own CPUs, the front on the others.
Config and placement are pure; the move of harness's threads runs for real in a forked child.
The real engine's placement is checked in the engine tier (tests/e2e/test_serve_e2e.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from runtime import config
from runtime.engine import resources
from runtime.engine.command import RuntimePaths, build_plan
from runtime.errors import ConfigError
from tests.support.configs import VALID, engine_config, write_toml


@pytest.mark.parametrize(
    ("text", "normalised"),
    [("1", "1"), ("2-7", "2-7"), ("3,1,2", "1-3"), ("0-2, 5", "0-2,5"), ("4,6-7", "4,6-7")],
)
def test_cpu_lists_are_parsed_and_normalised(text: str, normalised: str) -> None:
    assert engine_config(cpus=text).engine.cpus == normalised


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ('"two"', 'is not "auto" or a CPU list'),
        ('"1-"', 'is not "auto" or a CPU list'),
        ('"7-3"', "is not a CPU range"),
        ('""', 'is not "auto" or a CPU list'),
        ("1", "string"),
    ],
)
def test_bad_cpu_lists_name_the_field(tmp_path: Path, value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write_toml(tmp_path, f"{VALID}\n[engine]\ncpus = {value}\n"))
    assert "'engine.cpus'" in info.value.message and needle in info.value.message
    assert info.value.exit_code == 2


def test_cpus_apply_to_the_cpu_build_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='applies to device = "cpu" only'):
        config.load(write_toml(tmp_path, f'{VALID}\n[engine]\ndevice = "cuda"\ncpus = "1"\n'))


def test_placement_splits_the_available_cpus() -> None:
    placement = resources.cpu_placement(engine_config(cpus="2-3").engine, {0, 1, 2, 3})
    assert placement == resources.CpuPlacement(engine=frozenset({2, 3}), front=frozenset({0, 1}))
    assert placement.describe() == {"engine_cpus": "2-3", "front_cpus": "0-1"}
    assert resources.cpu_placement(engine_config().engine, {0, 1}) is None


def test_auto_gives_the_front_the_last_cpu_and_the_engine_the_rest() -> None:
    auto = engine_config(cpus="auto").engine
    assert auto.cpus == "auto"
    placement = resources.cpu_placement(auto, {4, 5, 6, 7})
    assert placement == resources.CpuPlacement(engine=frozenset({4, 5, 6}), front=frozenset({7}))
    assert resources.cpu_placement(auto, {3}) is None  # one CPU: nothing to split


def test_cpus_outside_the_allowed_set_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        resources.cpu_placement(engine_config(cpus="1-3").engine, {0, 1})
    assert "CPU 2-3 is not available" in info.value.message
    assert "may use CPU 0-1" in info.value.message and info.value.exit_code == 2


def test_the_front_must_keep_a_cpu() -> None:
    with pytest.raises(ConfigError, match="the front needs one") as info:
        resources.cpu_placement(engine_config(cpus="0-1").engine, {0, 1})
    assert "leave at least one CPU" in info.value.fix


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_the_engine_is_told_its_cpus_and_passthrough_cannot_change_them() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    paths = RuntimePaths(Path("/run/h"))
    passthrough = ["VLLM_CPU_OMP_THREADS_BIND"]
    parent = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    explicit = build_plan(
        engine_config(cpus=str(cpus[0]), env_passthrough=passthrough), paths, parent
    )
    assert explicit.env["VLLM_CPU_OMP_THREADS_BIND"] == str(cpus[0])
    auto = build_plan(engine_config(cpus="auto"), paths, parent).env["VLLM_CPU_OMP_THREADS_BIND"]
    assert config.parse_cpu_list(auto) == set(cpus[:-1])
    assert "VLLM_CPU_OMP_THREADS_BIND" not in build_plan(engine_config(), paths, {}).env


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_place_front_moves_every_thread_and_later_ones_follow() -> None:
    """In a forked child: a thread started before the move and one started after both end
    up on the front's CPUs only."""
    cpus = sorted(os.sched_getaffinity(0))
    placement = resources.CpuPlacement(engine=frozenset(cpus[-1:]), front=frozenset(cpus[:-1]))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            release = threading.Event()
            seen: dict[str, set[int]] = {}

            def earlier() -> None:
                release.wait(60)
                seen["earlier"] = os.sched_getaffinity(0)

            before = threading.Thread(target=earlier)
            before.start()
            resources.place_front(placement)
            release.set()
            before.join()
            after = threading.Thread(target=lambda: seen.update(later=os.sched_getaffinity(0)))
            after.start()
            after.join()
            seen["main"] = os.sched_getaffinity(0)
            code = 0 if all(v == set(placement.front) for v in seen.values()) else 3
            os.write(write, repr(seen).encode())
        finally:
            os._exit(code)
    os.close(write)
    report = os.read(read, 4096).decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report


@pytest.mark.parametrize(
    ("cpus", "ranks", "groups"),
    [
        ({0, 1}, 2, ["0", "1"]),
        ({0, 1, 2, 3, 4}, 2, ["0-2", "3-4"]),
        ({2, 5, 6, 9}, 3, ["2,5", "6", "9"]),
        ({0, 1, 2, 3}, 1, ["0-3"]),
    ],
)
def test_engine_cpus_are_split_one_group_per_rank(
    cpus: set[int], ranks: int, groups: list[str]
) -> None:
    split = resources.split_cpus(cpus, ranks)
    assert [config.format_cpu_list(g) for g in split] == groups
    assert set().union(*split) == cpus


def test_more_ranks_than_cpus_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        resources.split_cpus({0, 1}, 4)
    assert "tensor_parallel_size" in info.value.message


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_each_rank_of_a_parallel_engine_gets_its_own_cpus() -> None:
    """vLLM's CPU workers bind to their rank's list ("a|b"); without one they ask NUMA."""
    cpus = sorted(os.sched_getaffinity(0))
    paths = RuntimePaths(Path("/run/h"))
    plan = build_plan(engine_config(vllm={"tensor_parallel_size": 2}), paths, {})
    ranks = plan.env["VLLM_CPU_OMP_THREADS_BIND"].split("|")
    assert len(ranks) == 2
    assert set().union(*(config.parse_cpu_list(r) for r in ranks)) == set(cpus)
    assert not config.parse_cpu_list(ranks[0]) & config.parse_cpu_list(ranks[1])
