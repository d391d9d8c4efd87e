"""The prep workers' malloc settings: accepted by glibc (Linux, as CI), and pages are then reused."""
import platform
import subprocess
import sys

from data_prep.memory import keep_freed_memory

# Prepare the same photo-sized JPEG many times, as a worker does, and count the minor page
# faults of the last rounds. In a fresh process, so the settings do not leak into the session.
_CHURN = """
import io, resource, sys
import numpy as np
from PIL import Image
from data_prep.images import process_image
from data_prep.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
buf = io.BytesIO()
Image.fromarray(noise).save(buf, "JPEG", quality=90)
for _ in range(10):
    process_image(buf.getvalue(), size=256)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    process_image(buf.getvalue(), size=256)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True,
                                 check=True).stdout)
        for mode in ("keep", "default")
    }
    # By default glibc returns freed megabytes to the kernel and faults them in again
    # (seen: ~140 faults an image in process_image alone, ~600 in a whole prep worker); kept, the same pages serve every round (seen: 2-4).
    assert faults["keep"] < 50 * 10
    assert faults["keep"] * 10 < faults["default"]


def test_reports_whether_it_applied():
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
