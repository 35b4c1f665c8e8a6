"""benchmarks/threads.py measures "every shipped CPU config": its list must keep up with
``configs/`` as configs are added."""

from __future__ import annotations

from benchmarks.threads import GPU_STREAMS, shipped_configs
from tests.conftest import ROOT


def test_threads_benchmark_runs_every_shipped_cpu_config():
    runs = shipped_configs()
    listed = {c for run in runs for c in run}
    configs = ROOT / "configs"
    expected = set()
    for path in configs.rglob("*.yaml"):
        rel = path.relative_to(ROOT).as_posix()
        folder = path.parent.name if path.parent != configs else path.stem
        if folder in GPU_STREAMS or path.parent.name == "methods":
            continue  # GPU-sized streams; method fragments that compose on any stream
        expected.add(rel)
    assert listed == expected
    for run in runs:  # a method config runs on top of its own stream's config
        if len(run) == 2:
            stream, method = run
            assert method.split("/")[1] == stream.split("/")[1].removesuffix(".yaml")
        else:
            assert len(run) == 1
    assert len({tuple(r) for r in runs}) == len(runs)
