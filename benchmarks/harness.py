"""The one benchmark harness of the CPU and GPU suites: environment record, timing, peak memory, child
processes with timeouts, result rows and files.

Every suite writes `<suite>-<hardware>.md` and `.json` (hardware: `cpu` or the card, e.g. `h200`) under
benchmarks/results/ or `--out`, headed by the command, the CPU or card, and the library versions
(`environment`). Comparisons are rows {"case", "minilora", "reference", "ratio", "unit"} (`ratio_row`).
CPU suites (benchmarks/cpu/) run on CPU by default and on a CUDA device with `--device cuda`
(e.g. `quality-h200.md`); GPU suites (benchmarks/gpu/) time with CUDA events (`bench_us`, `graph_us`).

Timing: `bench` warms up, then takes the median of repeats (CPU work is
synchronous; on CUDA every timed call is bracketed by `torch.cuda.synchronize`). On CUDA, `PeakCUDA`
measures the peak of `torch.cuda.max_memory_allocated` above the allocation at entry.
Peak memory: `PeakRSS` resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`) and reads
`VmHWM` from /proc/self/status afterwards, so it measures the resident memory a block of code added at its
peak, allocator included (what a user sees in `top`). Work that must not share a process with anything
else (loading a model, a training step) runs in a child process through `run_child`.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware_tag(device: str = "cuda") -> str:
    """The <hardware> part of result file names: 'cpu', or the GPU's short name ('h200')."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for known in ("h200", "h100", "a100", "l40s", "l4", "a10g", "t4"):
        if known in name:
            return known
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "gpu"


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that wall-clock time covers it."""
    if device != "cpu":
        torch.cuda.synchronize(torch.device(device))


def environment(argv: list[str] | None = None, device: str | None = None) -> dict[str, Any]:
    """Command line, hardware, versions and date of this run (the header of every result file).

    `argv`: the arguments of `python -m benchmarks` (None: this process's own command line). `device`: None
    is the GPU where there is one, else the CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    own = " ".join([os.path.basename(sys.executable), *sys.argv])
    env: dict[str, Any] = {
        "command": own if argv is None else "python -m benchmarks " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if device != "cpu":
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["nvidia_smi"] = nvidia_smi()
    for name in ("triton", "bitsandbytes", "transformers", "peft", "minilora"):
        env[name] = package_version(name)
    return env


def nvidia_smi() -> str | None:
    """Driver, clocks, temperature and power of the cards at the start of the run (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw"
    done = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- timing
def bench(fn: Callable[[int], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Median wall time of fn(i) over `repeats` calls after `warmup` calls; i rotates inputs."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def bench_pair(
    fns: dict[str, Callable[[int], Any]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Like `bench` for several functions, interleaved call by call (a, b, a, b, ...).

    On a shared machine the load changes from second to second; interleaving gives every library the
    same conditions, so their ratio is fairer than that of two separate runs.
    """
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn(warmup + i)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for name, t in times.items()}


def bench_us(fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median GPU time of fn() in microseconds (CUDA events, L2 flushed before each call: triton's do_bench)."""
    import triton.testing

    return 1000.0 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graph_us(fn: Callable[[], Any], reps: int = 10) -> float:
    """GPU time of one fn() without the Python launch cost: `reps` calls captured in a CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return bench_us(graph.replay) / reps


def cpu_launch_us(fn: Callable[[], Any], calls: int = 50) -> float:
    """Host time per call of fn() (launch cost; the GPU queue absorbs the work)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def memory_status() -> dict[str, int]:
    """VmHWM (peak) and VmRSS of this process, in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _rss_anon() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.extra` (bytes above the RSS at entry) and `peak.total`.

    With `sample_anon=True` a thread also samples RssAnon (heap memory, without the file pages of
    memory-mapped checkpoints that VmHWM includes) every 10 ms: `peak.anon_extra`.
    """

    def __init__(self, sample_anon: bool = False) -> None:
        self.sample_anon = sample_anon
        self.anon_extra = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._anon_peak = max(self._anon_peak, _rss_anon())
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRSS:
        if self.sample_anon:
            import threading

            self._anon_start = self._anon_peak = _rss_anon()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass  # not Linux, or not allowed: the peak then covers the whole process
        self.start = memory_status().get("VmRSS", 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sample_anon:
            self._stop.set()
            self._thread.join()
            self.anon_extra = max(0, max(self._anon_peak, _rss_anon()) - self._anon_start)
        status = memory_status()
        self.total = status.get("VmHWM", 0)
        self.extra = max(0, self.total - self.start)
        self.end = status.get("VmRSS", 0)


class PeakCUDA:
    """`with PeakCUDA(device) as peak: ...` then `peak.extra` (peak bytes allocated above the entry's), `peak.total`
    (the peak itself) and `peak.end` (bytes allocated at exit): torch's caching allocator, synchronized."""

    def __init__(self, device: str = "cuda") -> None:
        self.device = torch.device(device)

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.total = torch.cuda.max_memory_allocated(self.device)
        self.extra = max(0, self.total - self.start)
        self.end = torch.cuda.memory_allocated(self.device)


def peak_memory(device: str) -> PeakRSS | PeakCUDA:
    """PeakRSS on CPU, PeakCUDA on a GPU: the memory a block of code adds at its peak."""
    return PeakRSS() if device == "cpu" else PeakCUDA(device)


def run_child(suite: str, task: str, args: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run `benchmarks.cpu.<suite>.child_<task>(**args)` in a fresh Python; return its JSON result.

    `suite` may also be a full module name (`benchmarks.gpu.x`). A child that fails, or runs past `timeout`
    seconds, raises RuntimeError with the end of its output.
    """
    module = suite if "." in suite else f"benchmarks.cpu.{suite}"
    cmd = [sys.executable, "-m", "benchmarks.harness", module, task, json.dumps(args)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"child {module}.{task} ran past its timeout of {timeout} s") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {module}.{task} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def run_script(module: str, args: list[str], timeout: float | None, log: Path) -> int:
    """Run `python -m <module> <args>` in a fresh Python, its output shown and saved to `log`; its exit code.

    A script still running after `timeout` seconds is killed and gives 124 (as coreutils' timeout).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        timer = None
        if deadline is not None:
            import threading

            timer = threading.Timer(timeout, proc.kill)
            timer.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        code = proc.wait()
        if timer is not None:
            timer.cancel()
    if deadline is not None and code < 0 and time.monotonic() >= deadline:
        print(f"{module}: killed after its timeout of {timeout} s", file=sys.stderr)
        return 124
    return code


def progress(items: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    """tqdm on stderr when installed, else a plain line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        items = list(items)
        for i, item in enumerate(items):
            print(f"{desc}: {i + 1}/{len(items)}", file=sys.stderr, flush=True)
            yield item
        return
    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False)


# ---------------------------------------------------------------------------------------------- results
def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3g}"
        return f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


ROW_HEADER = ["case", "minilora", "reference", "ratio", "unit"]


def ratio_row(case: str, minilora: Any, reference: Any, unit: str) -> dict[str, Any] | None:
    """One comparison row, ratio = minilora / reference; None where either value is missing or not a number."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (minilora, reference))
    if not numbers or not reference:
        return None
    return {"case": case, "minilora": minilora, "reference": reference, "ratio": minilora / reference, "unit": unit}


def write_results(out_dir: Path, stem: str, record: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `<stem>.json` (the record) and `<stem>.md` into `out_dir`; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return md_path, json_path


def verdict(ratio: float, lower_is_better: bool = True, what: str = "time") -> str:
    """A plain word on a minilora / reference ratio: 'minilora faster' or 'minilora SLOWER'."""
    better = ratio < 1 if lower_is_better else ratio > 1
    if abs(ratio - 1) < 0.03:
        return "on par"
    words = {"time": ("faster", "SLOWER"), "memory": ("lighter", "HEAVIER"), "rate": ("faster", "SLOWER")}
    good, bad = words[what]
    return f"minilora {good}" if better else f"minilora {bad}"


class Report:
    """Tables and figures of one suite run; `write()` saves <suite>-<hardware>.md and .json into `out`."""

    def __init__(self, suite: str, argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> None:
        self.suite = suite
        self.out = out
        self.smoke = smoke
        self.device = device
        self.tag = hardware_tag(device)
        self.env = environment(argv, device)
        self.sections: list[str] = []
        self.data: dict[str, Any] = {}
        self.notes: list[str] = []
        self.t0 = time.perf_counter()

    def table(self, title: str, header: list[str], rows: list[list[Any]], note: str = "") -> None:
        text = f"## {title}\n\n{md_table(header, rows)}"
        if note:
            text += f"\n{note}\n"
        self.sections.append(text)
        print(text, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def figure(self, name: str) -> Path:
        """Path of a PNG to write next to the results (recorded in the json)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{self.suite}-{self.tag}-{name}.png"
        self.data.setdefault("figures", []).append(path.name)
        return path

    def write(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.env["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.env["smoke"] = self.smoke
        self.env["load_average_end"] = os.getloadavg()[0]
        if self.device == "cpu":
            hardware = (
                f"{self.env['cpu']}, {self.env['cores_usable']} usable cores "
                f"({self.env['torch_threads']} torch threads); 1-min load average "
                f"{self.env['load_average_start']:.1f} at start, {self.env['load_average_end']:.1f} at end "
                "(other processes shared the cores)"
            )
        else:
            hardware = (
                f"{self.env['gpu']} ({self.env['gpu_memory_bytes'] / 2**30:.0f} GiB, CUDA {self.env['cuda']}), "
                f"host {self.env['cpu']}, {self.env['cores_usable']} usable cores"
            )
        header = [
            f"# Benchmark `{self.suite}` on {'CPU' if self.device == 'cpu' else self.env['gpu']}",
            "",
            f"- command: `{self.env['command']}`",
            f"- hardware: {hardware}",
            f"- versions: torch {self.env['torch']}, bitsandbytes {self.env['bitsandbytes']}, "
            f"transformers {self.env['transformers']}, peft {self.env['peft']}, minilora {self.env['minilora']}",
            f"- date: {self.env['date']}, suite wall time {self.env['wall_s']} s"
            + (" (SMOKE run)" if self.smoke else ""),
            "",
        ]
        figures = [f"![{f}]({f})" for f in self.data.get("figures", [])]
        closing = ["## Notes", "", *[f"- {n}" for n in self.notes], ""] if self.notes else []
        md = "\n".join(header) + "\n" + "\n".join(self.sections) + "\n" + "\n".join(closing + figures) + "\n"
        record = {"suite": self.suite, "environment": self.env, "results": self.data, "notes": self.notes}
        return write_results(self.out, f"{self.suite}-{self.tag}", record, md)


def tiny_checkpoint(directory: Path, vocab_size: int = 49152) -> Path:
    """A tiny random Llama saved by transformers, with SmolLM2's tokenizer.json (its ids fit the vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    from minilora.io.gguf import default_model_path, gguf_to_dir_cached

    tokenizer = gguf_to_dir_cached(default_model_path()) / "tokenizer.json"
    (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


if __name__ == "__main__":  # the child of run_child: `python -m benchmarks.harness MODULE TASK JSON_ARGS`
    # Prints the dict of MODULE.child_TASK(**args) as one `RESULT {json}` line, so that a measurement (peak
    # RSS above all) is not disturbed by what the parent process holds.
    module_name, task, child_args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(child_args.pop("threads", torch.get_num_threads()))
    result = getattr(importlib.import_module(module_name), f"child_{task}")(**child_args)
    print("RESULT " + json.dumps(result), flush=True)
