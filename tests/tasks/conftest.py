"""Shared settings of the task tests: a tiny VMamba and a cheap Mask R-CNN."""

import pytest

# vmamba_tiny's architecture at toy width and depth: every task test builds the real encoder.
TINY_ENCODER = dict(encoder="vmamba_tiny", encoder_kwargs={"dims": 16, "depths": [1, 1, 1, 1]})
# Fewer proposals/detections than the recipe (the untrained model keeps 100 boxes otherwise).
SMALL_RCNN = dict(
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, box_detections_per_img=20,
)


@pytest.fixture
def tiny_encoder() -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_ENCODER.items()}


@pytest.fixture
def small_rcnn() -> dict:
    return dict(SMALL_RCNN)
