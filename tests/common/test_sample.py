import torch

from mmf_plugins.common.sample import Sample, SampleList, collate


def test_collate_pads_variable_length_and_images_with_mask():
    a = Sample(input_ids=torch.tensor([1, 2, 3]), lm_label_ids=torch.tensor([5, -1, 6]), image=torch.ones(3, 4, 6),
               image_info_0={"num_boxes": 2, "bbox": torch.zeros(2, 4)}, question_id=7, text="a")
    b = Sample(input_ids=torch.tensor([4]), lm_label_ids=torch.tensor([9]), image=torch.ones(3, 5, 2) * 2,
               image_info_0={"num_boxes": 1, "bbox": torch.ones(1, 4)}, question_id=8, text="b")
    batch = collate([a, b], "vqa2", "train")
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.lm_label_ids.tolist() == [[5, -1, 6], [9, -1, -1]]  # -1 padding for MLM labels
    assert batch.image.shape == (2, 3, 5, 6)
    assert batch.image_mask.shape == (2, 5, 6)
    assert batch.image_mask[0, :4, :6].all() and not batch.image_mask[0, 4:].any()
    assert batch.image_mask[1, :5, :2].all() and not batch.image_mask[1, :, 2:].any()
    assert batch.image[1, :, :5, 2:].abs().sum() == 0
    assert isinstance(batch.image_info_0, SampleList)
    assert batch.image_info_0.num_boxes.tolist() == [2, 1]
    assert batch.image_info_0.bbox.shape == (2, 2, 4)
    assert batch.question_id.tolist() == [7, 8]
    assert batch.text == ["a", "b"]
    assert batch.dataset_name == "vqa2" and batch.get_batch_size() == 2


def test_to_and_missing_field_message():
    batch = collate([Sample(x=torch.zeros(2)), Sample(x=torch.ones(2))])
    moved = batch.to("cpu")
    assert torch.equal(moved.x, batch.x)
    try:
        batch.input_ids
    except AttributeError as e:
        assert "input_ids" in str(e) and "processors" in str(e)
    else:
        raise AssertionError("missing field must raise")
