"""`edgeft bench`: latency and memory measurements of the runtime (see docs/benchmarks.md).

`run_bench` (run.py) runs the phases and returns the report dict; the other modules hold its
pieces: profiles and prompts, adapter fixtures, machine probes, statistics, measurement
primitives, child-process probes, the llama-bench pairing, and the targets and plot. The names
below are the ones the CLI, tests and docs use.
"""

from .fixtures import (
    ADAPTER_DTYPES,
    ALL7,
    TARGET_SETS,
    merge_adapter,
    write_random_adapter,
)
from .fixtures import _float as _float
from .llama_bench import LLAMA_BENCH_CTX, run_llama_bench
from .machine import machine_info, memory_bandwidth_gbs, rss_mb
from .probes import _child as _child
from .probes import _interleaved_probe as _interleaved_probe
from .probes import _memory_probe as _memory_probe
from .profiles import (
    DECODE_PROMPT,
    PENALTY_PROMPT,
    PROFILES,
    Profile,
    Progress,
    prompt_set,
    resolve_profile,
)
from .report import evaluate_targets, plot
from .run import run_bench
from .stats import _rounded as _rounded
from .stats import dist

__all__ = [
    "ADAPTER_DTYPES", "ALL7", "DECODE_PROMPT", "LLAMA_BENCH_CTX", "PENALTY_PROMPT", "PROFILES", "TARGET_SETS",
    "Profile", "Progress", "dist", "evaluate_targets", "machine_info", "memory_bandwidth_gbs", "merge_adapter",
    "plot", "prompt_set", "resolve_profile", "rss_mb", "run_bench", "run_llama_bench", "write_random_adapter",
]
