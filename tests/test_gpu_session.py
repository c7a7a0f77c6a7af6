"""scripts/gpu_session.sh, the one device call a session with a GPU makes, works end to end:
here its --smoke mode runs every step of part 1 with tiny shapes on CPU."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_part_1_smoke_brings_back_a_summary_and_one_archive(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "1", "--smoke"], env=env,
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    # The device tool returns at most 8 files: everything else travels in the archive.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_part1.tgz", "summary.txt"]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("   exit 0 ") == 3, summary
    with tarfile.open(tmp_path / "gpu_part1.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        assert {"decode_tp4.json", "decode_tp8.json", "decode_tp4_profile.json",
                "decode_tp4_profile.trace.json.gz", "gpu_tests.log"} <= names
        profile = json.load(tar.extractfile("./decode_tp4_profile.json"))
    assert profile["busy_us"] > 0
