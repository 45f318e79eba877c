"""Part `scaling` of benchmarks.bench: how the embedding job and stage 1 grow with the data.

    python -m benchmarks.bench --only scaling                          # small: N = 100,000
    python -m benchmarks.bench --only scaling --set scaling_rows=2000  # a quick check

For each case (`embed`, `stage1`) and each size N, 4N, 16N (`scaling_rows`, `scaling_factor`,
`scaling_sizes` of the preset) one measurement runs in a fresh process, the *driver*, connected
to one local Ray head that this module starts for the whole part (`ray start --head` on
127.0.0.1 with `num_cpus` = the cores and a fixed `--object-store-memory`, stopped afterwards by
its own processes only). Per size it records:

- `driver_peak_rss_gib`: the driver's peak resident memory when the job returned, the `VmHWM`
  of /proc/self/status (imports, `ray.init` and the job; Ray's worker processes are not
  counted). Not `ru_maxrss`: Linux carries a parent's high-water mark into a forked child's
  `ru_maxrss` across exec, so every size would read the benchmark process's own peak (1.88 GiB
  at every size in the first full run, 2026-12-01, while VmHWM was not recorded),
- `object_store_peak_gib`: the cluster's object store bytes in use (shared memory plus fallback
  mmap) at their peak while the driver ran, minus the value just before it started. A monitor
  process polls the raylet every `scaling_sample_s` (0.5 s) with
  `ray._private.internal_api.get_memory_info_reply` (the call behind `ray memory --stats-only`;
  its `store_stats.object_store_bytes_used`, `object_store_bytes_fallback` and
  `spilled_bytes_total`). Bytes spilled to disk during the run are reported next to it,
  `object_store_spilled_gib`, as spilling would cap the in-store peak at the store's size,
- `seconds_per_row`: wall seconds of the library call (`embed_shards`, `train_stage1`) over the
  rows; `ray.init` and imports are not timed.

Growth = largest size over smallest; goals: driver RSS growth <= 1.2, seconds per row growth
<= 1.3. The inputs are synthetic and built once under the work directory:

- embed: a caption corpus in the img2dataset text layout (parquet shards with `key` and `txt`,
  `shard_rows` rows each: 50,000, or N/2 for small N), random captions of 5-15 words from a
  fixed, seeded vocabulary. Size k x N reads the first k x N / shard_rows shards. Each run embeds
  into a fresh cache root (so it encodes) with the preset's smallest text tower
  (`scaling_model`, seeded random weights).
- stage1: bring-your-own caches of the same captions (`cache.write_part` file by file, never
  the whole set in memory): new 768-d and old 512-d float16 unit vectors, keys shared. Each
  size is a cache directory of hard links to the first parts. `train_stage1` reads the two
  directories; one epoch, batch `scaling_stage1_batch` (capped at N/4), psi depth 1 width 512.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.local_ray import free_port, stop_head

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SHARD_ROWS = 50_000          # rows per caption shard / cache part (img2dataset's default order)
NEW_DIM, OLD_DIM = 768, 512  # bring-your-own stage-1 caches: an L/14 -> B/32 upgrade's dims
GOALS = {"driver_rss_growth": 1.2, "seconds_per_row_growth": 1.3}
CASES = ("embed", "stage1")


def say(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sizes(n: int, factor: int = 4, count: int = 3) -> list[int]:
    return [n * factor**k for k in range(count)]


def shard_rows(n: int) -> int:
    """Rows per shard (and cache part): 50,000, or N/2 when N is small, so that every size is a
    whole number of shards and the smallest has at least two."""
    rows = min(SHARD_ROWS, max(1, n // 2))
    if n % rows:
        raise ValueError(f"scaling_rows={n} must be a multiple of {rows} (rows per shard)")
    return rows


# -----------------------------------------------------------------------------
# synthetic inputs, built once

def _build_once(out: Path, build) -> Path:
    if not (out / "_DONE").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / "_DONE").write_text("")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _vocabulary(seed: int, words: int = 5000) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 10, words)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths], dtype=object)


def caption_corpus(work: Path, rows_per_shard: int, n_shards: int, seed: int = 0) -> list[str]:
    """Parquet shards in the img2dataset text layout (`key`, `txt` strings), built once; random
    captions of 5-15 words from a seeded vocabulary. Returns the files, sorted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def build(tmp: Path) -> None:
        vocab = _vocabulary(seed)
        for i in range(n_shards):
            rng = np.random.default_rng([seed, 2, i])
            words = vocab[rng.integers(0, len(vocab), (rows_per_shard, 15))]
            lengths = rng.integers(5, 16, rows_per_shard)
            txt = [" ".join(w[:k]) for w, k in zip(words, lengths)]
            keys = [f"c{i * rows_per_shard + j:09d}" for j in range(rows_per_shard)]
            pq.write_table(pa.table({"key": pa.array(keys, pa.string()),
                                     "txt": pa.array(txt, pa.string())}),
                           tmp / f"captions-{i:05d}.parquet")

    out = _build_once(work / f"captions-{rows_per_shard}x{n_shards}-seed{seed}", build)
    return sorted(str(p) for p in out.glob("captions-*.parquet"))


