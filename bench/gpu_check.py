"""One-GPU readiness: CUDA, the LoRA steps (1B, 8B-shaped), a QLoRA NF4 step and packed attention, one table.

    bash scripts/gpu-check.sh [--out DIR] [--only lora-1b,qlora-nf4]   # wheels, PYTHONPATH, then this
Each check runs in its own process; any failure (no CUDA, bitsandbytes, a NaN loss, packed != unpacked)
exits non-zero and says what broke. Writes gpu-check.json, gpu-check.md and gpu-check.log to OUT_DIR."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
EXIT_FAILED, EXIT_NO_CUDA = 1, 2
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "flash_attn")

# name, script, arguments, what the row is
LORA_CHECKS = [
    ("lora-1b", "gpu_lora_llama.py", ["--shape", "1b"], "LoRA r16 all-linear, Llama-3.2-1B shape, bf16"),
    ("lora-8b-shaped", "gpu_lora_llama.py", ["--shape", "8b", "--layers", "8"],
     "LoRA r16 all-linear, Llama-3-8B layer shapes, 8 of 32 layers, bf16"),
    ("qlora-nf4", "gpu_lora_llama.py", ["--shape", "1b", "--method", "QLoRA"],
     "QLoRA: 1B shape loaded 4-bit NF4 by modeling.load_model, LoRA r16"),
]
PACKED_CHECKS = [
    ("packed-sdpa", "gpu_packed_attention.py", ["--attn", "sdpa"], "packed row vs each sequence alone, sdpa"),
    ("packed-flash-varlen", "gpu_packed_attention.py", ["--attn", "flash_attention_2"],
     "packed row vs each sequence alone, flash-attn varlen"),
]
CHECKS = LORA_CHECKS + PACKED_CHECKS


def probe() -> dict:
    """What this Python sees: versions, and whether CUDA works (run in a child: `gpu_check.py --probe`)."""
    import importlib.metadata
    import platform

    import torch

    found = {"python": platform.python_version(), "torch_cuda": torch.version.cuda, "packages": {}}
    for name in PACKAGES:
        try:
            found["packages"][name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found["packages"][name] = None
    found["cuda"] = torch.cuda.is_available()
    if found["cuda"]:
        device = torch.device("cuda", 0)
        x = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
        found["matmul_finite"] = bool(torch.isfinite(x @ x).all())
        torch.cuda.synchronize(device)
        found["device"] = torch.cuda.get_device_name(device)
        found["capability"] = list(torch.cuda.get_device_capability(device))
        found["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        found["bf16"] = torch.cuda.is_bf16_supported()
    return found


def run_probe(timeout: float) -> dict:
    """The probe in a child process, so that this one never holds a CUDA context while the checks run."""
    try:
        done = subprocess.run([sys.executable, __file__, "--probe"], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:  # a hung driver or device
        return {"cuda": False, "error": f"no answer within {timeout:g} s", "packages": {}}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return {"cuda": False, "error": lines[-1], "packages": {}}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_failure(probe: dict) -> str | None:
    """Why the GPU checks cannot run here, or None."""
    if "error" in probe:
        return f"no CUDA: the probe of torch failed: {probe['error']}"
    if not probe["cuda"]:
        build = f"built for CUDA {probe['torch_cuda']}" if probe["torch_cuda"] else "a CPU-only build"
        return f"no CUDA: torch {probe['packages'].get('torch')} ({build}) sees no GPU; this check needs one NVIDIA GPU"
    if not probe.get("matmul_finite"):
        return f"CUDA: a bf16 matmul on {probe['device']} gave non-finite values"
    if not probe.get("bf16"):
        return f"CUDA: {probe['device']} has no bf16 (the steps measured here are bf16)"
    return None


def run_check(name: str, script: str, args: list[str], *, workdir: Path, log, timeout: float) -> dict:
    """One check in its own process: its JSON result, or its failure (the last error line of its output)."""
    result_file = workdir / f"{name}.json"
    command = [sys.executable, str(BENCH / script), *args, "--json", str(result_file)]
    started = time.perf_counter()
    log.write(f"\n===== {name}: {' '.join(command)}\n")
    log.flush()
    try:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = None
    seconds = round(time.perf_counter() - started, 1)
    log.flush()
    if code == 0 and result_file.exists():
        return {"status": "ok", "seconds": seconds, "result": json.loads(result_file.read_text())}
    reason = f"timed out after {timeout:g} s" if code is None else f"exit {code}: {last_error(log.name, name)}"
    return {"status": "FAILED", "seconds": seconds, "reason": reason}


def last_error(log_path: str, name: str) -> str:
    """The most telling line of a check's output: its FAILED line, else the last exception line."""
    text = Path(log_path).read_text(errors="replace")
    lines = [line.strip() for line in text[text.rfind(f"===== {name}:"):].splitlines()[1:] if line.strip()]
    for line in reversed(lines):
        if "FAILED:" in line:
            return line.split("FAILED:", 1)[1].strip()
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line
    return lines[-1] if lines else "no output"


def flash_attn_row(probe: dict) -> dict | None:
    """flash-attn is optional: absent, its row says so (not a failure); installed, it must work."""
    if probe["packages"].get("flash_attn") or importlib.util.find_spec("flash_attn") is not None:
        return None
    return {"status": "absent", "reason": "flash-attn is not installed; the trainer uses transformers' default, "
            "sdpa (checked above)"}


