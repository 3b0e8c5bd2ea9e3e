"""scripts/benchmark_data.py: the ImageNet input pipeline against torchvision's reference recipe
(kdresearch.pipelines.data_benchmark), run on 20 generated JPEGs."""

import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from kdresearch.pipelines.data_benchmark import SIZES, STAGES, Settings, run_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_data  # noqa: E402  (the script: argument parsing only)


def test_benchmark_reports_both_pipelines_their_ratio_and_where_the_time_goes(tmp_path):
    lines = []
    settings = Settings(images=20, folder=tmp_path / "images", workers=1, batch_size=8, repeats=2, profile_images=8,
                        cifar=tmp_path / "no-cifar-here")
    result = run_benchmark(settings, report=lines.append)
    text = "\n".join(lines)
    assert "20 training images of 10 classes (synthetic textures; sizes 500x375" in text
    for name in ("ours", "reference"):
        row = re.search(rf"^\| {name} +\| +(\d+) \| +\d+% \| +([\d.]+) \| +\d+% \|$", text, re.M)
        assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, text
    assert re.search(r"^ratio \(ours / reference images/s, median of adjacent passes\): \d+\.\d\d$", text, re.M)
    assert re.search(r"^CPU ratio \(reference / ours CPU time per image, .*\): \d+\.\d\d$", text, re.M)
    assert len(result.comparison.ours) == len(result.comparison.reference) == 2
    assert result.comparison.ratio > 0 and result.comparison.cpu_ratio > 0
    assert all(result.stages["ours"][stage] > 0 for stage in STAGES)
    assert result.stages["reference"]["normalise"] is None  # the reference normalises each image in "tensor"
    assert re.search(r"^\| normalise +\| +[\d.]+ \| +- \|$", text, re.M)
    train = sorted((tmp_path / "images" / "train").rglob("*.JPEG"))
    assert len(train) == 20 and all(Image.open(path).size in SIZES for path in train)


def test_script_refuses_a_bad_option_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^benchmark_data: --images must be an integer >= 1, got 0$"):
        benchmark_data.main(["--images", "0", "--folder", str(tmp_path)])
