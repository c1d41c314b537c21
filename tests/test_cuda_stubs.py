"""torchvision/torchaudio/torchcodec must load next to the CPU-only torch of this venv.

With CUDA-only builds of those packages this relies on scripts/cuda_stubs.py having been run;
a fresh interpreter is used so the result reflects what Ray workers and vLLM children see.
"""

import subprocess
import sys

CHECK = """
import torch, torchvision, torchaudio, torchcodec
boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], dtype=torch.float)
keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
print(keep.tolist())
"""


def test_vision_audio_codec_load_and_nms_computes_on_cpu():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    hint = "run `.venv/bin/python scripts/cuda_stubs.py` if these are CUDA-only builds"
    assert proc.returncode == 0, f"{hint}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip().splitlines()[-1] == "[0, 2]"