def run_all(checks: list, probe: dict, *, workdir: Path, log_path: Path, timeout: float, cpu_smoke: bool) -> dict:
    rows = {}
    with log_path.open("a") as log:
        for name, script, args, _ in checks:
            absent = flash_attn_row(probe) if name == "packed-flash-varlen" else None
            args = [*args, "--cpu-smoke"] if cpu_smoke else args
            rows[name] = absent or run_check(name, script, args, workdir=workdir, log=log, timeout=timeout)
    return rows


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def count(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e8 else f"{value / 1e6:.1f}M"


def table_row(name: str, what: str, row: dict) -> list[str]:
    """check | status | what | tokens/s | ms/step | MFU | HFU | peak GiB | last loss | detail"""
    r = row.get("result", {})
    if row["status"] != "ok":
        return [name, row["status"], what, "", "", "", "", "", "", row["reason"]]
    if "tokens_per_second" in r:
        detail = (f"{r['shape']}: {count(r['params'])} params, {count(r['trainable_params'])} trainable, "
                  f"rows of {r['seq']} tokens, {r['timed_steps']} timed steps, {r['attn_implementation']}")
        if r["quantized_layers"]:
            detail += f", {r['quantized_layers']} Linear4bit layers"
        return [name, "ok", what, fmt(r["tokens_per_second"], ",.0f"), fmt(r["seconds_per_step"] * 1000, ".0f"),
                pct(r["mfu"]), pct(r["hfu"]), fmt(r["peak_memory_gib"], ".1f"), fmt(r["losses"][-1], ".3f"), detail]
    if "max_error" in r:
        detail = (f"max relative logit error {r['max_error']:.1e} (tolerance {r['tolerance']:g}); control "
                  f"without position ids {r['control_min_error']:.2f}; {r['dtype']}")
        return [name, "ok", what, "", "", "", "", "", fmt(r["packed_loss"], ".3f"), detail]
    return [name, "ok", what, "", "", "", "", "", "", r.get("detail", "")]


HEADER = ["check", "status", "what", "tokens/s", "ms/step", "MFU (4N)", "HFU", "peak GiB", "last loss", "detail"]


def markdown(report: dict) -> str:
    probe = report["probe"]
    packages = ", ".join(f"{name} {version or 'absent'}" for name, version in probe.get("packages", {}).items())
    lines = [f"GPU check: {probe.get('device', 'no CUDA device')}"
             + (f" (sm_{''.join(map(str, probe['capability']))}, {probe['memory_gib']} GiB)" if probe.get("cuda")
                else ""),
             f"Python {probe.get('python', '?')}, CUDA {probe.get('torch_cuda')}; {packages}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    whats = {name: what for name, _, _, what in CHECKS}
    whats["cuda"] = "torch sees the GPU, a bf16 matmul on it is finite"
    for name, row in report["rows"].items():
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in table_row(name, whats[name], row)) + " |")
    lines += ["", f"{report['verdict']} in {report['seconds']:.0f} s. MFU counts 4·N FLOPs per token (frozen-base "
              "LoRA, N = matmul parameters); HFU 6·N (gradient checkpointing recomputes the forward)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="where the table and log go")
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one check may take")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU needed: each check's small CPU shape, for the mechanics (proves nothing of CUDA)")
    parser.add_argument("--probe", action="store_true", help="print what this Python sees as JSON, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "gpu-check.log"
    log_path.write_text("")
    wanted = set(args.only.split(",")) if args.only else {name for name, *_ in CHECKS}
    unknown = wanted - {name for name, *_ in CHECKS}
    if unknown:
        print(f"gpu-check: unknown check(s) in --only: {', '.join(sorted(unknown))}", file=sys.stderr)
        return EXIT_FAILED
    seen = run_probe(timeout=args.timeout)
    no_cuda = None if args.cpu_smoke else cuda_failure(seen)
    rows = {"cuda": {"status": "FAILED", "reason": no_cuda} if no_cuda else {"status": "ok", "result": {}}}
    if args.cpu_smoke:  # said in the table, so that a smoke run never reads as a GPU check
        rows["cuda"] = {"status": "not run", "reason": "--cpu-smoke: CPU shapes, the mechanics only"}
    if not no_cuda:
        checks = [check for check in CHECKS if check[0] in wanted]
        with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as workdir:
            rows |= run_all(checks, seen, workdir=Path(workdir), log_path=log_path, timeout=args.timeout,
                            cpu_smoke=args.cpu_smoke)
    failed = {name: row["reason"] for name, row in rows.items() if row["status"] == "FAILED"}
    report = {"probe": seen, "rows": rows, "failed": failed, "seconds": time.perf_counter() - started,
              "verdict": f"FAILED ({', '.join(failed)})" if failed else "all checks passed"}
    text = markdown(report)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu-check.md").write_text(text)
    print(text)
    for name, reason in failed.items():
        print(f"gpu-check: FAILED: {name}: {reason}", file=sys.stderr)
    if failed:
        print(f"gpu-check: the checks' output is in {log_path}", file=sys.stderr)
    return EXIT_NO_CUDA if no_cuda else EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
