import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from deformable_detr import build_model
from deformable_detr.data import coco_split, collate, synthesize
from deformable_detr.evaluation import METRICS, CocoEvaluator, detect_all, write_results_json


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthesize(root, train=0, val=6, image_size=96)
    return root


def _ground_truth_detections(coco, image_id, shift=0.0):
    """The image's objects as postprocess would give them, score 1, moved right by ``shift`` of
    their width."""
    annotations = coco.imgToAnns[image_id]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 0] += shift * boxes[:, 2]
    boxes[:, 2:] += boxes[:, :2]
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    return {"scores": torch.ones(len(annotations)), "labels": labels, "boxes": boxes}


def _evaluate_ground_truth(coco, image_ids, shift=0.0):
    evaluator = CocoEvaluator(coco)
    evaluator.update([_ground_truth_detections(coco, i, shift) for i in image_ids], image_ids)
    return evaluator


def _defined(metrics):
    """The metrics that have ground truth to score (pycocotools gives -1 for the others)."""
    return {key: value for key, value in metrics.items() if value != -1}


def test_ground_truth_scores_perfectly(data_root):
    coco = coco_split(data_root, "val").coco
    evaluator = _evaluate_ground_truth(coco, sorted(coco.imgs))
    metrics = evaluator.summarize()
    assert tuple(metrics) == METRICS
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["AR100"] == 1.0
    # AR1 is the exception: one detection per image cannot recall all of an image's objects.
    # (pycocotools' averaging of interpolated precision may give 1 - 2e-16.)
    assert all(value == pytest.approx(1.0, abs=1e-12) for key, value in _defined(metrics).items() if key != "AR1")



@pytest.mark.parametrize("ids", [[0, 1], [7, 7], None], ids=["from 0", "repeated", "left out"])
def test_every_object_counts_whatever_annotation_ids_the_file_gives(tmp_path, ids):
    # COCO evaluation reads a match to annotation id 0 as no match, and keys objects by their ids.
    synthesize(tmp_path, train=0, val=4, image_size=64)
    path = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][:2]
    assert len(data["annotations"]) == 2
    for annotation, number in zip(data["annotations"], ids or [None, None]):
        annotation.pop("id")
        if number is not None:
            annotation["id"] = number
    path.write_text(json.dumps(data))
    coco = coco_split(tmp_path, "val").coco
    assert _evaluate_ground_truth(coco, sorted(coco.imgs)).summarize()["AP"] == 1.0

def test_shifted_boxes_score_by_overlap(data_root):
    coco = coco_split(data_root, "val").coco
    # Moved by a fifth of their width, boxes overlap their objects with IoU 0.8 / 1.2 = 2/3: matched at
    # the thresholds 0.50 to 0.65 and missed at 0.70 to 0.95, so AP is 4/10.
    metrics = _evaluate_ground_truth(coco, sorted(coco.imgs), shift=0.2).summarize()
    assert metrics["AP50"] == 1.0 and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.4)


