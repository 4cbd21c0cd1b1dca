"""Training-only options (hybrid matching, look forward twice, mixed query selection, denoising,
IoU-aware classification): what they train, and that inference and checkpoints stay those of the published
architecture."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from conftest import REFERENCE_BACKBONE

from deformable_detr import build_model, cli, load_pretrained, save_checkpoint
from deformable_detr.checkpoints import convert_checkpoint, read_checkpoint
from deformable_detr.config import PRESETS, ModelConfig, get_config
from deformable_detr.train import SetCriterion, TrainConfig
from deformable_detr.train.matcher import HungarianMatcher

OPTIONS = {"look_forward_twice": False, "mixed_query_selection": False, "one_to_many_queries": 0, "denoising_groups": 0}
ONE_STAGE = dict(look_forward_twice=True, one_to_many_queries=12)
TWO_STAGE = dict(two_stage=True, mixed_query_selection=True, look_forward_twice=True, one_to_many_queries=12,
                 denoising_groups=3)


def options_model(**options) -> torch.nn.Module:
    """The tiny model without dropout (so that training and evaluation forwards compare), its weights
    perturbed so that no head is at its zero initialisation."""
    model = build_model("tiny", num_classes=4, dropout=0.0, num_queries=10, **options)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def published(model: torch.nn.Module) -> torch.nn.Module:
    """A model of the published architecture (every option off) with ``model``'s other settings."""
    return build_model(dataclasses.replace(model.config, **OPTIONS))


def images() -> torch.Tensor:
    return torch.randn(2, 3, 96, 128)


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


