"""The evaluation report and the training curves, on constructed detections: per-class metrics against
pycocotools, each error in its bin with the AP its fix gives, the confusion matrix's counts, the
files and their links, class names escaped."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from deformable_detr.cli import main
from deformable_detr.data import SYNTHETIC_CLASSES, synthesize
from deformable_detr.data.coco import coco_index
from deformable_detr.evaluation import CocoEvaluator, results_index
from deformable_detr.report import curves, document, write_report, write_training_curves
from deformable_detr.report.confusion import confusion_matrix
from deformable_detr.report.document import escape
from deformable_detr.report.errors import ERROR_KINDS, TRUE_POSITIVE, error_breakdown
from deformable_detr.report.figures import LabelledBox, confusion_figure, image_errors_figure
from deformable_detr.report.per_class import PER_CLASS_AP, per_class_metrics
from deformable_detr.train import TrainConfig, loop, train

# Two classes; class 3 has no object (its detections are COCO's to ignore: no AP to score).
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "unseen"}]


def _object(number, image_id, category, box, crowd=0):
    return {"id": number, "image_id": image_id, "category_id": category, "bbox": box, "area": box[2] * box[3],
            "iscrowd": crowd}


def _detection(image_id, category, box, score):
    return {"image_id": image_id, "category_id": category, "bbox": box, "score": score}


# One image, one error of each kind, each one ranked above a true positive of its class, so that each
# costs AP50; the objects, by name:
OBJECTS = {
    "A": _object(1, 1, 1, [10, 10, 40, 40]),    # found, and found again (a duplicate)
    "B": _object(2, 1, 2, [100, 10, 40, 40]),   # boxed right, called a circle (classification)
    "C": _object(3, 1, 1, [10, 100, 40, 40]),   # boxed 25 px off (localisation)
    "D": _object(4, 1, 2, [100, 100, 40, 40]),  # a circle 25 px off (both), so missed
    "E": _object(5, 1, 2, [200, 200, 30, 30]),  # nothing near it (missed)
    "F": _object(6, 1, 1, [200, 10, 40, 40]),   # found, late
    "G": _object(7, 1, 2, [200, 100, 40, 40]),  # found, late
    "H": _object(8, 1, 1, [10, 200, 60, 60], crowd=1),  # a crowd: its detection is ignored
}
DETECTIONS = {
    "background": _detection(1, 1, [150, 250, 30, 30], 0.95),
    "true A": _detection(1, 1, [10, 10, 40, 40], 0.9),
    "duplicate": _detection(1, 1, [12, 10, 40, 40], 0.8),
    "classification": _detection(1, 1, [100, 10, 40, 40], 0.7),
    "localisation": _detection(1, 1, [35, 100, 40, 40], 0.6),
    "both": _detection(1, 1, [125, 100, 40, 40], 0.5),
    "true F": _detection(1, 1, [200, 10, 40, 40], 0.3),
    "true G": _detection(1, 2, [200, 100, 40, 40], 0.3),
    "on the crowd": _detection(1, 1, [15, 205, 30, 30], 0.4),
    "no class": _detection(1, 9, [10, 10, 40, 40], 0.99),  # an id the data does not name: COCO ignores it
}


def _ground_truth(objects=None):
    objects = OBJECTS.values() if objects is None else objects
    images = [{"id": 1, "width": 320, "height": 320, "file_name": "1.png"}]
    return coco_index({"images": images, "categories": CATEGORIES, "annotations": [dict(o) for o in objects]})


def _ap50(truth, detections):
    """AP50 by pycocotools itself: the reference the breakdown's gains are checked against."""
    evaluation = COCOeval(truth, results_index(truth, detections), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[1]


def test_each_error_lands_in_its_bin_and_gains_what_its_fix_gives():
    truth = _ground_truth()
    detections = results_index(truth, list(DETECTIONS.values()))
    breakdown = error_breakdown(truth, detections, [1])

    kinds = {name: breakdown.detection_kinds.get(number) for number, name in enumerate(DETECTIONS, start=1)}
    assert kinds == {"background": "background", "true A": TRUE_POSITIVE, "duplicate": "duplicate",
                     "classification": "classification", "localisation": "localisation", "both": "both",
                     "true F": TRUE_POSITIVE, "true G": TRUE_POSITIVE, "on the crowd": None, "no class": None}
    assert breakdown.missed == {OBJECTS["D"]["id"], OBJECTS["E"]["id"]}
    assert breakdown.counts == {kind: 2 if kind == "missed" else 1 for kind in ERROR_KINDS}

    original = list(DETECTIONS.values())
    assert breakdown.ap50 == pytest.approx(_ap50(truth, original), abs=1e-12)
    without = {name: [d for key, d in DETECTIONS.items() if key != name] for name in DETECTIONS}
    fixed = {
        "classification": [*without["classification"], {**DETECTIONS["classification"], "category_id": 2}],
        "localisation": [*without["localisation"], {**DETECTIONS["localisation"], "bbox": OBJECTS["C"]["bbox"]}],
        "both": without["both"], "duplicate": without["duplicate"], "background": without["background"],
    }
    for kind, corrected in fixed.items():
        expected = _ap50(truth, corrected) - _ap50(truth, original)
        assert expected > 1e-3, kind  # the set is built so that every error costs AP
        assert breakdown.ap_gains[kind] == pytest.approx(expected, abs=1e-12), kind
    found_only = _ground_truth(o for name, o in OBJECTS.items() if name not in "DE")
    expected = _ap50(found_only, original) - _ap50(truth, original)
    assert expected > 1e-3 and breakdown.ap_gains["missed"] == pytest.approx(expected, abs=1e-12)


def test_a_fix_onto_an_object_found_already_drops_the_detection():
    truth = _ground_truth()
    # A second classification error on B, lower: once the first takes B, it is a duplicate to drop.
    second = _detection(1, 1, [101, 10, 40, 40], 0.65)
    detections = results_index(truth, [*DETECTIONS.values(), second])
    breakdown = error_breakdown(truth, detections, [1])
    assert breakdown.counts["classification"] == 2
    corrected = [*[d for key, d in DETECTIONS.items() if key != "classification"],
                 {**DETECTIONS["classification"], "category_id": 2}]
    expected = _ap50(truth, corrected) - _ap50(truth, [*DETECTIONS.values(), second])
    assert breakdown.ap_gains["classification"] == pytest.approx(expected, abs=1e-12)


def test_confusion_matrix_counts_at_its_thresholds():
    truth = _ground_truth()
    detections = results_index(truth, list(DETECTIONS.values()))
    # Rows: circle, square, unseen, background (true); columns the same (predicted). The detections on
    # nothing at IoU 0.5 (background, duplicate, localisation, both) are all circles; the crowd is not counted.
    assert confusion_matrix(truth, detections, [1], score_threshold=0.0).tolist() == [
        [2, 0, 0, 1],  # A and F found; C not
        [1, 1, 0, 2],  # B called a circle; G found; D and E not
        [0, 0, 0, 0],
        [4, 0, 0, 0],
    ]
    assert confusion_matrix(truth, detections, [1], score_threshold=0.85).tolist() == [
        [1, 0, 0, 2],
        [0, 0, 0, 4],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
    ]


def _random_set(seed=0, images=12):
    """Objects of three classes (one class rare, with crowds) and noisy detections of them."""
    rng = np.random.default_rng(seed)
    image_entries, objects, detections = [], [], []
    for image_id in range(1, images + 1):
        image_entries.append({"id": image_id, "width": 320, "height": 240, "file_name": f"{image_id}.png"})
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(8, 150, 2)
            box = [float(rng.uniform(0, 320 - w)), float(rng.uniform(0, 240 - h)), float(w), float(h)]
            category = int(rng.choice([1, 2, 3], p=[0.45, 0.45, 0.1]))
            objects.append(_object(len(objects) + 1, image_id, category, box, crowd=int(rng.random() < 0.05)))
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
                noisy = [max(float(v), 1.0) for v in np.add(box, jitter)]
                label = category if rng.random() < 0.8 else int(rng.integers(1, 4))
                detections.append(_detection(image_id, label, noisy, float(rng.random())))
        for _ in range(rng.integers(0, 4)):
            detections.append(_detection(image_id, int(rng.integers(1, 5)), [*rng.uniform(0, 200, 2), 30.0, 30.0],
                                         float(rng.random() * 0.6)))
    categories = [*CATEGORIES, {"id": 4, "name": "never"}]
    return coco_index({"images": image_entries, "categories": categories, "annotations": objects}), detections


def _evaluator(truth, detections):
    evaluator = CocoEvaluator(truth)
    for image_id in truth.imgs:
        rows = [d for d in detections if d["image_id"] == image_id]
        boxes = torch.tensor([d["bbox"] for d in rows], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        evaluator.update([{"boxes": boxes, "scores": torch.tensor([d["score"] for d in rows]),
                           "labels": torch.tensor([d["category_id"] for d in rows])}], [image_id])
    return evaluator


def test_per_class_metrics_are_pycocotools_per_category_and_average_to_ap():
    truth, detections = _random_set()
    evaluation = _evaluator(truth, detections).evaluation()
    classes = per_class_metrics(evaluation, {c["id"]: c["name"] for c in truth.dataset["categories"]})
    assert [row["id"] for row in classes] == [1, 2, 3, 4]

    stats = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}
    for row in classes:
        reference = COCOeval(truth, results_index(truth, detections), "bbox")
        reference.params.catIds = [row["id"]]
        with contextlib.redirect_stdout(io.StringIO()):
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
        for name, index in stats.items():
            expected = reference.stats[index]
            assert (row[name] is None) == (expected == -1), (row["name"], name)
            if row[name] is not None:
                assert row[name] == pytest.approx(expected, abs=1e-6), (row["name"], name)
        assert row["objects"] == sum(a["category_id"] == row["id"] and not a["iscrowd"] for a in truth.anns.values())

    scored = [row for row in classes if row["objects"]]
    assert len(scored) == 3 and classes[3]["AP"] is None
    for name in PER_CLASS_AP:
        defined = [row[name] for row in scored if row[name] is not None]
        headline = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluation.stats))[name]
        assert np.mean(defined) == pytest.approx(headline, abs=1e-12), name


