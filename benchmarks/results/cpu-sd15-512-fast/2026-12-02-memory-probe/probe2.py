"""H6: where the int8 fast bundle's peak RSS goes (512², 4 LCM steps). Prints VmRSS/RssAnon/RssFile after each
stage and the peak (VmHWM, reset through /proc/self/clear_refs before each stage)."""
import json, os, sys, time
T0 = time.time()

def status():
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                d[k] = int(v.split()[0]) / 1e6  # GB (kB / 1e6)
    return d

rows = []
def mark(stage):
    s = status(); s["stage"] = stage; s["t"] = round(time.time() - T0, 1); rows.append(s)
    print(f"{stage:34s} rss {s['VmRSS']:.3f}  anon {s['RssAnon']:.3f}  file {s['RssFile']:.3f}  peak-in-stage {s['VmHWM']:.3f}  t {s['t']}", flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the next mark's peak is that stage's

bundle_dir = sys.argv[1]
mark("start")
from sdedge.runtime.signing import open_bundle
from sdedge.runtime.pipeline import Pipeline
import sdedge.runtime.backends.openvino as ovb
mark("import sdedge.runtime")
bundle, _ = open_bundle(bundle_dir, "if-signed")
mark("open_bundle (signature/manifest)")
from sdedge.runtime.manifest import Precision
if os.environ.get("TRIM") != "1":
    ovb.release_freed_memory = lambda: None
if os.environ.get("TEFP16") != "1":  # the rule before the change
    ovb._float_onnx = lambda info, m: (info.precision or m.precision) in (Precision.FP32, Precision.BF16)
def trim():
    pass
pipe = Pipeline(bundle, threads=2, prepare=False)
mark("Pipeline(prepare=False)")
print("fp16", {n: e.fp16_weights for n, e in pipe.engines.items()})
if os.environ.get("ORDER") == "unet-first":
    pipe.engines = {k: pipe.engines[k] for k in ("unet", *[n for n in pipe.engines if n != "unet"])}
print("variant", {k: os.environ.get(k) for k in ("TRIM", "TEFP16", "ORDER")}, flush=True)
for name, e in pipe.engines.items():
    orig = e.prepare
    def wrapped(shapes, _orig=orig, _name=name, _e=e):
        _orig(shapes)
        trim()
        mark(f"prepare {_name} (hits {_e.cache_hits}, compiles {_e.compiles})")
    e.prepare = wrapped
pipe.prepare()
for i in range(2):
    r = pipe.generate("a photo of a cat", seed=i, width=512, height=512)
    mark(f"generate {i} (512², defaults)")
print(json.dumps(rows))
