"""Stand-in for NVIDIA's `trtexec` in tests: banner per TensorRT version, engine build, timed run.

The tests copy it onto PATH as `trtexec` with this interpreter as its shebang. It refuses the flags the emulated
version does not have (the way trtexec answers `Unknown option`), writes a recorded --exportTimes file and prints
log lines in trtexec's format. Environment:
FAKE_TRTEXEC_VERSION  packed version of the banner: 8502 (8.5.2), 100300 (10.3.0), 110000 (11.0.0); default 100300
FAKE_TRTEXEC_TIMES    recorded --exportTimes file; its first --iterations records are written
FAKE_TRTEXEC_ARGS     file to which each invocation's arguments are appended as one JSON line
FAKE_TRTEXEC_FAIL     "build" or "run": fail that step the way trtexec does
FAKE_TRTEXEC_QUIET    set: leave out the "Starting inference" log line
"""

import json
import os
import sys
import time
from datetime import datetime

args = sys.argv[1:]
packed = int(os.environ.get("FAKE_TRTEXEC_VERSION", "100300"))
major = packed // 10000 if packed >= 100000 else packed // 1000
banner = f"TensorRT.trtexec [TensorRT v{packed}] # trtexec {' '.join(args)}"
if os.environ.get("FAKE_TRTEXEC_ARGS"):
    with open(os.environ["FAKE_TRTEXEC_ARGS"], "a") as f:
        f.write(json.dumps(args) + "\n")


def log(level, text):
    print(f"[{datetime.now():%m/%d/%Y-%H:%M:%S}] [{level}] {text}", flush=True)


def fail(text):
    log("E", text)
    print(f"&&&& FAILED {banner}", flush=True)
    sys.exit(1)


print(f"&&&& RUNNING {banner}", flush=True)
removed = {"--explicitBatch", "--workspace", "--minTiming"} if major >= 10 else {"--stronglyTyped"}
if major >= 11:
    removed |= {"--int8", "--fp16", "--bf16", "--best", "--calib", "--stronglyTyped"}
if "--help" in args:
    print("=== Build Options ===")
    for flag in ("--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--memPoolSize", "--int8",
                 "--fp16", "--stronglyTyped", "--workspace", "--explicitBatch", "--calib"):
        if flag not in removed:
            print(f"  {flag}")
    print("=== Inference Options ===\n  --loadEngine  --shapes  --loadInputs  --iterations  --warmUp  --duration")
    print("=== Reporting Options ===\n  --exportTimes")
    sys.exit(0)
opts, flags = {}, set()
for a in args:
    name, eq, value = a.partition("=")
    if name.split(":")[0] in removed:
        log("E", f"Unknown option: {name} {value}")
        print(f"&&&& FAILED {banner}", flush=True)
        sys.exit(1)
    if eq:
        opts[name[2:]] = value
    else:
        flags.add(name[2:])
log("I", "=== Model Options ===")
log("I", f"TensorRT version: {major}.{packed // 100 % (100 if packed >= 100000 else 10)}.{packed % 100}")

if "onnx" in opts:  # engine build
    if not os.path.isfile(opts["onnx"]):
        fail(f"Failed to open {opts['onnx']}")
    if os.environ.get("FAKE_TRTEXEC_FAIL") == "build":
        fail("Error[4]: [network.cpp::validate::3146] Error Code 4: Internal Error (network has dynamic or shape "
             "inputs, but no optimization profile has been defined.)")
    time.sleep(0.02)
    with open(opts["saveEngine"], "wb") as f:
        f.write(b"fake serialized engine")
    log("I", "Engine built in 0.02 sec.")
    print(f"&&&& PASSED {banner}", flush=True)
    sys.exit(0)

if not os.path.isfile(opts.get("loadEngine", "")):
    fail(f"Error opening engine file: {opts.get('loadEngine')}")
time.sleep(0.05)  # deserialization
log("I", "Engine loaded in 0.05 sec.")
for spec in filter(None, opts.get("loadInputs", "").split(",")):
    name, _, path = spec.rpartition(":")
    if not os.path.isfile(path):
        fail(f"Cannot open input file {path} for {name}")
    log("I", f"Using values loaded from {path} for input {name}")
if os.environ.get("FAKE_TRTEXEC_FAIL") == "run":
    fail("Error[1]: [defaultAllocator.cpp::allocate::20] Error Code 1: Cuda Runtime (out of memory)")
if not os.environ.get("FAKE_TRTEXEC_QUIET"):
    log("I", "Starting inference")
with open(os.environ["FAKE_TRTEXEC_TIMES"]) as f:
    records = json.load(f)[: int(opts.get("iterations", "10"))]
time.sleep(max(r["endD2hMs"] for r in records) / 1000 + 0.01)  # the timed iterations
with open(opts["exportTimes"], "w") as f:
    f.write("[\n")
    for i, r in enumerate(records):
        f.write(("  { " if i == 0 else ", { ") + ", ".join(f'"{k}" : {v:.6g}' for k, v in r.items()) + " }\n")
    f.write("]\n")
latency = sorted(r["latencyMs"] for r in records)
log("I", "=== Performance summary ===")
log("I", f"Throughput: {1000 * len(records) / max(r['endD2hMs'] for r in records):.1f} qps")
median = latency[len(latency) // 2]
log("I", f"Latency: min = {latency[0]:.5g} ms, max = {latency[-1]:.5g} ms, median = {median:.5g} ms")
print(f"&&&& PASSED {banner}", flush=True)
