import pytest
import torch
from torch.utils.data import DataLoader

from deformable_detr.data import coco_split, collate, recipe, synthesize


def test_pads_to_the_largest_image_and_masks_the_padding():
    first, second = torch.randn(3, 5, 7), torch.randn(3, 6, 4)
    targets = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 3])}]
    images, padding_mask, out_targets = collate([(first, targets[0]), (second, targets[1])])
    assert images.shape == (2, 3, 6, 7) and padding_mask.shape == (2, 6, 7)
    assert padding_mask.dtype == torch.bool
    torch.testing.assert_close(images[0, :, :5, :7], first)
    torch.testing.assert_close(images[1, :, :6, :4], second)
    assert padding_mask[0, :5, :].logical_not().all() and padding_mask[0, 5, :].all()
    assert padding_mask[1, :, :4].logical_not().all() and padding_mask[1, :, 4:].all()
    assert (images[padding_mask.unsqueeze(1).expand_as(images)] == 0).all()
    assert out_targets == targets


def test_pads_up_to_a_multiple_of_the_size():
    images, padding_mask, _ = collate([(torch.randn(3, 5, 7), {}), (torch.randn(3, 9, 4), {})], pad_to_multiple=8)
    assert images.shape == (2, 3, 16, 8) and padding_mask.shape == (2, 16, 8)
    assert padding_mask[0, 5:].all() and padding_mask[0, :, 7].all() and not padding_mask[0, :5, :7].any()
    assert padding_mask[1, 9:].all() and padding_mask[1, :, 4:].all() and not padding_mask[1, :9, :4].any()
    with pytest.raises(ValueError, match="multiple must be a positive integer"):
        collate([(torch.randn(3, 5, 7), {})], pad_to_multiple=0)


def test_data_loader_batches_a_data_set(tmp_path):
    synthesize(tmp_path, train=6, val=0, image_size=64)
    train, _ = recipe(64)
    loader = DataLoader(coco_split(tmp_path, "train", train), batch_size=3, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for images, padding_mask, targets in batches:
        assert images.shape[0] == 3 and images.shape[-2:] == padding_mask.shape[-2:]
        for index, target in enumerate(targets):
            height, width = target["size"].tolist()
            assert not padding_mask[index, :height, :width].any()
            assert padding_mask[index].sum() == padding_mask.shape[-2] * padding_mask.shape[-1] - height * width
