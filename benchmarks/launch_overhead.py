"""Launch overhead of `sge_repro.launch` on one node: the wall time of launching N local processes
that join a gloo group and return at once (what a training stage pays before its first step).

    python -m benchmarks.launch_overhead --nproc 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def trivial_target() -> int:
    """Imports what a stage worker imports (torch, sge_repro), joins the group, returns."""
    from sge_repro.distributed import join_process_group

    return join_process_group(cuda=False).world_size


def main() -> None:
    from sge_repro.launch import launch
    from sge_repro.params_sections import LaunchParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    settings = LaunchParams(nproc_per_node=options.nproc)
    times = []
    with tempfile.TemporaryDirectory() as state:
        for _ in range(options.repeats):
            started = time.perf_counter()
            assert launch(trivial_target, (), settings, name="bench", state_dir=Path(state)) == options.nproc
            times.append(time.perf_counter() - started)
    print(f"launch of {options.nproc} processes: median {statistics.median(times):.2f} s, "
          f"min {min(times):.2f} s, max {max(times):.2f} s over {options.repeats} "
          f"({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
