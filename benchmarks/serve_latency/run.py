"""Latency (p50/p99) and throughput of `mtk serve` under 1, 8 and 64 concurrent loopback clients.

    .venv/bin/python benchmarks/serve_latency/run.py [--seconds 6]

Serves, one at a time, the undefended MNIST LeNet5 target, one MISLEADER member (lenet5) and the three-member
ensemble (needs runs/targets/mnist-lenet5 and runs/defenses/mnist-misleader: mtk defend specs/mnist-misleader.json),
each as its own `mtk serve` process with an API key (the SQLite budget check is part of every request). Each client
holds one keep-alive connection and sends one 32x32 image per request, back to back; all clients share one asyncio
event loop. Writes results/serve_latency.{json,md};
target: the ensemble's p50 at most 1.5x the member's at every load.
"""

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
MTK = str(ROOT / ".venv" / "bin" / "mtk")
VICTIMS = [("undefended target", "runs/targets/mnist-lenet5"),
           ("one member (lenet5)", "runs/defenses/mnist-misleader/members/lenet5"),
           ("MISLEADER ensemble (3 members)", "runs/defenses/mnist-misleader")]
LEVELS = (1, 8, 64)


async def _client(host, port, request, stop, latencies):
    """One keep-alive HTTP/1.1 connection sending the same request back to back (a minimal client: a general
    one such as httpx costs more CPU per request than the server at high concurrency on 2 cores)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop:
            t = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
            assert b" 200 " in status, status
    finally:
        writer.close()


async def load(url, key, clients, seconds, image):
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"inputs": image}).encode()
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    latencies, stop = [], time.monotonic() + seconds
    start = time.monotonic()
    await asyncio.gather(*(_client(host, int(port), request, stop, latencies) for _ in range(clients)))
    elapsed = time.monotonic() - start
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "throughput_rps": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main():
    import httpx
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    image = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32).tolist()
    rows, port = [], 8731
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "keys.sqlite")
        key = subprocess.run([MTK, "keys", "add", "--budget", str(10**12), "--db", db], check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout.strip()
        for label, folder in VICTIMS:
            if not (ROOT / folder / "card.json").exists():
                sys.exit(f"{folder}: not built (mtk defend specs/mnist-misleader.json)")
            port += 1
            server = subprocess.Popen([MTK, "serve", folder, "--port", str(port), "--keys", db], cwd=ROOT)
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(300):
                    try:
                        if httpx.get(url + "/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                asyncio.run(load(url, key, 4, 1.0, image))  # warm-up
                for clients in LEVELS:
                    row = {"victim": label, "folder": folder, **asyncio.run(load(url, key, clients, args.seconds,
                                                                                  image))}
                    rows.append(row)
                    print(f"{label}: {clients} clients, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                          f"{row['throughput_rps']:.0f} req/s", flush=True)
            finally:
                server.terminate()
                server.wait(10)
    member = {r["clients"]: r for r in rows if r["folder"].endswith("members/lenet5")}
    ensemble = {r["clients"]: r for r in rows if r["folder"] == VICTIMS[2][1]}
    ratios = {c: ensemble[c]["p50_ms"] / member[c]["p50_ms"] for c in LEVELS}
    command = "python benchmarks/serve_latency/run.py" + (f" --seconds {args.seconds:g}" if args.seconds != 6 else "")
    record = {"command": command, "rows": rows, "ensemble_over_member_p50": ratios,
              "target_met": all(r <= 1.5 for r in ratios.values())}
    out = ROOT / "results" / "serve_latency"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# mtk serve: latency and throughput on loopback", "",
             f"Produced by `{command}` on this 2-core CPU (server and clients share it). One image per request, "
             "API key checked and charged on every request, dynamic batching (max 256 rows, 5 ms wait).", "",
             "| victim | clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['victim']} | {r['clients']} | {r['requests']} | {r['throughput_rps']:.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines += ["", "Ensemble p50 / member p50: " + ", ".join(f"{c} clients {ratios[c]:.2f}x" for c in LEVELS)
              + (" — target (<= 1.5x at every load) met." if record["target_met"] else
                 " — target (<= 1.5x at every load) NOT met.")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
