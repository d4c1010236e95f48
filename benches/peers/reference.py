#!/usr/bin/env python3
"""dlrm-rs against the reference dlrm_s_pytorch.py, the Kaggle configuration, in one session.

Both trainers run the same model (bottom MLP 13-512-256-64-16, 26 tables of the Criteo
Kaggle sizes at d = 16, dot interaction, top MLP 512-256-1), one index per lookup, on
generated data, with the same batch size, optimizer and thread count. Runs are interleaved
(ours, reference, reference, ours, ...) so that both see the same machine state, and the
table gives the median of each and the median of the per-pair ratios.

What is timed: the reference's own `--print-time` figure (ms/it over forward, loss, backward
and optimizer step; its data generation is outside it), and dlrm-rs's steady-state samples/s
from `--report-json` (the whole step; batches are read in place). The reference's first print
interval (warm-up) is dropped, as dlrm-rs drops its warm-up steps.

Needs: `pip install torch numpy scikit-learn`, a checkout of facebookresearch/dlrm (the
reference is not redistributed here), and a release build of dlrm-rs:

    cargo build --release
    python3 benches/peers/reference.py --reference ../dlrm --configs 2048:sgd,2048:adagrad,128:sgd

Extra arguments after `--` go to dlrm-rs only (e.g. `-- --precision bf16`).
Not part of `cargo test`.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

# The Criteo Kaggle tables as the reference's Kaggle preprocessing counts them
# (dlrm-rs's `--preset kaggle` uses the same list: src/config.rs KAGGLE_TABLE_SIZES).
KAGGLE_TABLE_SIZES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
BOTTOM = "13-512-256-64-16"
TOP = "512-256-1"
MS_PER_IT = re.compile(r"([0-9.]+) ms/it")

# The reference passes `use_cuda=` to torch.autograd.profiler.profile, which recent PyTorch
# no longer accepts; this runs it unchanged with that one keyword dropped (it only matters
# with --enable-profiling, which is not used here).
SHIM = """
import runpy, sys, torch.autograd.profiler as prof
_profile = prof.profile
class _Compat(_profile):
    def __init__(self, *args, use_cuda=False, **kwargs):
        super().__init__(*args, **kwargs)
prof.profile = _Compat
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, __import__("os").path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_reference(ref_dir, batch, optimizer, threads, batches):
    print_freq = max(batches // 5, 1)
    cmd = [
        sys.executable, "-c", SHIM, os.path.join(os.path.abspath(ref_dir), "dlrm_s_pytorch.py"),
        "--arch-sparse-feature-size=16",
        f"--arch-mlp-bot={BOTTOM}",
        f"--arch-mlp-top={TOP}",
        "--arch-embedding-size=" + "-".join(map(str, KAGGLE_TABLE_SIZES)),
        "--data-generation=random",
        "--num-indices-per-lookup=1",
        "--num-indices-per-lookup-fixed=True",
        f"--mini-batch-size={batch}",
        f"--num-batches={batches}",
        f"--data-size={batch * batches}",
        "--learning-rate=0.1",
        f"--optimizer={optimizer}",
        "--loss-function=bce",
        "--round-targets=True",
        f"--print-freq={print_freq}",
        "--print-time",
        "--nepochs=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # The reference always writes TensorBoard events into ./run_kaggle_pt: run it in a
    # scratch folder so that nothing is left behind.
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            cmd, env=env, cwd=tmp, capture_output=True, text=True, check=True
        ).stdout
    times = [float(m.group(1)) for m in MS_PER_IT.finditer(out)]
    if len(times) < 2:
        raise RuntimeError(f"no timing lines in the reference's output:\n{out[-2000:]}")
    steady = statistics.median(times[1:])
    return batch / (steady / 1000.0)


def run_ours(binary, batch, optimizer, threads, batches, extra):
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [
            binary, "train", "--preset", "kaggle",
            "--mini-batch-size", str(batch),
            "--num-batches", str(batches),
            "--optimizer", optimizer,
            "--learning-rate", "0.1",
            "--threads", str(threads),
            "--report-json", report,
            *extra,
        ]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        with open(report) as f:
            return json.load(f)["samples_per_sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", default=os.environ.get("DLRM_REFERENCE"),
                   help="checkout of facebookresearch/dlrm (or set DLRM_REFERENCE)")
    p.add_argument("--dlrm", default="target/release/dlrm", help="the dlrm-rs binary")
    p.add_argument("--configs", default="2048:sgd,2048:adagrad,128:sgd",
                   help="batch:optimizer pairs, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3, help="interleaved runs of each trainer")
    p.add_argument("--samples", type=int, default=400_000,
                   help="samples per run (batches = samples / batch, at most 1000)")
    p.add_argument("extra", nargs="*", help="arguments for dlrm-rs only (after --)")
    a = p.parse_args()
    if not a.reference or not os.path.isfile(os.path.join(a.reference, "dlrm_s_pytorch.py")):
        p.error("--reference must name a checkout of facebookresearch/dlrm")
    if not os.path.isfile(a.dlrm):
        p.error(f"{a.dlrm} not found: run `cargo build --release` first")

    print(f"CPU: {cpu_model()}, {a.threads} threads, {a.pairs} interleaved pairs")
    print("| batch | optimizer | dlrm-rs samples/s | reference samples/s | ratio (median of pairs) |")
    print("|---|---|---|---|---|")
    for config in a.configs.split(","):
        batch, optimizer = config.split(":")
        batch = int(batch)
        batches = max(min(a.samples // batch, 1000), 20)
        ours, ref = [], []
        for i in range(a.pairs):
            order = [0, 1] if i % 2 == 0 else [1, 0]
            for who in order:
                if who == 0:
                    ours.append(run_ours(a.dlrm, batch, optimizer, a.threads, batches, a.extra))
                else:
                    ref.append(run_reference(a.reference, batch, optimizer, a.threads, batches))
        ratios = [o / r for o, r in zip(ours, ref)]
        pairs = ", ".join(f"{o:,.0f}/{r:,.0f} = {o / r:.2f}x" for o, r in zip(ours, ref))
        print(f"pairs, batch {batch}, {optimizer}: {pairs}", file=sys.stderr, flush=True)
        print(f"| {batch} | {optimizer} | {statistics.median(ours):,.0f} "
              f"| {statistics.median(ref):,.0f} | {statistics.median(ratios):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
