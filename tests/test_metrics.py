"""Every reported metric against a case small enough to compute by hand."""

import pytest
import torch

from detector.evaluation.metrics import (
    bootstrap_ci,
    bootstrap_samples,
    fit_threshold,
    ranking_metrics,
    reliability_bins,
    threshold_metrics,
)
from detector.evaluation.report import evaluation_report, format_report, most_confident

# Four REAL (class 1) and two FAKE (class 0). At 0.5: REAL 0.9, 0.8, 0.7 right, 0.4 wrong;
# FAKE 0.6 wrong, 0.1 right. TP=3 FN=1 FP=1 TN=1 with REAL positive.
PROBS = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.6, 0.1])
LABELS = torch.tensor([1, 1, 1, 1, 0, 0])


def test_threshold_metrics_real_positive():
    m = threshold_metrics(PROBS, LABELS, 0.5, ("FAKE", "REAL"), positive_class=1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["accuracy_REAL"] == pytest.approx(3 / 4)
    assert m["accuracy_FAKE"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["confusion_matrix"] == [[1, 1], [1, 3]]


def test_threshold_metrics_fake_positive_and_threshold_is_inclusive():
    m = threshold_metrics(PROBS, LABELS, 0.5, ("FAKE", "REAL"), positive_class=0)
    # FAKE positive: TP=1 (0.1), FP=1 (REAL 0.4), FN=1 (FAKE 0.6).
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(5 / 8)  # symmetric in the classes
    # A probability equal to the threshold is predicted class 1.
    at = threshold_metrics(PROBS, LABELS, 0.6, ("FAKE", "REAL"))
    assert at["accuracy_FAKE"] == pytest.approx(1 / 2)
    assert at["accuracy_REAL"] == pytest.approx(3 / 4)


def test_auroc_and_average_precision():
    m = ranking_metrics(PROBS, LABELS, positive_class=1)
    # 8 (REAL, FAKE) pairs; only REAL 0.4 < FAKE 0.6 is ranked wrong.
    assert m["auroc"] == pytest.approx(7 / 8)
    # Ranked: R R R F R F -> precision at each REAL: 1, 1, 1, 4/5.
    assert m["average_precision"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)
    fake = ranking_metrics(PROBS, LABELS, positive_class=0)
    assert fake["auroc"] == pytest.approx(7 / 8)
    # FAKE positive, ranked by 1 - p: F(0.9) R(0.6) F(0.4) ... -> precision 1, 2/3.
    assert fake["average_precision"] == pytest.approx((1 + 2 / 3) / 2)


def test_tpr_at_fixed_fpr():
    # 100 FAKE at 0.00 .. 0.99; 10 REAL, five above 0.95 and five far below.
    fake = torch.arange(100, dtype=torch.float64) / 100
    real = torch.tensor([0.995, 0.985, 0.975, 0.965, 0.955, 0.5, 0.4, 0.3, 0.2, 0.1])
    probs = torch.cat([fake, real])
    labels = torch.cat([torch.zeros(100), torch.ones(10)]).long()
    m = ranking_metrics(probs, labels)
    # FPR <= 1%: only FAKE 0.99 may pass, so the threshold stays above 0.98: REAL 0.995, 0.985.
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.2)
    # FPR <= 5%: FAKE 0.95 .. 0.99 may pass: the five high REAL do.
    assert m["tpr_at_5pct_fpr"] == pytest.approx(0.5)


def test_equal_error_rate():
    # REAL 0.9 0.8 0.3; FAKE 0.7 0.2 0.1. At threshold 0.7: FPR 1/3 (0.7), FNR 1/3 (0.3).
    probs = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    assert ranking_metrics(probs, labels)["eer"] == pytest.approx(1 / 3)
    separable = ranking_metrics(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([1, 1, 0, 0]))
    assert separable["eer"] == pytest.approx(0.0)
    assert separable["auroc"] == pytest.approx(1.0)


def test_expected_calibration_error_and_reliability_bins():
    # Bin [0.1, 0.2): mean score 0.15, half REAL -> gap 0.35; bin [0.8, 0.9): 0.85, all REAL
    # -> gap 0.15. Each holds half of the images: ECE = 0.5 * 0.35 + 0.5 * 0.15 = 0.25.
    probs = torch.tensor([0.15, 0.15, 0.85, 0.85])
    labels = torch.tensor([0, 1, 1, 1])
    r = reliability_bins(probs, labels, positive_class=1, n_bins=10)
    assert r["ece"] == pytest.approx(0.25, abs=1e-6)
    counts = [b["count"] for b in r["bins"]]
    assert counts == [0, 2, 0, 0, 0, 0, 0, 0, 2, 0]
    assert r["bins"][1]["fraction_positive"] == pytest.approx(0.5)
    assert r["bins"][8]["mean_score"] == pytest.approx(0.85)
    # The diagram's bins reproduce the ECE.
    gap = sum(
        b["count"] / 4 * abs(b["mean_score"] - b["fraction_positive"])
        for b in r["bins"]
        if b["count"]
    )
    assert gap == pytest.approx(r["ece"], abs=1e-6)


# Validation: FAKE 0.1 0.2 0.35, REAL 0.3 0.6 0.7.
VAL_P = torch.tensor([0.1, 0.2, 0.35, 0.3, 0.6, 0.7], dtype=torch.float64)
VAL_Y = torch.tensor([0, 0, 0, 1, 1, 1])


def test_fit_threshold_maximises_balanced_accuracy_and_breaks_ties_towards_half():
    # Candidates halfway between scores. 0.25 (REAL 3/3, FAKE 2/3) and 0.475 (REAL 2/3,
    # FAKE 3/3) both reach balanced accuracy 5/6; 0.475 is nearer 0.5.
    t, info = fit_threshold(VAL_P, VAL_Y, "balanced_accuracy")
    assert t == pytest.approx(0.475)
    assert info["balanced_accuracy"] == pytest.approx(5 / 6)


def test_fit_threshold_for_a_target_fpr():
    # REAL positive, no FAKE may pass: above 0.35, the lowest such candidate is 0.475.
    t, info = fit_threshold(VAL_P, VAL_Y, "target_fpr", positive_class=1, target_fpr=0.0)
    assert t == pytest.approx(0.475) and info["fpr"] == 0.0 and info["tpr"] == pytest.approx(2 / 3)
    # One FAKE in three may pass: 0.25 catches every REAL.
    t, info = fit_threshold(VAL_P, VAL_Y, "target_fpr", positive_class=1, target_fpr=0.34)
    assert t == pytest.approx(0.25) and info["tpr"] == 1.0
    # FAKE positive: no REAL may be called FAKE (p < t), so t <= 0.3; 0.25 keeps 2 FAKE.
    t, info = fit_threshold(VAL_P, VAL_Y, "target_fpr", positive_class=0, target_fpr=0.0)
    assert t == pytest.approx(0.25) and info["tpr"] == pytest.approx(2 / 3)


def test_fitted_threshold_separates_float32_neighbours():
    # Two network outputs one float32 step apart: the double midpoint would round onto one of
    # them in float32, so the threshold must be the upper one's own float32 value or below.
    low = torch.tensor([0.4787498], dtype=torch.float32)
    probs = torch.cat([low, torch.nextafter(low, torch.tensor(1.0))])
    labels = torch.tensor([0, 1])
    t, info = fit_threshold(probs, labels)
    assert info["balanced_accuracy"] == 1.0
    assert (probs >= t).long().tolist() == [0, 1]  # float32 comparison
    assert (probs.double() >= t).long().tolist() == [0, 1]
    # Only one distinct score: no candidate separates anything, but one is still returned.
    t, info = fit_threshold(torch.full((4,), 0.5), torch.tensor([0, 1, 0, 1]), "target_fpr", 1, 0.0)
    assert info["fpr"] == 0.0 and t > 0.5


def test_fit_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        fit_threshold(torch.tensor([0.2, 0.7]), torch.tensor([1, 1]))


def test_bootstrap_resamples_are_the_metrics_of_explicit_resamples():
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(60, generator=g) < 0.5).long()
    probs = ((torch.rand(60, generator=g) + labels * 0.5) / 1.5 * 10).round() / 10  # with ties
    samples = bootstrap_samples(probs, labels, 0.5, resamples=7, seed=3, chunk=3)
    gen = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randint(60, (b, 60), generator=gen) for b in (3, 3, 1)])
    for r, idx in enumerate(rows):
        p, y = probs[idx], labels[idx]
        pred = (p >= 0.5).long()
        tp, fp, fn = [int(((pred == a) & (y == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
        pos, neg = p[y == 1], p[y == 0]
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :])
        assert samples["accuracy"][r] == pytest.approx(float((pred == y).double().mean()))
        assert samples["f1"][r] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert samples["auroc"][r] == pytest.approx(float(pairs.mean()))


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    # No timing assertion: a shared CI machine made 1000 resamples take 5.8 s once (the
    # limit was 5 s); speed is for benchmarks, measured as ratios, never asserted in tests.
    g = torch.Generator().manual_seed(0)
    n = 20_000
    labels = (torch.rand(n, generator=g) < 0.5).long()
    probs = torch.sigmoid(torch.randn(n, generator=g) + 1.5 * (2 * labels - 1))
    ci = bootstrap_ci(probs, labels, 0.5, resamples=1000, seed=5)
    assert ci == bootstrap_ci(probs, labels, 0.5, resamples=1000, seed=5)
    assert ci["resamples"] == 1000
    point = threshold_metrics(probs, labels, 0.5)
    auroc = ranking_metrics(probs, labels)["auroc"]
    for key, value in (("accuracy", point["accuracy"]), ("f1", point["f1"]), ("auroc", auroc)):
        lo, hi = ci[key]
        assert lo < value < hi, key
        assert hi - lo < 0.03, key  # 20,000 images: a narrow interval


def test_report_holds_every_metric_and_names_the_positive_class():
    report = evaluation_report(
        PROBS,
        LABELS,
        ["FAKE", "REAL"],
        1,
        0.65,
        threshold_fit={"rule": "balanced_accuracy", "n": 6, "split": "val"},
        bootstrap_resamples=200,
    )
    assert report["positive_class"] == "REAL"
    assert report["average_precision"] == pytest.approx(0.95)
    assert report["auroc"] == pytest.approx(7 / 8)
    # Headline numbers at the model's threshold (0.65: FAKE 0.6 now right, REAL 0.4 wrong).
    assert report["accuracy"] == pytest.approx(5 / 6)
    assert report["accuracy_FAKE"] == 1.0 and report["accuracy_REAL"] == pytest.approx(3 / 4)
    rows = {r["name"]: r for r in report["thresholds"]}
    assert rows["default"]["threshold"] == 0.5 and rows["default"]["accuracy"] == pytest.approx(
        4 / 6
    )
    assert rows["fitted"]["threshold"] == 0.65 and rows["fitted"]["accuracy"] == pytest.approx(
        5 / 6
    )
    text = format_report(report)
    assert "positive class REAL" in text and "fitted on the validation split" in text
    assert "95% CI" in text and "TPR at 1% FPR" in text and "0.5000 (default)" in text
    assert "accuracy on FAKE" in text and "equal error rate" in text


def test_most_confident_right_and_wrong_images():
    # Predictions at 0.5: 1, 1, 0, 0. Confidence is the probability of the predicted class.
    probs = torch.tensor([0.9, 0.6, 0.2, 0.45, 0.7])
    labels = torch.tensor([1, 0, 0, 1, 1])
    picked = most_confident(probs, labels, 0.5, k=2)
    assert picked["right"] == [0, 2]  # 0.9, then 0.8 (P(FAKE) of 0.2); 0.7 is third
    assert picked["wrong"] == [1, 3]  # 0.6, then 0.55