NASTY_NAME = "<img src=x onerror=alert(1)> | *bold* [link](http://x) `code` $x$ driver's \"car\""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    truth, detections = _random_set(seed=1, images=8)
    for image in truth.dataset["images"]:
        image["file_name"] = f"IMG {image['id']} #({image['id']}.png"  # a space, "#" and "(" end a bare link
        Image.new("RGB", (image["width"], image["height"]), (90, 120, 150)).save(tmp_path / image["file_name"])
    names = {1: "circle", 2: NASTY_NAME, 3: "triangle"}
    # What a report killed while writing leaves; the next one into the folder removes it.
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / ".pr_curves.png.k3j9x2.tmp").write_bytes(b"half a picture")
    path = write_report(_evaluator(truth, detections).evaluation(), tmp_path / "report", class_names=names,
                        image_path=lambda image_id: tmp_path / truth.imgs[image_id]["file_name"],
                        title="model.pt on shapes (val)", score_threshold=0.3, worst_images=3)
    return path


def test_report_writes_its_pictures_and_every_link_resolves(report):
    text = report.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)  # as CommonMark reads a link: no space, no bare ")"
    pictures = [unquote(link) for link in links if link.endswith(".png")]
    assert {"pr_curves.png", "confusion_matrix.png"} <= set(pictures) and len(pictures) == 5  # 3 worst images
    for link in links:
        assert (report.parent / unquote(link)).is_file(), link
    assert not list(report.parent.glob(".*.tmp"))
    for link in pictures:
        with Image.open(report.parent / link) as picture:
            assert picture.format == "PNG" and picture.width >= 400 and picture.height >= 300, link
    errors = json.loads((report.parent / "errors.json").read_text())
    assert set(errors["errors"]) == set(ERROR_KINDS)
    assert all(f"| {kind} | {errors['errors'][kind]['count']} |" in text for kind in ERROR_KINDS)
    confusion = json.loads((report.parent / "confusion_matrix.json").read_text())
    assert np.asarray(confusion["counts"]).shape == (5, 5) and confusion["classes"][1] == NASTY_NAME


