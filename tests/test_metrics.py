"""Recognition and retrieval metrics against rankings worked out by hand, ties included."""

import statistics

import pytest
import torch

from evaluate import direction_accuracy, rank_metrics, ranks_of_matches, retrieval_metrics, topk_accuracy


def test_retrieval_metrics_match_a_hand_computed_ranking():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.3, 0.8], [0.2, 0.7, 0.6]])  # text i describes video i
    metrics = retrieval_metrics(similarity)
    # text 0: nothing above 0.9 -> 1; text 1: 0.8 and 0.8 above 0.3 -> 3; text 2: 0.7 above 0.6 -> 2
    assert ranks_of_matches(similarity).tolist() == [1, 3, 2]
    assert metrics["text_to_video"] == pytest.approx(
        {"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0}
    )
    # video 0: column 0 = (0.9, 0.8, 0.2) -> 1; video 1: (0.1, 0.3, 0.7) -> 2; video 2: (0.5, 0.8, 0.6) -> 2
    assert ranks_of_matches(similarity.t()).tolist() == [1, 2, 2]
    assert metrics["video_to_text"] == pytest.approx(
        {"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 5 / 3}
    )


def test_ties_count_in_the_true_matchs_favour():
    similarity = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.5, 0.9], [0.1, 0.1, 0.1]])
    assert ranks_of_matches(similarity).tolist() == [1, 2, 1]


@pytest.mark.parametrize("count", [6, 7])
def test_median_rank_is_numpys_median_for_even_and_odd_counts(count):
    # CLIP4Clip takes np.median of the 1-based ranks: an even count averages the two middle ranks
    ranks = torch.randint(1, 40, (count,), generator=torch.Generator().manual_seed(1))  # 6 of them: a half rank
    assert rank_metrics(ranks)["MdR"] == statistics.median(ranks.tolist())


def test_ranks_agree_with_a_full_sort_when_there_are_no_ties():
    similarity = torch.randn(50, 50, generator=torch.Generator().manual_seed(0))
    position_in_sorted_row = (similarity.argsort(dim=1, descending=True) == torch.arange(50)[:, None]).nonzero()[:, 1]
    assert torch.equal(ranks_of_matches(similarity), position_in_sorted_row + 1)
    recall_at_10 = 100 * ((position_in_sorted_row + 1) <= 10).float().mean().item()
    assert retrieval_metrics(similarity)["text_to_video"]["R@10"] == pytest.approx(recall_at_10)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.3, 0.2, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([1, 1, 2, 0])
    # top-1 hits: videos 0 and 2; top-5 over 3 classes: every video
    assert topk_accuracy(logits, labels) == pytest.approx({"top1": 50.0, "top5": 100.0})
    assert topk_accuracy(logits, labels, ks=(1, 2)) == pytest.approx({"top1": 50.0, "top2": 75.0})


def test_direction_accuracy_compares_each_video_with_its_reversed_class():
    # classes (0, 1) and (2, 3) are time-reversed pairs
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.9, 0.2, 0.0, 0.0], [0.0, 0.0, 0.1, 0.4], [0.5, 0.0, 0.3, 0.2]])
    labels = torch.tensor([0, 1, 3, 2])
    # video 0: 0.9 > 0.1 yes; video 1: 0.2 > 0.9 no; video 2: 0.4 > 0.1 yes; video 3: 0.3 > 0.2 yes (top-1 is wrong)
    assert direction_accuracy(logits, labels) == pytest.approx(75.0)