def test_metrics_are_pycocotools_to_a_millionth(data_root):
    coco = coco_split(data_root, "val").coco
    generator = torch.Generator().manual_seed(0)
    detections = []
    for image_id in sorted(coco.imgs):
        found = _ground_truth_detections(coco, image_id)
        # Corners moved by a few pixels, a class in five wrong, two boxes on nothing.
        boxes = torch.cat([found["boxes"] + torch.randn(len(found["boxes"]), 4, generator=generator) * 2,
                           torch.rand(2, 2, generator=generator).mul(60).repeat(1, 2) + torch.tensor([0, 0, 20, 20])])
        labels = torch.cat([found["labels"], torch.tensor([1, 2])])
        wrong = torch.rand(len(labels), generator=generator) < 0.2
        labels[wrong] = labels[wrong] % 5 + 1
        detections.append({"boxes": boxes, "labels": labels, "scores": torch.rand(len(labels), generator=generator)})
    evaluator = CocoEvaluator(coco)
    evaluator.update(detections, sorted(coco.imgs))
    ours = evaluator.evaluation()

    reference = COCOeval(coco, coco.loadRes(evaluator.results()), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert 0.1 < reference.stats[0] < 0.9  # neither extreme: the comparison can tell them apart
    np.testing.assert_allclose(ours.stats, reference.stats, rtol=0, atol=1e-6)
    for array in ("precision", "recall", "scores"):
        np.testing.assert_allclose(ours.eval[array], reference.eval[array], rtol=0, atol=1e-6, err_msg=array)


def test_evaluates_only_the_images_seen(data_root):
    coco = coco_split(data_root, "val").coco
    image_ids = sorted(coco.imgs)
    evaluator = _evaluate_ground_truth(coco, image_ids[:2])
    # Unseen images' objects would count as missed if evaluation covered the whole set.
    assert evaluator.summarize()["AP"] == 1.0
    assert {result["image_id"] for result in evaluator.results()} == set(image_ids[:2])


def test_no_detections_score_zero(data_root):
    coco = coco_split(data_root, "val").coco
    evaluator = CocoEvaluator(coco)
    nothing = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update([nothing] * len(coco.imgs), sorted(coco.imgs))
    metrics = evaluator.summarize()
    assert metrics["AP"] == metrics["AP50"] == metrics["AR100"] == 0.0
    assert evaluator.results() == []


def test_rejects_unknown_images_and_an_empty_pass(data_root):
    coco = coco_split(data_root, "val").coco
    evaluator = CocoEvaluator(coco)
    with pytest.raises(ValueError, match="never called"):
        evaluator.summarize()
    with pytest.raises(ValueError, match="image id 12345"):
        evaluator.update([_ground_truth_detections(coco, min(coco.imgs))], [12345])


def test_results_json_is_coco_format(data_root, tmp_path):
    coco = coco_split(data_root, "val").coco
    image_id = min(coco.imgs)
    evaluator = _evaluate_ground_truth(coco, [image_id])
    path = tmp_path / "results.json"
    write_results_json(path, evaluator.results())
    results = json.loads(path.read_text())
    first = coco.imgToAnns[image_id][0]
    assert len(results) == len(coco.imgToAnns[image_id])
    assert results[0]["image_id"] == image_id and results[0]["category_id"] == first["category_id"]
    assert results[0]["bbox"] == pytest.approx(first["bbox"], abs=1e-4) and results[0]["score"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left over


def test_evaluate_runs_a_model_end_to_end(data_root):
    dataset = coco_split(data_root, "val")
    model = build_model("tiny", num_classes=dataset.num_classes).train()
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate)
    metrics = detect_all(model, loader, device="cpu", coco=dataset.coco, progress=False).summarize()
    assert tuple(metrics) == METRICS
    assert all(0.0 <= metrics[key] <= 1.0 for key in _defined(metrics))
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("AP", "AP50", "AP75", "AR100"))
    assert model.training  # given back in the mode it came in


def _rank_main(rank, root, image_ids, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        coco = coco_split(root, "val").coco
        # Each process takes every other image, padded to equal shares as DistributedSampler does, so
        # one image is evaluated on both and must count once. Half the boxes are moved so that the
        # metrics depend on which detections are kept.
        share = (image_ids + image_ids[:1])[rank::2]
        detections = [_ground_truth_detections(coco, i, shift=0.2 * (i % 2)) for i in share]
        evaluator = CocoEvaluator(coco)
        evaluator.update(detections, share)
        metrics = evaluator.summarize()
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "results": evaluator.results()}))
    finally:
        dist.destroy_process_group()


def test_distributed_gathers_every_process(data_root, tmp_path):
    coco = coco_split(data_root, "val").coco
    image_ids = sorted(coco.imgs)[:5]  # odd, so one process gets a padding image
    mp.spawn(_rank_main, args=(data_root, image_ids, tmp_path), nprocs=2)

    single = CocoEvaluator(coco)
    single.update([_ground_truth_detections(coco, i, shift=0.2 * (i % 2)) for i in image_ids], image_ids)
    expected = single.summarize()
    assert 0 < expected["AP"] < 1
    for rank in range(2):
        output = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert output["metrics"] == pytest.approx(expected)
        assert len(output["results"]) == len(single.results())