def byo_caches(work: Path, rows_per_part: int, n_parts: int, size_rows: list[int],
               seed: int = 0) -> dict[int, tuple[Path, Path]]:
    """Bring-your-own stage-1 caches, built once: `all/new` (768-d) and `all/old` (512-d),
    float16 unit vectors, the same keys, written part by part (one part in memory at a time);
    old = normalise(new[:, :512] + noise), so the two are related as real caches are. Each size
    gets `rows-<n>/new` and `rows-<n>/old`: hard links to the first parts and its own
    `_SUCCESS.json`. Returns {rows: (new_dir, old_dir)}."""
    from xbt_ray.data import cache

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def build(tmp: Path) -> None:
        meta = {"new": cache.make_meta("scaling-new", "random-seed0", NEW_DIM, "scaling-captions",
                                       "text"),
                "old": cache.make_meta("scaling-old", "random-seed0", OLD_DIM, "scaling-captions",
                                       "text")}
        for i in range(n_parts):
            rng = np.random.default_rng([seed, 3, i])
            keys = np.array([f"c{i * rows_per_part + j:09d}" for j in range(rows_per_part)],
                            dtype=object)
            new = unit(rng.standard_normal((rows_per_part, NEW_DIM), dtype=np.float32))
            old = unit(new[:, :OLD_DIM] + 0.01 * rng.standard_normal((rows_per_part, OLD_DIM),
                                                                     dtype=np.float32))
            for role, emb in (("new", new), ("old", old)):
                cache.write_part(tmp / "all" / role, i, keys, keys, emb, meta[role], "float16")
        for n in size_rows:
            k = n // rows_per_part
            for role in ("new", "old"):
                d = tmp / f"rows-{n}" / role
                d.mkdir(parents=True)
                for i in range(k):
                    src = tmp / "all" / role / f"part-{i:05d}.parquet"
                    try:
                        os.link(src, d / src.name)
                    except OSError:
                        shutil.copy2(src, d / src.name)
                cache.mark_complete(d, {"rows_in": n, "rows_embedded": n, "skipped": {}})

    out = _build_once(work / f"byo-{rows_per_part}x{n_parts}-seed{seed}", build)
    return {n: (out / f"rows-{n}" / "new", out / f"rows-{n}" / "old") for n in size_rows}


# -----------------------------------------------------------------------------
# one local Ray head for the whole part, and a monitor of its object store

class LocalHead:
    """`ray start --head` on 127.0.0.1 in a temp dir of its own, token auth with a fresh token,
    stopped by terminating exactly the processes whose command line names that temp dir (never
    `ray stop`, which would stop every Ray on the machine). Same recipe as
    tests/local_cluster.py; the ports and the stop are shared with it (benchmarks/local_ray.py)."""

    def __init__(self, num_cpus: int, object_store_bytes: int):
        self.num_cpus, self.object_store_bytes = num_cpus, object_store_bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="xs", dir="/tmp"))  # short: socket paths
        self.address = f"127.0.0.1:{free_port()}"
        self.env = dict(os.environ) | {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                     "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TRAIN_V2_ENABLED": "1",
                     "RAY_USAGE_STATS_ENABLED": "0",
                     "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT),
                                                               os.environ.get("PYTHONPATH")) if p)}

    def start(self) -> LocalHead:
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--head", f"--port={self.address.split(':')[1]}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
               f"--object-store-memory={self.object_store_bytes}", "--include-dashboard=false",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               # every port chosen here: another Ray on the machine holds the default ones
               # (even with the dashboard off, a minimal dashboard head binds its port)
               f"--dashboard-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180,
                              check=False)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {(done.stdout + done.stderr)[-2000:]}")
        return self

    def stop(self, timeout: float = 10) -> None:
        stop_head(self.temp_dir, timeout)


