"""The demo end to end, on a handful of images: data, training, metrics, the picture, the explore page."""

from __future__ import annotations

from PIL import Image

from deformable_detr.demo import run_demo


def test_demo_trains_evaluates_and_draws(tmp_path):
    record = run_demo(tmp_path, epochs=1, train_images=8, val_images=4)
    assert record["epoch"] == 0 and 0.0 <= record["AP"] <= 1.0
    assert (tmp_path / "train" / "best.pt").is_file()
    picture = Image.open(tmp_path / "detections.png")
    assert picture.height >= 100 and picture.width > 3 * picture.height  # four images side by side
    page = (tmp_path / "explore.html").read_text()  # where the model looks in the four images drawn
    assert all(f'"name":"{path.name}"' in page for path in sorted((tmp_path / "data" / "val").iterdir())[:4])