@pytest.mark.parametrize("options", [ONE_STAGE, TWO_STAGE], ids=["one_stage", "two_stage"])
def test_inference_equals_the_published_model_with_the_same_weights(options):
    model = options_model(**options).eval()
    plain = published(model).eval()
    plain.load_state_dict(model.inference_state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        ours, theirs = model(x), plain(x)
    assert "one_to_many" not in ours and ours["pred_logits"].shape[1] == 10
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("options", [ONE_STAGE, TWO_STAGE], ids=["one_stage", "two_stage"])
def test_training_forward_gives_the_one_to_one_group_what_inference_gives(options):
    model = options_model(**options)
    x = images()
    with torch.no_grad():
        training = model.train()(x)
        inference = model.eval()(x)
    assert training["one_to_many"]["pred_logits"].shape == (2, 12, 4)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(training[key], inference[key], rtol=0, atol=1e-6)


def test_no_attention_flows_between_the_groups():
    model = options_model(one_to_many_queries=12).train()
    x = images()
    with torch.no_grad():
        before = model(x)
        model.one_to_many_query_embed.weight.add_(torch.randn_like(model.one_to_many_query_embed.weight))
        other_group_changed = model(x)
        model.query_embed.weight.add_(torch.randn_like(model.query_embed.weight))
        own_group_changed = model(x)
    for key in ("pred_logits", "pred_boxes"):
        # One-to-one predictions ignore the one-to-many queries, and the other way round.
        assert torch.equal(other_group_changed[key], before[key])
        assert not torch.equal(other_group_changed["one_to_many"][key], before["one_to_many"][key])
        assert torch.equal(own_group_changed["one_to_many"][key], other_group_changed["one_to_many"][key])
        assert not torch.equal(own_group_changed[key], other_group_changed[key])


def test_the_one_to_many_group_is_matched_to_k_copies_of_each_target():
    seen = []

    class RecordingMatcher(HungarianMatcher):
        def forward(self, outputs, targets):
            matches = super().forward(outputs, targets)
            seen.append((outputs["pred_logits"].shape[1], [t["labels"].tolist() for t in targets], matches))
            return matches

    model = options_model(**TWO_STAGE).train()
    criterion = SetCriterion(matcher=RecordingMatcher(), one_to_many_repeats=3)
    losses = criterion(model(images()), targets())
    # Three decoder layers per group, one-to-one first, then the one-to-many group, then the encoder.
    group = [entry for entry in seen if entry[0] == 12]
    assert len(group) == 3 and len([entry for entry in seen if entry[0] == 10]) == 3
    for _, labels, matches in group:
        assert labels == [[1, 3] * 3, [2] * 3]
        for image_labels, (queries, indices) in zip(labels, matches):
            # Every copy is matched to a query of its own: each target gets k queries.
            assert sorted(indices.tolist()) == list(range(len(image_labels))) and len(set(queries.tolist())) == len(queries)
    assert {"loss_ce_one_to_many", "loss_bbox_1_one_to_many", "loss_giou_0_one_to_many"} <= losses.keys()


def test_the_one_to_many_loss_is_weighted():
    model = options_model(one_to_many_queries=12).train()
    losses = SetCriterion()(model(images()), targets())
    one_to_one = {name: value for name, value in losses.items() if not name.endswith("_one_to_many")}
    weighted = SetCriterion(one_to_many_weight=0.5)
    expected = weighted.total_loss(one_to_one) + 0.5 * (SetCriterion().total_loss(losses) - weighted.total_loss(one_to_one))
    torch.testing.assert_close(weighted.total_loss(losses), expected)
    assert weighted.total_loss(losses) > weighted.total_loss(one_to_one)


def test_denoising_queries_are_noised_copies_of_the_targets_restored_in_order():
    model = options_model(**TWO_STAGE).train()
    torch.manual_seed(0)
    queries = model._denoising_queries(targets(), torch.device("cpu"))
    # Three groups as long as the longest target list (2); the second image's list is padded.
    assert queries.groups == 3 and queries.boxes.shape == (2, 6, 4) and queries.content.shape == (2, 6, 128)
    for image, target in enumerate(targets()):
        for group in range(3):
            for index, box in enumerate(target["boxes"]):
                noised = queries.boxes[image, group * 2 + index]
                assert ((noised[:2] - box[:2]).abs() <= 0.2 * box[2:] + 1e-6).all()  # centre within 0.4 / 2 of the size
                assert ((noised[2:] / box[2:] - 1).abs() <= 0.4 + 1e-6).all()  # sides scaled by 1 +- 0.4
    assert not torch.equal(queries.boxes[0, :2], queries.boxes[0, 2:4])  # every group noised anew
    exact = options_model(**TWO_STAGE, denoising_box_noise=0.0, denoising_label_noise=0.0)
    copies = exact._denoising_queries(targets(), torch.device("cpu"))
    assert torch.equal(copies.boxes[0], targets()[0]["boxes"].repeat(3, 1))  # no noise: the targets themselves
    labels = targets()[0]["labels"].repeat(3)
    assert torch.equal(copies.content[0], exact.denoising_label_embed(labels))

    calls = []

    class CountingMatcher(HungarianMatcher):
        def forward(self, outputs, targets):
            calls.append(outputs["pred_logits"].shape[1])
            return super().forward(outputs, targets)

    outputs = model(images(), targets=targets())
    assert outputs["denoising"]["pred_logits"].shape == (2, 6, 4) and outputs["denoising"]["groups"] == 3
    losses = SetCriterion(matcher=CountingMatcher())(outputs, targets())
    assert 6 not in calls  # denoising queries are never matched: their targets are known
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_1_dn"} <= losses.keys()
    # Query j of every group restores target j: boxes that equal their targets lose nothing.
    restored = {"pred_logits": outputs["denoising"]["pred_logits"], "pred_boxes": torch.zeros(2, 6, 4)}
    for image, target in enumerate(targets()):
        for group in range(3):
            restored["pred_boxes"][image, group * 2 : group * 2 + len(target["boxes"])] = target["boxes"]
    exact = SetCriterion()({**restored, "denoising": {**restored, "aux_outputs": [], "groups": 3}}, targets())
    assert exact["loss_bbox_dn"] == 0 and exact["loss_giou_dn"].abs() < 1e-6
    # Images without objects: one padding query a group, trained as background, so the label
    # embedding still takes part in the step.
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    outputs = model(images(), targets=empty)
    assert outputs["denoising"]["pred_logits"].shape == (2, 3, 4)
    SetCriterion().total_loss(SetCriterion()(outputs, empty)).backward()
    assert model.denoising_label_embed.weight.grad.abs().sum() > 0


def test_no_attention_flows_between_denoising_groups_and_the_other_queries():
    model = options_model(**TWO_STAGE).train()
    torch.manual_seed(0)
    queries = model._denoising_queries(targets(), torch.device("cpu"))
    x = images()

    def forward(content):
        model._denoising_queries = lambda targets, device: queries._replace(content=content)
        with torch.no_grad():
            return model(x, targets=targets())

    before = forward(queries.content)
    changed = queries.content.clone()
    changed[:, 2:4] += torch.randn_like(changed[:, 2:4])  # group 1 only
    after = forward(changed)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(after[key], before[key])  # the one-to-one queries
        assert torch.equal(after["one_to_many"][key], before["one_to_many"][key])
        denoised_before, denoised_after = before["denoising"][key], after["denoising"][key]
        assert torch.equal(denoised_after[:, :2], denoised_before[:, :2])  # group 0
        assert torch.equal(denoised_after[:, 4:], denoised_before[:, 4:])  # group 2
        assert not torch.equal(denoised_after[:, 2:4], denoised_before[:, 2:4])


def test_with_fewer_proposals_than_queries_the_outputs_hold_each_group_in_its_place():
    """A small image has fewer encoder positions than queries: the proposals all go to the one-to-one
    group, and the denoising queries stay in their own output."""
    model = build_model("tiny", num_classes=4, dropout=0.0, two_stage=True, one_to_many_queries=10, denoising_groups=2)
    image, target = torch.randn(1, 3, 32, 32), targets()[:1]
    with torch.no_grad():
        training = model.train()(image, targets=target)
        inference = model.eval()(image)
    proposals = training["enc_outputs"]["pred_logits"].shape[1]
    assert proposals < model.config.num_queries
    assert training["pred_logits"].shape[1] == inference["pred_logits"].shape[1] == proposals
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(training[key], inference[key], rtol=0, atol=1e-6)
    assert training["one_to_many"]["pred_logits"].shape[1] == 0
    assert training["denoising"]["pred_logits"].shape[1] == model.config.denoising_groups * len(target[0]["labels"])


def test_an_empty_one_to_many_group_has_zero_losses_and_the_step_goes_on():
    """Where the one-to-one group takes every proposal, the one-to-many group is empty: its losses are
    zero, and the step goes on."""
    model = build_model("tiny", num_classes=4, dropout=0.0, two_stage=True, one_to_many_queries=10).train()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert outputs["one_to_many"]["pred_logits"].shape[1] == 0
    criterion = SetCriterion()
    losses = criterion(outputs, targets())
    group = {name: value for name, value in losses.items() if name.endswith("_one_to_many")}
    assert len(group) == 9 and not any(group.values())
    criterion.total_loss(losses).backward()


def last_layer_box_gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    model.train()
    model(x)["pred_boxes"].sum().backward()
    return [head.layers[-1].weight.grad for head in model.bbox_embed]


def _one_matched_query(logit: float, box: list[float]) -> tuple[dict, list[dict]]:
    """Outputs of one image with two queries and two classes: query 0 (class logits ``[logit, -2]``,
    ``box``) matches the one target (class 0, box (0.5, 0.5, 0.4, 0.4)); query 1 is background."""
    outputs = {
        "pred_logits": torch.tensor([[[logit, -2.0], [-1.0, -3.0]]], requires_grad=True),
        "pred_boxes": torch.tensor([[box, [0.1, 0.1, 0.05, 0.05]]]),
    }
    return outputs, [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def test_iou_aware_class_target_is_the_matched_boxs_iou():
    criterion = SetCriterion(iou_aware=True)
    # Half the target's width, the same centre: IoU 0.5. The loss is least where the score is 0.5.
    half = [0.5, 0.5, 0.2, 0.4]
    outputs, targets = _one_matched_query(0.0, half)
    criterion(outputs, targets)["loss_ce"].backward()
    assert outputs["pred_logits"].grad[0, 0, 0].abs() < 1e-6
    for logit, sign in ((1.0, 1), (-1.0, -1)):  # above 0.5 the loss pushes the score down, below it up
        outputs, targets = _one_matched_query(logit, half)
        criterion(outputs, targets)["loss_ce"].backward()
        assert torch.sign(outputs["pred_logits"].grad[0, 0, 0]) == sign
    # A perfect box: the target is 1, as in the focal loss, and the loss keeps pushing the score up.
    outputs, targets = _one_matched_query(3.0, [0.5, 0.5, 0.4, 0.4])
    criterion(outputs, targets)["loss_ce"].backward()
    assert outputs["pred_logits"].grad[0, 0, 0] < 0


def test_iou_aware_loss_gives_no_weight_to_a_matched_box_that_misses_its_target():
    # Beside the target (0.3-0.7 on both axes): IoU 0, the matched score's target and weight both 0.
    outputs, targets = _one_matched_query(1.0, [0.15, 0.15, 0.1, 0.1])
    SetCriterion(iou_aware=True)(outputs, targets)["loss_ce"].backward()
    gradient = outputs["pred_logits"].grad[0]
    assert gradient[0, 0] == 0
    assert (gradient[1] > 0).all() and gradient[0, 1] > 0  # the unmatched scores are still pushed down


def test_iou_aware_loss_scores_unmatched_classes_as_the_focal_loss_does():
    outputs, targets = _one_matched_query(0.0, [0.5, 0.5, 0.2, 0.4])
    losses = [SetCriterion(iou_aware=option)(outputs, targets)["loss_ce"] for option in (False, True)]
    gradients = [torch.autograd.grad(loss, outputs["pred_logits"])[0] for loss in losses]
    # Query 1 and query 0's other class are negatives, weighted as the focal loss weights them,
    # (1 - alpha) * p ** gamma, but held constant (as RT-DETR does): the gradient is that weight times p.
    unmatched = torch.ones(1, 2, 2, dtype=torch.bool)
    unmatched[0, 0, 0] = False
    p = outputs["pred_logits"].detach().sigmoid()
    expected = 0.75 * p**2 * p  # d/dx of w * -log(1 - sigmoid(x)) with w held constant: w * p
    torch.testing.assert_close(gradients[1][unmatched], expected[unmatched])
    assert not torch.allclose(gradients[0][unmatched], gradients[1][unmatched])  # the focal loss differentiates w too


def test_look_forward_twice_trains_the_previous_layers_box_and_changes_no_output():
    torch.manual_seed(1)
    twice = options_model(look_forward_twice=True)
    once = published(twice)
    once.load_state_dict(twice.state_dict())
    x = images()
    # The last layer's box loss: without the option it stops at the detached reference of layer 2.
    with_option, without = last_layer_box_gradients(twice, x), last_layer_box_gradients(once, x)
    assert without[1] is None and with_option[1] is not None and with_option[1].abs().sum() > 0
    # One layer back only: layer 2's box starts from layer 1's detached box.
    assert without[0] is None and not with_option[0].any()
    torch.testing.assert_close(with_option[2], without[2])
    with torch.no_grad():
        assert torch.equal(twice.eval()(x)["pred_boxes"], once.eval()(x)["pred_boxes"])


def test_mixed_query_selection_learns_one_content_query_and_keeps_its_gain_zero():
    model = build_model("tiny", num_classes=4, **TWO_STAGE)
    norm = model.transformer.pos_trans_norm
    content = slice(model.config.d_model, None)
    assert not norm.weight[content].any() and norm.bias[content].any()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    model.train()
    SetCriterion().total_loss(SetCriterion()(model(images()), targets())).backward()
    before = norm.bias.detach().clone()
    optimizer.step()
    assert not norm.weight[content].any()
    assert not torch.equal(norm.bias[content], before[content])  # the content query itself trains


@pytest.mark.parametrize("options", [ONE_STAGE, TWO_STAGE], ids=["one_stage", "two_stage"])
def test_checkpoint_with_options_round_trips_through_the_reference_layout(options, tmp_path):
    model = options_model(**options, **REFERENCE_BACKBONE).eval()
    save_checkpoint(tmp_path / "ours.pt", model)
    assert load_pretrained(tmp_path / "ours.pt").config == model.config  # ours keeps the options
    convert_checkpoint(tmp_path / "ours.pt", tmp_path / "reference.pth")
    reference = read_checkpoint(tmp_path / "reference.pth")
    assert reference.config == dataclasses.replace(model.config, **OPTIONS)
    expected = model.inference_state_dict()
    dropped = set(model.state_dict()) - set(expected)
    assert dropped == ({"one_to_many_query_embed.weight"} if not model.config.two_stage else {"denoising_label_embed.weight"})
    assert reference.state_dict.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(reference.state_dict[name], tensor), name
    x = images()
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "reference.pth")(x)["pred_logits"], model(x)["pred_logits"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"look_forward_twice": True, "with_box_refine": False}, "requires with_box_refine"),
        ({"mixed_query_selection": True}, "requires two_stage"),
        ({"one_to_many_queries": -1}, "0 or more"),
        ({"denoising_groups": 2}, "denoising_groups requires two_stage"),
        ({"denoising_box_noise": 1.0}, r"^denoising_box_noise must be in \[0, 1\), got 1.0$"),
        ({"denoising_label_noise": 1.5}, r"^denoising_label_noise must be in \[0, 1\], got 1.5$"),
    ],
)
def test_options_need_the_architecture_they_train(options, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **options)


def test_options_are_off_in_every_preset():
    for config in [ModelConfig(), *PRESETS.values()]:
        assert all(getattr(config, name) == value for name, value in OPTIONS.items())


def test_train_flags_switch_the_options_on():
    parser = argparse.ArgumentParser()
    cli._add_training_arguments(parser)
    cli._add_model_arguments(parser)
    required = ["--data", "data", "--output-dir", "run"]
    flags = ["--two-stage", "--look-forward-twice", "--mixed-query-selection", "--one-to-many-queries", "100",
             "--one-to-many-repeats", "4", "--one-to-many-weight", "0.5", "--iou-aware-classification",
             "--denoising-groups", "5"]
    config = cli._train_config(parser.parse_args(required + flags))
    assert config.model_overrides == {"two_stage": True, "look_forward_twice": True, "mixed_query_selection": True,
                                      "one_to_many_queries": 100, "denoising_groups": 5}
    assert (config.one_to_many_repeats, config.one_to_many_weight, config.iou_aware_classification) == (4, 0.5, True)
    default = cli._train_config(parser.parse_args(required))
    assert default.model_overrides == {} and default == TrainConfig(data="data", output_dir="run")  # off by default