def monitor(address: str, out: str, interval: float) -> None:
    """Append `time used_bytes fallback_bytes spilled_bytes_total capacity_bytes` lines to `out`
    every `interval` s: the cluster's object store stats, as `ray memory --stats-only` reads
    them (the raylet's FormatGlobalMemoryInfo, aggregated over nodes)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(address)
    node = next(n for n in state.node_table() if n["Alive"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(out, "a") as f:
        while True:
            t = time.time()
            try:
                s = get_memory_info_reply(state, node["NodeManagerAddress"],
                                          node["NodeManagerPort"], timeout_seconds=10).store_stats
                f.write(f"{t:.3f} {s.object_store_bytes_used} {s.object_store_bytes_fallback} "
                        f"{s.spilled_bytes_total} {s.object_store_bytes_avail}\n")
                f.flush()
            except Exception as e:  # a slow reply under load: skip the sample, keep going
                print(f"monitor: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            time.sleep(max(0.0, interval - (time.time() - t)))


class StoreMonitor:
    """The monitor in a process of its own (it talks to the head with the head's token, and
    nothing of Ray is imported into the benchmark's own process)."""

    def __init__(self, head: LocalHead, path: Path, interval: float):
        self.path, self.interval = path, interval
        path.unlink(missing_ok=True)
        self.log = open(path.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scaling", "monitor", "--address", head.address,
             "--out", str(path), "--interval", str(interval)],
            cwd=ROOT, env=head.env, stdout=self.log, stderr=subprocess.STDOUT)

    def samples(self, since: float = 0.0, until: float = float("inf")) -> np.ndarray:
        """(n, 5) array: time, used, fallback, spilled total, capacity."""
        rows = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 5 and since <= float(parts[0]) <= until:
                    rows.append([float(x) for x in parts])
        return np.array(rows).reshape(-1, 5)

    def wait_first(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not len(self.samples()):
            if self.proc.poll() is not None or time.time() > end:
                raise RuntimeError("object store monitor gave no sample: "
                                   + self.path.with_suffix(".log").read_text()[-1000:])
            time.sleep(0.2)

    def settle(self, baseline: float, timeout: float = 20, slack: float = 64 * 2**20) -> float:
        """Wait (at most `timeout` s) until the store is back within `slack` of `baseline`
        bytes: the last job's objects are freed once its driver is gone. Returns the in-store
        bytes now."""
        end = time.time() + timeout
        while True:
            now = self.current()
            if now <= baseline + slack or time.time() > end:
                return now
            time.sleep(self.interval)

    def current(self) -> float:
        """In-store bytes (used + fallback): the median of the last 3 samples after a fresh one."""
        t = time.time()
        end = t + 10 * self.interval + 10
        while not len(self.samples(since=t)) and time.time() < end:
            time.sleep(self.interval / 2)
        s = self.samples()[-3:]
        return float(np.median(s[:, 1] + s[:, 2]))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# -----------------------------------------------------------------------------
# the driver process: one measurement

def child(spec_path: str) -> None:
    """Run one job as the driver, print one JSON line: seconds of the call and peak RSS."""
    import logging

    import ray
    import ray.data

    from xbt_ray.config import (
        EmbedConfig,
        ModelConfig,
        ProjectorConfig,
        Stage1Config,
        TrainerConfig,
    )

    spec = json.loads(Path(spec_path).read_text())

    ray.init(address=spec["address"], log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rss_setup = _rss_kib("VmRSS") / 2**20
    out = {"case": spec["case"], "rows": spec["rows"], "driver_rss_setup_gib": rss_setup}
    if spec["case"] == "embed":
        from xbt_ray.data.embed import embed_shards

        start = time.perf_counter()
        result = embed_shards(spec["files"], "text", ModelConfig(**spec["model"]),
                              spec["cache_root"], EmbedConfig(**spec["embed"]))
        out["seconds"] = time.perf_counter() - start
        assert not result.reused, "the cache root must be fresh"
        out["rows_embedded"] = result.counts["rows_embedded"]
    else:
        from xbt_ray.train.stage1 import train_stage1

        start = time.perf_counter()
        train_stage1(Path(spec["new_dir"]), Path(spec["old_dir"]),
                     ProjectorConfig(**spec["projector"]), Stage1Config(**spec["recipe"]),
                     TrainerConfig(**spec["trainer"]), run_name=spec["run_name"],
                     storage_path=Path(spec["storage_path"]), out_dir=Path(spec["out_dir"]),
                     seed=0)
        out["seconds"] = time.perf_counter() - start
        summary = Path(spec["out_dir"]) / "stage1.json"
        if summary.is_file():
            out["rows_used"] = json.loads(summary.read_text())["data"].get("rows_used")
    # VmHWM: this process image's peak RSS (KiB). ru_maxrss (kept for reference) also holds the
    # high-water mark of the parent that forked this process, so it cannot show the job's own
    out["driver_peak_rss_gib"] = _rss_kib("VmHWM") / 2**20
    out["driver_ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ray.shutdown()
    print(json.dumps(out), flush=True)


def _rss_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def run_driver(spec: dict, head: LocalHead, mon: StoreMonitor, log_dir: Path,
               timeout: float) -> dict:
    """One measurement in a fresh driver process; adds the object store's peak over its run."""
    name = f"{spec['case']}-{spec['rows']}"
    spec_path = log_dir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    before = mon.current()
    spilled = mon.samples()[-1, 3]
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "child", str(spec_path)],
                              cwd=ROOT, env=head.env, stdout=subprocess.PIPE, stderr=log,
                              text=True, timeout=timeout, check=False)
    t1 = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{name} driver failed ({done.returncode}): "
                           + (log_dir / f"{name}.log").read_text()[-3000:])
    got = json.loads(done.stdout.strip().splitlines()[-1])
    time.sleep(2 * mon.interval)  # a sample after the end
    s = mon.samples(t0, time.time())
    if not len(s):
        raise RuntimeError(f"no object store samples during {name}")
    peak = float((s[:, 1] + s[:, 2]).max())
    got |= {"object_store_peak_gib": max(0.0, peak - before) / GIB,
            "object_store_before_gib": before / GIB,
            "object_store_spilled_gib": (float(s[:, 3].max()) - spilled) / GIB,
            "object_store_samples": len(s), "process_wall_s": t1 - t0,
            "seconds_per_row": got["seconds"] / spec["rows"]}
    return got


