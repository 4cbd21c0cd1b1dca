"""The demo end to end, on a handful of images: data, training, metrics, the picture, the explore page."""

from __future__ import annotations

from PIL import Image

from deformable_detr.demo import DRAWING_SCALE, run_demo


def test_demo_trains_evaluates_and_draws(tmp_path):
    killed_synthesis = tmp_path / "data" / ".drafts-killed"  # what a synthesis killed midway leaves
    killed_synthesis.mkdir(parents=True)
    record = run_demo(tmp_path, epochs=1, train_images=8, val_images=4)
    assert not killed_synthesis.exists()
    assert record["epoch"] == 0 and 0.0 <= record["AP"] <= 1.0
    assert (tmp_path / "train" / "best.pt").is_file()
    assert (tmp_path / "train" / "curves.png").is_file() and (tmp_path / "train" / "report" / "report.md").is_file()
    picture = Image.open(tmp_path / "detections.png")
    # Four images in two rows of two, each enlarged from the 192-pixel images the model sees.
    smallest = min(Image.open(path).size for path in sorted((tmp_path / "data" / "val").iterdir())[:4])
    assert picture.width >= 2 * DRAWING_SCALE * smallest[0] and picture.height >= 2 * DRAWING_SCALE * smallest[1]
    page = (tmp_path / "explore.html").read_text()  # where the model looks in the four images drawn
    assert all(f'"name":"{path.name}"' in page for path in sorted((tmp_path / "data" / "val").iterdir())[:4])