def test_a_report_rewritten_removes_the_old_report_md_before_anything_else(report, tmp_path, monkeypatch):
    """report.md is written last, so it says the report is whole: a rewrite killed halfway must not
    leave the old one beside new files."""
    out = tmp_path / "report"
    shutil.copytree(report.parent, out)
    truth, detections = _random_set(seed=1, images=8)

    def killed(figure, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(document, "save_figure", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(_evaluator(truth, detections).evaluation(), out, class_names={}, image_path=lambda _: None,
                     title="a rewrite")
    assert not (out / "report.md").exists()


def test_class_names_appear_escaped(report):
    text = report.read_text()
    assert NASTY_NAME not in text and "<img" not in text
    assert f"| {escape(NASTY_NAME)} |" in text
    row = next(line for line in text.splitlines() if line.startswith("| " + escape(NASTY_NAME)))
    assert len(re.findall(r"(?<!\\)\|", row)) == 10  # nine cells: the name's pipe does not split the row
    assert escape(NASTY_NAME) == (r"&lt;img src=x onerror=alert\(1\)&gt; \| \*bold\* \[link\]\(http://x\) "
                                  r"\`code\` $x$ driver's " + '"car"')
    assert json.loads((report.parent / "per_class.json").read_text())["classes"][1]["name"] == NASTY_NAME


def _log(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_training_curves_are_drawn(tmp_path):
    losses = {"train_loss": 9.0, "train_loss_ce": 1.0, "train_loss_bbox": 0.3, "train_loss_giou": 0.5,
              "train_loss_ce_0": 1.1, "train_loss_ce_enc": 1.3}
    records = [
        {"epoch": 0, **losses, "AP": 0.1, "AP50": 0.2, "training_minutes": 1.0},
        {"epoch": 1, **losses, "AP": 0.3, "AP50": 0.5, "training_minutes": 2.0},
        {"epoch": 2, **losses, "AP": 0.25, "AP50": 0.5, "training_minutes": 2.9},
    ]
    _log(tmp_path / "log.jsonl", records)
    write_training_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.format == "PNG" and picture.width >= 800 and picture.height >= 800
    _log(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl: no epoch logged yet"):
        write_training_curves(tmp_path / "empty.jsonl", tmp_path / "none.png")


@pytest.mark.parametrize("classes, counted", [(20, True), (21, False)])
def test_a_confusion_matrix_writes_its_counts_up_to_twenty_classes_as_pascal_voc_has(classes, counted):
    figure = confusion_figure(np.eye(classes + 1, dtype=int) * 3, [f"class {k}" for k in range(classes)], "title")
    assert bool(figure.axes[0].texts) == counted


def test_an_epoch_the_time_budget_cut_short_is_drawn_at_its_share(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(curves, "save_figure", lambda figure, out: drawn.append(figure))
    losses = {"train_loss": 9.0, "train_loss_ce": 1.0, "train_loss_bbox": 0.3, "train_loss_giou": 0.5}
    _log(tmp_path / "log.jsonl", [  # epoch 1 stopped at batch 5 of 20, then resumed with a larger budget
        {"epoch": 0, **losses, "AP": 0.1, "AP50": 0.2, "training_minutes": 1.0},
        {"epoch": 1, "batches": 5, "epoch_batches": 20, **losses, "AP": 0.2, "AP50": 0.3, "training_minutes": 1.25},
        {"epoch": 1, **losses, "AP": 0.3, "AP50": 0.4, "training_minutes": 2.0},
    ])  # fmt: skip
    write_training_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    ap_panel = drawn[0].axes[-2]  # the epochs column's last row
    assert list(ap_panel.lines[0].get_xdata()) == [1, 1.25, 2]


def test_training_draws_curves_every_epoch_and_reports_on_best_pt_as_evaluate_does(tmp_path, monkeypatch, capsys):
    data = synthesize(tmp_path / "shapes", train=2, val=2, image_size=64)
    drawn = []
    draw = loop._draw_curves
    monkeypatch.setattr(loop, "_draw_curves", lambda log, out: drawn.append(len(log.read_text().splitlines())) or draw(log, out))
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), output_dir=str(run), preset="tiny", epochs=2, batch_size=2, image_size=64, workers=0))
    assert drawn == [1, 2]  # after each epoch, with its record
    with Image.open(run / "curves.png") as picture:
        assert picture.format == "PNG" and picture.width >= 800
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    best = max(records, key=lambda record: record["AP"])
    reported = json.loads((run / "report" / "per_class.json").read_text())
    assert reported["metrics"] == pytest.approx({key: best[key] for key in reported["metrics"]}, abs=1e-9)  # best.pt's

    out = tmp_path / "evaluated"
    checkpoint = run / "best.pt"
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0", "--report", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{out}/report.md: per-class AP, precision-recall curves, confusion matrix, errors")
    assert json.loads((out / "per_class.json").read_text()) == reported
    text = (out / "report.md").read_text()
    assert text.startswith(f"# Evaluation report: {escape(f'{checkpoint} on {data} (val)')}")
    assert all(f"| {name} |" in text for name in SYNTHETIC_CLASSES)

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0", "--report", str(blocked)]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {blocked}: not a folder, so the report cannot go there\n"


def test_a_finished_run_resumed_writes_the_report_it_lacks_from_best_pt(tmp_path):
    """Resumed, a run evaluates best.pt anew for its report, on the split every epoch was evaluated on."""
    data = synthesize(tmp_path / "shapes", train=2, val=2, image_size=64)
    run = tmp_path / "run"
    settings = dict(data=str(data), output_dir=str(run), preset="tiny", epochs=1, batch_size=2, image_size=64, workers=0)
    train(TrainConfig(**settings, report=False))
    assert not (run / "report").exists()
    train(TrainConfig(**settings, resume=True))  # finished: it writes only the report it lacks
    best = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    reported = json.loads((run / "report" / "per_class.json").read_text())
    assert reported["metrics"] == pytest.approx({key: best[key] for key in reported["metrics"]}, abs=1e-9)


def test_a_metric_without_objects_reads_as_a_dash_in_the_headline_as_in_the_table(tmp_path):
    """COCO's -1 (no large object here) is "–" in the "all" row: the headline above it must not say -1.000."""
    truth = _ground_truth()
    Image.new("RGB", (320, 320), (90, 120, 150)).save(tmp_path / "1.png")
    path = write_report(_evaluator(truth, list(DETECTIONS.values())).evaluation(), tmp_path / "report",
                        class_names={}, image_path=lambda image_id: tmp_path / "1.png", title="no large objects")
    text = path.read_text()
    headline = next(line for line in text.splitlines() if line.startswith("1 images"))
    assert "APl –  AR100" in headline and "-1" not in headline
    assert "| **–** | **" in next(line for line in text.splitlines() if line.startswith("| **all** |"))


def test_the_curves_labels_stand_apart_inside_the_picture_in_one_size_for_a_short_run(tmp_path, monkeypatch):
    """A first run of two epochs in a minute's fraction: matplotlib's default ten ticks (0.0225, 0.0250, ...)
    ran into each other, and the last one off the picture's right edge."""
    drawn = []
    monkeypatch.setattr(curves, "save_figure", lambda figure, out: drawn.append(figure))
    losses = {"train_loss": 9.0, "train_loss_ce": 1.0, "train_loss_bbox": 0.3, "train_loss_giou": 0.5}
    _log(tmp_path / "log.jsonl", [{"epoch": epoch, **losses, "AP": 0.0, "AP50": 0.0, "training_minutes": minutes}
                                  for epoch, minutes in enumerate([0.0240, 0.0441])])  # a tiny run's
    write_training_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    figure = drawn[0]
    figure.canvas.draw()
    for axes in figure.axes[-2:]:  # each column's bottom panel, where the x axis is labelled
        low, high = axes.get_xlim()
        shown = [label.get_window_extent() for tick, label in zip(axes.get_xticks(), axes.get_xticklabels())
                 if low <= tick <= high]
        assert len(shown) >= 2
        assert all(left.x1 + 10 < right.x0 for left, right in zip(shown, shown[1:]))
        assert 0 <= shown[0].x0 and shown[-1].x1 <= figure.bbox.width
    assert len({axes.title.get_fontsize() for axes in figure.axes}) == 1  # the AP panels' titles were larger


def test_a_worst_images_labels_stay_on_their_own_panel(tmp_path):
    """A long name on an object at the image's top right ran over the panel's title and into the next panel."""
    Image.new("RGB", (100, 80), (90, 120, 150)).save(tmp_path / "image.png")
    label = LabelledBox([60, 0, 40, 30], "not found: " + "a very long class name " * 3, "missed")
    figure = image_errors_figure(tmp_path / "image.png", [label], [], ("ground truth", "detections"), "image.png")
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)  # the missed label's colour
    inside = np.zeros_like(red)
    box = figure.axes[0].get_window_extent()  # in pixels from the bottom left; the array's rows go down
    height = pixels.shape[0]
    inside[round(height - box.y1) : round(height - box.y0) + 1, round(box.x0) : round(box.x1) + 1] = True
    assert red[inside].any() and not red[~inside].any()