# -----------------------------------------------------------------------------
# the part

def summarise(rows: list[dict]) -> dict:
    """Growth (largest size over smallest) and the goals; marginal seconds per row between
    consecutive sizes (fixed costs cancel) as a diagnostic."""
    first, last = rows[0], rows[-1]

    def ratio(key):
        return last[key] / first[key] if first[key] else None

    out = {"sizes": rows, "driver_rss_growth": ratio("driver_peak_rss_gib"),
           "seconds_per_row_growth": ratio("seconds_per_row"),
           "object_store_growth": ratio("object_store_peak_gib"),
           "marginal_seconds_per_row": [(b["seconds"] - a["seconds"]) / (b["rows"] - a["rows"])
                                        for a, b in itertools.pairwise(rows)]}
    m = out["marginal_seconds_per_row"]
    out["marginal_seconds_per_row_growth"] = m[-1] / m[0] if len(m) > 1 and m[0] > 0 else None
    out["goals"] = {k: {"value": out[k], "goal": f"<= {v}",
                        "met": None if out[k] is None else out[k] <= v}
                    for k, v in GOALS.items()}
    return out


def bench_scaling(preset, work: Path, model, device: str, cores: int) -> dict:
    """Both cases at sizes N, 4N, 16N on one local Ray head; see the module docstring."""
    from xbt_ray.config import EmbedConfig
    from xbt_ray.data.embed import encoder_threads

    n = preset.scaling_rows
    size_rows = sizes(n, preset.scaling_factor, preset.scaling_sizes)
    per_shard = shard_rows(n)
    n_shards = size_rows[-1] // per_shard
    cases = [c for c in preset.scaling_cases.split(",") if c]
    base = work / "scaling"
    base.mkdir(parents=True, exist_ok=True)
    gpu = device == "cuda"
    embed_cfg = {"batch_size": preset.embed_batch, "num_actors": preset.embed_actors,
                 "actor_num_cpus": preset.actor_cpus, "encoder_threads": preset.encoder_threads}
    batch = max(2, min(preset.scaling_stage1_batch, n // 4) // 2 * 2)
    trainer = {"num_workers": 1 if gpu else 2, "use_gpu": gpu,
               "cpus_per_worker": 1.0 if gpu else 0.5}
    store = int(preset.scaling_object_store_gib * GIB)
    out = {"settings": {
        "sizes": size_rows, "rows_per_shard": per_shard, "head_num_cpus": cores,
        "object_store_capacity_gib": store / GIB, "sample_interval_s": preset.scaling_sample_s,
        "object_store_sampler": "ray._private.internal_api.get_memory_info_reply (raylet "
                                "FormatGlobalMemoryInfo, as `ray memory --stats-only`): "
                                "object_store_bytes_used + object_store_bytes_fallback",
        "embed": {"model": model.name, "modality": "text", **embed_cfg,
                  "actor_threads": encoder_threads(EmbedConfig(**embed_cfg))},
        "stage1": {"new_dim": NEW_DIM, "old_dim": OLD_DIM, "dtype": "float16", "epochs": 1,
                   "batch_size": batch, "projector": {"depth": 1, "width": 512}, **trainer}}}
    inputs = {}
    if "embed" in cases:
        say(f"caption corpus: {n_shards} shards x {per_shard} rows (built once)")
        inputs["embed"] = caption_corpus(base, per_shard, n_shards)
    if "stage1" in cases:
        say(f"bring-your-own caches: {n_shards} parts x {per_shard} rows, {NEW_DIM}/{OLD_DIM}-d "
            "(built once)")
        inputs["stage1"] = byo_caches(base, per_shard, n_shards, size_rows)
    logs = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    out["settings"]["logs"] = str(logs)
    head = LocalHead(cores, store).start()
    say(f"Ray head {head.address}: {cores} CPUs, object store {store / GIB:.1f} GiB")
    mon = StoreMonitor(head, logs / "store.txt", preset.scaling_sample_s)
    try:
        mon.wait_first()
        for case in cases:
            rows = []
            try:
                for size in size_rows:
                    scratch = Path(tempfile.mkdtemp(prefix=f"{case}-{size}-", dir=base))
                    spec = {"case": case, "rows": size, "address": head.address}
                    if case == "embed":
                        spec |= {"files": inputs["embed"][:size // per_shard],
                                 "model": {"name": model.name, "pretrained": model.pretrained},
                                 "embed": embed_cfg, "cache_root": str(scratch)}
                    else:
                        new_dir, old_dir = inputs["stage1"][size]
                        spec |= {"new_dir": str(new_dir), "old_dir": str(old_dir),
                                 "projector": {"depth": 1, "width": 512},
                                 "recipe": {"epochs": 1, "batch_size": batch}, "trainer": trainer,
                                 "run_name": f"scaling-{size}-{time.time_ns()}",
                                 "storage_path": str(scratch / "ray-train"),
                                 "out_dir": str(scratch / "out")}
                    try:
                        got = run_driver(spec, head, mon, logs, preset.scaling_timeout_s)
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
                    rows.append({k: got[k] for k in ("rows", "driver_peak_rss_gib",
                                                     "driver_ru_maxrss_gib",
                                                     "object_store_peak_gib", "seconds_per_row",
                                                     "seconds", "driver_rss_setup_gib",
                                                     "object_store_spilled_gib",
                                                     "object_store_samples", "process_wall_s")})
                    say(f"{case} {size} rows: {got['seconds']:.1f} s "
                        f"({got['seconds_per_row'] * 1e6:.1f} us/row), driver peak RSS "
                        f"{got['driver_peak_rss_gib']:.2f} GiB, object store peak "
                        f"{got['object_store_peak_gib']:.3f} GiB")
                    mon.settle(got["object_store_before_gib"] * GIB)
            except Exception as e:  # keep the other case's measurements (and these sizes')
                out[case] = {"failed": f"{type(e).__name__}: {str(e)[-1500:]}", "sizes": rows}
                say(f"{case} failed: {type(e).__name__}: {str(e)[-300:]}")
                continue
            out[case] = summarise(rows)
            g = out[case]
            say(f"{case}: driver RSS growth {g['driver_rss_growth']:.2f} (goal <= 1.2), seconds "
                f"per row growth {g['seconds_per_row_growth']:.2f} (goal <= 1.3), object store "
                f"growth {g['object_store_growth'] or float('nan'):.2f}")
    finally:
        mon.stop()
        head.stop()
    if all("failed" in out[c] for c in cases):
        raise RuntimeError("; ".join(f"{c}: {out[c]['failed'][-700:]}" for c in cases))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="scaling benchmark helpers (the part itself runs "
                                "from benchmarks.bench: --only scaling)")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("monitor")
    m.add_argument("--address", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--interval", type=float, default=0.5)
    c = sub.add_parser("child")
    c.add_argument("spec")
    args = p.parse_args(argv)
    if args.cmd == "monitor":
        monitor(args.address, args.out, args.interval)
    else:
        child(args.spec)


if __name__ == "__main__":
    main()
