"""CLIP4Clip's multi-sentence retrieval metrics (MSVD, VATEX) against rankings worked out by hand, ties included."""

import pytest
import torch

from evaluate import multi_caption_retrieval_metrics, retrieval_metrics

# Six captions of three videos (video 0: captions 0-1, video 1: caption 2, video 2: captions 3-5), scored against
# the three videos (columns).
MULTI_SIMILARITY = torch.tensor(
    [
        [0.9, 0.5, 0.2],
        [0.4, 0.4, 0.8],
        [0.6, 0.3, 0.1],
        [0.2, 0.8, 0.8],
        [0.5, 0.6, 0.1],
        [0.3, 0.2, 0.25],
    ]
)
VIDEO_OF_CAPTION = torch.tensor([0, 0, 1, 2, 2, 2])


def test_multi_caption_metrics_match_a_hand_computed_ranking():
    metrics = multi_caption_retrieval_metrics(MULTI_SIMILARITY, VIDEO_OF_CAPTION)
    # Text to video, each caption's own video among the 3: caption 0: 0.9 top -> 1; caption 1: 0.8 above 0.4 (the
    # other 0.4 ties, in its favour) -> 2; caption 2: 0.6 above 0.3 -> 2; caption 3: 0.8 ties 0.8 -> 1; caption 4:
    # 0.5 and 0.6 above 0.1 -> 3; caption 5: 0.3 above 0.25 -> 2. Ranks 1, 2, 2, 1, 3, 2.
    assert metrics["text_to_video"] == pytest.approx(
        {"R@1": 100 * 2 / 6, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 11 / 6}
    )
    # Video to text, each video against every video's best caption: video 0: groups (0.9, 0.6, 0.5) -> 1; video 1:
    # (0.5, 0.3, 0.8) -> 3 (ranked among all six captions it would be 5); video 2: (0.8, 0.1, 0.8), a tie -> 1.
    assert metrics["video_to_text"] == pytest.approx(
        {"R@1": 100 * 2 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 5 / 3}
    )


def test_multi_caption_metrics_do_not_depend_on_the_caption_order():
    order = torch.tensor([4, 0, 2, 5, 1, 3])
    shuffled = multi_caption_retrieval_metrics(MULTI_SIMILARITY[order], VIDEO_OF_CAPTION[order])
    assert shuffled == multi_caption_retrieval_metrics(MULTI_SIMILARITY, VIDEO_OF_CAPTION)


def test_multi_caption_metrics_with_one_caption_per_video_are_the_single_caption_ones():
    similarity = torch.randn(40, 40, generator=torch.Generator().manual_seed(1)).round(decimals=1)  # with ties
    assert multi_caption_retrieval_metrics(similarity, torch.arange(40)) == retrieval_metrics(similarity)
