"""Peak RSS of writing a sd15-arch-sized single-file checkpoint (fp16, its real key -> shape map), one way per
process: `old` = atomic_output + safetensors.torch.save_file (the path before), `new` = write_safetensors (the one
writer: save_file then the in-place header sort), `bytes` = safetensors.torch.save -> atomic_write_bytes (a full
second copy in memory: shows the measure sees a copy)."""
import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from sdedge.export import builtin_bases
from sdedge.export.single_file import ldm_key_shapes

way, out = sys.argv[1], Path(sys.argv[2])
with torch.device("meta"):
    unet, vae, te = builtin_bases._build_models(sys.argv[3] if len(sys.argv) > 3 else "sd15-arch", seed=None)
shapes = ldm_key_shapes(unet, vae, te)
state = {k: torch.ones(s, dtype=torch.float16) for k, s in shapes.items()}
nbytes = sum(t.numel() * t.element_size() for t in state.values())
before = psutil.Process().memory_info().rss
meta = {"format": "pt", "writer": "sdedge.export.single_file"}
t0 = time.perf_counter()
if way == "old":
    from safetensors.torch import save_file

    from sdedge.runtime.files import atomic_output
    with atomic_output(out) as tmp:
        save_file(state, str(tmp), metadata=meta)
elif way == "new":
    from safetensors.torch import save_file

    from sdedge.runtime.tensor_files import write_safetensors
    write_safetensors(out, state, meta, save_file)
else:
    from safetensors.torch import save

    from sdedge.runtime.files import atomic_write_bytes
    atomic_write_bytes(out, save(state, metadata=meta))
sec = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"way": way, "tensors": len(state), "tensor_bytes": nbytes, "rss_before_write": before,
                  "peak_rss": peak, "peak_over_before": peak - before, "file_bytes": out.stat().st_size,
                  "write_seconds": round(sec, 2)}))
out.unlink()
