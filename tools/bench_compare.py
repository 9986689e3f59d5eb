#!/usr/bin/env python3
"""Runs `ip2p bench` and ../shared/bench/bench_diffusers.py back to back on this machine and
prints ours/theirs for each figure (lower is better; the target is <= 0.8).

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch diffusers transformers
    cargo build --release
    python3 tools/bench_compare.py --python /tmp/ref/bin/python --res 256 512 --reps 3
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
            print("  ", line, file=sys.stderr, flush=True)
    return rows


def key(r):
    return (r["component"], r.get("res"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=sys.executable, help="a Python with torch + diffusers")
    ap.add_argument("--ip2p", default=os.path.join(ROOT, "target/release/ip2p"))
    ap.add_argument("--shared", default=os.path.join(ROOT, "../shared"))
    ap.add_argument("--res", nargs="+", default=["256", "512"])
    ap.add_argument("--reps", default="3")
    ap.add_argument("--only", default="text,unet,vae")
    ap.add_argument("--edit-res", nargs="*", default=["256"],
                    help="whole edits (--edit-steps steps) timed on both sides")
    ap.add_argument("--edit-steps", default="20")
    ap.add_argument("--rss-res", nargs="*", default=["512"],
                    help="peak RSS of a whole edit, each in a fresh process on both sides")
    ap.add_argument("--rss-steps", default="2",
                    help="steps of the RSS edits (the peak does not depend on the count)")
    a = ap.parse_args()
    ours = run([a.ip2p, "bench", "--shapes", os.path.join(a.shared, "fixtures/sd15-shapes"),
                "--res", *a.res, "--reps", a.reps, "--only", a.only])
    theirs = run([a.python, os.path.join(a.shared, "bench/bench_diffusers.py"),
                  "--res", *map(str, a.res), "--reps", a.reps, "--only", a.only])
    host = [r for r in ours if r["component"] == "host"]
    if host:
        h = host[0]
        print(f"host: {h['cpu']} ({h['vendor']} family {h['family']} model {h['model']}), "
              f"{h['cpus']} CPUs, L2 {h['l2'] >> 10} KiB, features {' '.join(h['features'])}; "
              f"sgemm {h['sgemm_kernel']} {h['sgemm_blocks']}")
    t = {key(r): r["s"] for r in theirs if "s" in r}
    print(f"{'figure':28} {'res':>5} {'ours s':>9} {'diffusers s':>12} {'ours/theirs':>12}")
    for r in ours:
        if "s" not in r:
            continue
        k = key(r)
        if k in t:
            print(f"{k[0]:28} {str(k[1] or ''):>5} {r['s']:9.3f} {t[k]:12.3f} {r['s'] / t[k]:12.2f}")
    if "gemm" in a.only.split(","):
        g = run([a.ip2p, "bench", "--only", "gemm", "--reps", a.reps])
        mkl = run([a.python, os.path.join(ROOT, "tools/bench_mkl_gemm.py"), "--reps", a.reps])
        mkl = {r["n"]: r["gflops"] for r in mkl if r["m"] == r["n"] == r["k"]}
        for r in g:
            if r["component"] in ("sgemm", "sgemm_prepacked") and r["n"] in mkl:
                print(f"{r['component'] + ' GFLOP/s':28} {r['n']:>5} {r['gflops']:9.1f} "
                      f"{mkl[r['n']]:12.1f} {r['gflops'] / mkl[r['n']]:12.2f}  (MKL via torch)")
    rss = [r for r in ours if r["component"] == "peak_rss"]
    if rss:
        print(f"peak RSS (ours, whole run): {rss[0]['bytes'] / 2**30:.2f} GiB")
    edit_py = os.path.join(ROOT, "tools/bench_diffusers_edit.py")
    for res in a.edit_res:
        o = run([a.ip2p, "bench", "--shapes", os.path.join(a.shared, "fixtures/sd15-shapes"),
                 "--only", "edit", "--res", res, "--steps", a.edit_steps, "--reps", "1"])
        t = run([a.python, edit_py, "--shared", a.shared, "--res", res, "--steps", a.edit_steps])
        o = [r for r in o if r["component"] == "edit"][0]
        t = [r for r in t if r["component"] == "edit"][0]
        print(f"{'edit, ' + a.edit_steps + ' steps':28} {res:>5} {o['s']:9.3f} {t['s']:12.3f} "
              f"{o['s'] / t['s']:12.2f}")
    for res in a.rss_res:
        o = run([a.ip2p, "bench", "--shapes", os.path.join(a.shared, "fixtures/sd15-shapes"),
                 "--only", "edit", "--res", res, "--steps", a.rss_steps, "--reps", "1"])
        t = run([a.python, edit_py, "--shared", a.shared, "--res", res, "--steps", a.rss_steps])
        o = [r for r in o if r["component"] == "edit"][0]["peak_rss_bytes"]
        t = [r for r in t if r["component"] == "edit"][0]["peak_rss_bytes"]
        print(f"{'edit peak RSS GiB':28} {res:>5} {o / 2**30:9.2f} {t / 2**30:12.2f} {o / t:12.2f}")


if __name__ == "__main__":
    main()
