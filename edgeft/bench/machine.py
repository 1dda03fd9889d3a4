"""What the machine is: CPU, cores, RAM, llama.cpp build features, load average, memory
bandwidth (the bound on decode speed) and this process's resident memory."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time

import numpy as np


def rss_mb() -> float | None:
    """Resident set size of this process, MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return psutil.Process().memory_info().rss / 1e6
    except Exception:
        return None


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> dict:
    """Single-thread copy bandwidth (numpy copy of an `mb` MiB array; bytes read + written)."""
    n = mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault both in
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    moved = 2 * src.nbytes
    return {"median_gbs": moved / float(np.median(times)) / 1e9, "best_gbs": moved / min(times) / 1e9,
            "array_mib": mb, "method": "numpy copyto, 1 thread, read + write bytes"}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    with contextlib.suppress(Exception):
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    from .. import _llama

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    total_mb = None
    with contextlib.suppress(OSError, ValueError):
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "threads_used": threads,
        "ram_mb": total_mb,
        "llama_cpp_python": _llama.VERSION,
        "llama_cpp_features": _llama.system_info(),
        "llama_cpp_patch_level": _llama.patch_level(),  # cmake/patches: 1 = same-shape swaps skip the re-reserve
        "lora_decode_fused": _llama.lora_decode_fused(),  # patch 0002 active: one op per LoRA chain in CPU decode
        "batch_attention": _llama.patches.batch_attention_path(),  # patch 0006: a step's rows over their own cells
        "gpu_offload": _llama.supports_gpu_offload(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_avg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
