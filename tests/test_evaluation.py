"""Tests of the evaluation metrics, the NAB scorer and the benchmark data loaders.

The NAB reference tests read the shared benchmark data (see exporter.datasets for where it is
looked for) and fail, never skip, when it is missing.
"""

import functools
import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from exporter import datasets
from exporter import evaluation as ev

STANDARD = ev.NAB_PROFILES["standard"]
LOW_FN = ev.NAB_PROFILES["reward_low_FN_rate"]


def sigmoid(y):
    """NAB's scaled sigmoid, written out independently of the code under test."""
    return -1.0 if y > 3 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def require_datasets():
    try:
        return datasets.datasets_dir()
    except datasets.DatasetsNotFoundError as error:
        pytest.fail(f"the benchmark data is required for this test: {error}")


@functools.cache
def numenta_corpus():
    require_datasets()
    return datasets.load_nab_detector_corpus("numenta")


def nab_file(scores, windows, name="test.csv"):
    return ev.NabFileScores(name=name, scores=np.asarray(scores, dtype=float), windows=tuple(windows))


def flags_to_scores(n_rows, flagged_rows):
    scores = np.zeros(n_rows)
    scores[list(flagged_rows)] = 1.0
    return scores


# --- Point-wise and event-wise metrics -----------------------------------------------------------

# Two events, rows 1-3 and 6-7. Row 2 hits the first event, rows 0 and 9 are false alarms.
LABELS = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
FLAGS = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)


def test_point_metrics_tiny():
    metrics = ev.point_metrics(LABELS, FLAGS)

    assert metrics.true_positives == 1
    assert metrics.false_positives == 2
    assert metrics.false_negatives == 4
    assert metrics.precision == pytest.approx(1 / 3)
    assert metrics.recall == pytest.approx(1 / 5)
    assert metrics.f1 == pytest.approx(0.25)


def test_event_metrics_tiny():
    metrics = ev.event_metrics(LABELS, FLAGS)

    assert metrics.events == 2
    assert metrics.detected_events == 1
    assert metrics.predicted_segments == 3
    assert metrics.matched_segments == 1
    assert metrics.recall == pytest.approx(1 / 2)
    assert metrics.precision == pytest.approx(1 / 3)
    assert metrics.f1 == pytest.approx(0.4)


def test_point_adjusted_tiny():
    adjusted = ev.point_adjust(LABELS, FLAGS)
    metrics = ev.point_adjusted_metrics(LABELS, FLAGS)

    assert adjusted.tolist() == [True, True, True, True, False, False, False, False, False, True]
    assert metrics.true_positives == 3
    assert metrics.false_positives == 2
    assert metrics.false_negatives == 2
    assert metrics.f1 == pytest.approx(0.6)


def test_event_overlap_at_edge():
    labels = [0, 0, 1, 1, 0, 0]
    flags = [0, 0, 0, 1, 1, 1]  # one predicted segment that starts inside the event

    metrics = ev.event_metrics(labels, flags)

    assert metrics.precision == 1.0
    assert metrics.recall == 1.0


def test_point_metrics_no_flags():
    metrics = ev.point_metrics(LABELS, np.zeros(len(LABELS), dtype=bool))

    assert metrics.precision == 0.0
    assert metrics.recall == 0.0
    assert metrics.f1 == 0.0


def test_point_metrics_at_threshold():
    scores = [0.2, 0.5, 0.7, np.nan]
    labels = [0, 1, 1, 1]

    metrics = ev.point_metrics_at(labels, scores, 0.5)

    assert ev.flags_at(scores, 0.5).tolist() == [False, True, True, False]
    assert metrics.true_positives == 2
    assert metrics.false_negatives == 1


def test_find_segments_edges():
    segments = ev.find_segments([1, 1, 0, 1, 0, 0, 1])

    assert segments.tolist() == [[0, 1], [3, 3], [6, 6]]
    assert ev.find_segments([0, 0]).shape == (0, 2)


def test_length_mismatch_rejected():
    with pytest.raises(ValueError, match="length mismatch"):
        ev.point_metrics([0, 1], [1])


def test_pr_auc_hand_computed():
    # Ranked: 0.9 (anomaly), 0.8 (normal), 0.7 (anomaly), 0.1 (normal).
    # Average precision = 0.5 * 1 + 0.5 * 2/3.
    assert ev.pr_auc([1, 0, 0, 1], [0.9, 0.8, 0.1, 0.7]) == pytest.approx(5 / 6)


def test_pr_auc_nan_ranks_lowest():
    assert ev.pr_auc([1, 0, 1], [0.9, 0.8, np.nan]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_pr_auc_without_anomaly_rejected():
    with pytest.raises(ValueError, match="no row is labelled"):
        ev.pr_auc([0, 0], [0.1, 0.2])


def test_best_f1_threshold():
    # F1 by threshold: 0.9 -> 2/3, 0.85 -> 1/2, 0.8 -> 4/5, 0.2 -> 2/3, 0.1 -> 4/7.
    best = ev.best_f1_threshold([0, 1, 1, 0, 0], [0.1, 0.9, 0.8, 0.2, 0.85])

    assert best.threshold == 0.8
    assert best.metrics.f1 == pytest.approx(0.8)


def test_best_f1_tie_highest():
    # Threshold 0.9 gives TP 1, FN 1 and 0.5 gives TP 2, FP 2: both F1 = 2/3, so 0.9 wins.
    best = ev.best_f1_threshold([1, 0, 0, 1], [0.9, 0.5, 0.5, 0.5])

    assert best.metrics.f1 == pytest.approx(2 / 3)
    assert best.threshold == 0.9


def test_detection_delay_rows():
    delays = ev.detection_delays(LABELS, FLAGS)

    assert delays.tolist() == [1.0]  # the second event is missed, so it has no delay


def test_detection_delay_seconds():
    timestamps = pd.date_range("2014-01-01", periods=len(LABELS), freq="5min")
    flags = FLAGS.copy()
    flags[7] = True

    delays = ev.detection_delays(LABELS, flags, timestamps)

    assert delays.tolist() == [300.0, 300.0]


def test_false_alarm_rate():
    # Normal rows are 0, 4, 5, 8 and 9, and rows 0 and 9 are flagged.
    assert ev.false_alarm_rate(LABELS, FLAGS) == pytest.approx(2 / 5)


# --- NAB scoring on hand-made files --------------------------------------------------------------

# 100 rows, so probation covers rows 0-14. One window, rows 40-49 (width 10).
ROWS = 100
WINDOW = (40, 49)


def score_flags(flagged_rows, windows=(WINDOW,), profile=STANDARD, n_rows=ROWS):
    file = nab_file(flags_to_scores(n_rows, flagged_rows), windows)
    return ev.nab_score_file(file, profile, threshold=0.5).raw_score


def test_nab_probation_rows():
    assert ev.nab_probation_rows(ROWS) == 15
    assert ev.nab_probation_rows(4032) == 604
    assert ev.nab_probation_rows(22695) == 750


def test_nab_sigmoid_values():
    assert ev.nab_scaled_sigmoid(0.0) == 0.0
    assert ev.nab_scaled_sigmoid(-1.0) == pytest.approx(sigmoid(-1.0))
    assert ev.nab_scaled_sigmoid(3.0) == pytest.approx(sigmoid(3.0))
    assert ev.nab_scaled_sigmoid(3.01) == -1.0
    assert ev.nab_scaled_sigmoid(1e6) == -1.0


def test_nab_window_first_row():
    assert score_flags([40]) == pytest.approx(STANDARD.tp_weight)


def test_nab_window_second_row():
    expected = sigmoid(-9 / 10) / sigmoid(-1.0)

    raw = score_flags([41])

    assert raw == pytest.approx(expected)
    assert raw > 0.99 * STANDARD.tp_weight


def test_nab_window_last_row():
    expected = sigmoid(-1 / 10) / sigmoid(-1.0)

    assert score_flags([49]) == pytest.approx(expected)


def test_nab_earliest_detection_counts():
    # Later rows in the same window neither add credit nor cost a false positive.
    assert score_flags([42, 45, 49]) == pytest.approx(sigmoid(-8 / 10) / sigmoid(-1.0))


def test_nab_missed_window():
    assert score_flags([]) == -STANDARD.fn_weight
    assert score_flags([], profile=LOW_FN) == -2.0


def test_nab_fp_just_after_window():
    # Row 50 is one row past the end, at position 1 / (w - 1) = 1/9.
    cost = STANDARD.fp_weight * sigmoid(1 / 9)

    raw = score_flags([40, 50])

    assert raw == pytest.approx(1.0 + cost)
    assert -0.05 < raw - 1.0 < 0


def test_nab_fp_far_after_window():
    # Row 90 is 41 rows past the end, at position 41/9 > 3, so it costs the full A_FP.
    assert score_flags([40, 90]) == pytest.approx(1.0 - STANDARD.fp_weight)


def test_nab_fp_before_window():
    assert score_flags([20, 40]) == pytest.approx(1.0 - STANDARD.fp_weight)


def test_nab_fp_uses_previous_window():
    # Row 52 comes after the window at 40-49 (width 10) and before the one at 55-74 (width 20).
    windows = [(40, 49), (55, 74)]
    expected = 2.0 + STANDARD.fp_weight * sigmoid(3 / 9)

    assert score_flags([40, 52, 55], windows=windows) == pytest.approx(expected)


def test_nab_probation_ignored():
    # Rows 0-14 are in probation: a flag there is neither a detection nor a false positive.
    assert score_flags([5]) == -STANDARD.fn_weight


def test_nab_probation_inside_window():
    # The window starts inside probation, so its first scored row is row 15 of rows 10-19.
    raw = score_flags([12, 15], windows=[(10, 19)])

    assert raw == pytest.approx(sigmoid(-5 / 10) / sigmoid(-1.0))


def test_nab_one_row_window_fp():
    # The position divides by w - 1 = 0, which the scorer takes as the full A_FP cost.
    assert score_flags([40, 41], windows=[(40, 40)]) == pytest.approx(1.0 - STANDARD.fp_weight)


def test_nab_counts_skip_probation():
    file = nab_file(flags_to_scores(ROWS, [5, 20, 41, 42]), [WINDOW])

    result = ev.nab_score_file(file, STANDARD, threshold=0.5)

    assert result.true_positives == 2
    assert result.false_positives == 1
    assert result.false_negatives == 8
    assert result.true_negatives == ROWS - 15 - 10 - 1
    assert result.detected_windows == 1


def test_nab_perfect_and_null():
    files = [
        nab_file(flags_to_scores(ROWS, [40, 70]), [(40, 49), (70, 79)], "a.csv"),
        nab_file(flags_to_scores(200, [100]), [(100, 119)], "b.csv"),
    ]

    perfect = ev.nab_score(files, STANDARD, threshold=0.5)
    nothing = ev.nab_score(files, STANDARD, threshold=np.inf)

    assert perfect.normalized_score == pytest.approx(100.0)
    assert nothing.normalized_score == 0.0
    assert nothing.null_score == -3.0
    assert perfect.perfect_score == 3.0


def test_nab_overlapping_windows_rejected():
    with pytest.raises(ValueError, match="overlap"):
        ev.nab_row_weights(ROWS, [(40, 49), (45, 60)])


def test_nab_window_outside_file_rejected():
    with pytest.raises(ValueError, match="invalid window rows"):
        ev.nab_row_weights(ROWS, [(90, 100)])


def test_nab_window_rows_from_timestamps():
    timestamps = pd.date_range("2014-01-01", periods=10, freq="5min")
    windows = [(pd.Timestamp("2014-01-01 00:10"), pd.Timestamp("2014-01-01 00:20"))]

    assert ev.nab_window_rows(timestamps, windows) == ((2, 4),)


def test_nab_empty_window_rejected():
    timestamps = pd.date_range("2014-01-01", periods=10, freq="5min")
    windows = [(pd.Timestamp("2014-01-01 00:11"), pd.Timestamp("2014-01-01 00:14"))]

    with pytest.raises(ValueError, match="no row"):
        ev.nab_window_rows(timestamps, windows)


def random_corpus(seed):
    rng = np.random.default_rng(seed)
    files = []
    for index in range(4):
        n_rows = int(rng.integers(200, 400))
        starts = sorted(rng.choice(np.arange(40, n_rows - 30, 30), size=2, replace=False))
        windows = [(int(start), int(start) + int(rng.integers(3, 25))) for start in starts]
        # Scores rounded to two decimals, so that many rows share a score.
        scores = np.round(rng.random(n_rows), 2)
        scores[rng.random(n_rows) < 0.05] = np.nan
        files.append(nab_file(scores, windows, f"file{index}.csv"))
    return files


def test_nab_sweep_matches_direct():
    files = random_corpus(seed=7)

    sweep = ev.nab_sweep(files, STANDARD)

    for threshold, raw in zip(sweep.thresholds, sweep.raw_scores):
        assert raw == pytest.approx(ev.nab_score(files, STANDARD, threshold).raw_score, abs=1e-9)


def test_nab_sweep_candidates():
    files = random_corpus(seed=7)
    scored = np.concatenate([file.scores[file.weights.probation :] for file in files])
    distinct = np.unique(scored[~np.isnan(scored)])

    sweep = ev.nab_sweep(files, STANDARD)

    assert sweep.thresholds[0] == np.inf
    assert sweep.raw_scores[0] == sweep.null_score
    assert sorted(sweep.thresholds[1:]) == distinct.tolist()


def test_nab_optimize_finds_maximum():
    files = random_corpus(seed=11)
    thresholds = np.unique(np.concatenate([file.scores for file in files]))
    brute_force = max(ev.nab_score(files, LOW_FN, t).raw_score for t in thresholds[~np.isnan(thresholds)])

    best = ev.nab_optimize_threshold(files, LOW_FN)

    assert best.raw_score == pytest.approx(max(brute_force, best.null_score))
    assert best.raw_score >= brute_force - 1e-9


def test_nab_optimize_detect_nothing():
    # The window rows score lowest, so any threshold that catches the window also flags every
    # false positive, and flagging nothing is best.
    scores = np.full(ROWS, 0.9)
    scores[40:50] = 0.1
    files = [nab_file(scores, [WINDOW])]

    best = ev.nab_optimize_threshold(files, STANDARD)

    assert best.threshold == np.inf
    assert best.normalized_score == 0.0


def test_nab_optimize_tie_highest():
    # Row 45 is later in the window than row 40, so lowering the threshold from 0.9 to 0.5 adds
    # nothing and both thresholds score 1. The higher one wins.
    scores = np.zeros(ROWS)
    scores[40] = 0.9
    scores[45] = 0.5
    files = [nab_file(scores, [WINDOW])]

    best = ev.nab_optimize_threshold(files, STANDARD)

    assert best.raw_score == pytest.approx(1.0)
    assert best.threshold == 0.9


# --- NAB reference figures -----------------------------------------------------------------------

# Published scores of the Numenta HTM detector at NAB's stored thresholds, and the exhaustive
# sweep's optimum, which is higher for reward_low_FP_rate.
STORED_THRESHOLD_SCORES = {"standard": 70.10, "reward_low_FP_rate": 63.12, "reward_low_FN_rate": 74.32}
SWEEP_SCORES = {"standard": 70.10, "reward_low_FP_rate": 63.21, "reward_low_FN_rate": 74.32}


@pytest.mark.parametrize("profile", sorted(STORED_THRESHOLD_SCORES))
def test_numenta_stored_thresholds(profile):
    corpus = numenta_corpus()
    threshold = datasets.read_nab_thresholds()["numenta"][profile]
    published = datasets.read_nab_published_scores()["numenta"][profile]

    score = ev.nab_score(corpus, datasets.read_nab_profiles()[profile], threshold)

    assert round(score.normalized_score, 2) == STORED_THRESHOLD_SCORES[profile]
    assert score.normalized_score == pytest.approx(published, abs=1e-9)


@pytest.mark.parametrize("profile", sorted(SWEEP_SCORES))
def test_numenta_sweep(profile):
    corpus = numenta_corpus()

    best = ev.nab_optimize_threshold(corpus, datasets.read_nab_profiles()[profile])

    assert round(best.normalized_score, 2) == SWEEP_SCORES[profile]


@pytest.mark.parametrize("profile", sorted(STORED_THRESHOLD_SCORES))
def test_numenta_per_file(profile):
    corpus = numenta_corpus()
    threshold = datasets.read_nab_thresholds()["numenta"][profile]
    published = datasets.read_nab_published_file_scores("numenta", profile).set_index("File")

    score = ev.nab_score(corpus, datasets.read_nab_profiles()[profile], threshold)

    assert sorted(result.name for result in score.files) == sorted(published.index)
    for result in score.files:
        expected = published.loc[result.name]
        assert result.raw_score == pytest.approx(expected["Score"], abs=1e-9), result.name
        assert result.true_positives == expected["TP"], result.name
        assert result.false_positives == expected["FP"], result.name
        assert result.false_negatives == expected["FN"], result.name
        assert result.true_negatives == expected["TN"], result.name


def test_numenta_sweep_speed():
    corpus = numenta_corpus()
    profile = datasets.read_nab_profiles()["reward_low_FP_rate"]
    corpus_rows = sum(len(file.scores) for file in corpus)

    started = time.perf_counter()
    sweep = ev.nab_sweep(corpus, profile)
    elapsed = time.perf_counter() - started

    assert corpus_rows > 365_000
    assert len(sweep.thresholds) > 1000
    # Measured at about 0.05 s on a 2-core machine. Rescoring the corpus takes about 3 ms, so a
    # loop that rescored it at each of the ~29,000 thresholds would take over a minute.
    assert elapsed < 10.0


# --- Dataset loaders -----------------------------------------------------------------------------


def test_datasets_missing_message(tmp_path, monkeypatch):
    absent = tmp_path / "absent"
    monkeypatch.setenv(datasets.DATASETS_ENV, str(absent))

    with pytest.raises(datasets.DatasetsNotFoundError) as raised:
        datasets.datasets_dir()

    assert str(absent) in str(raised.value)
    assert datasets.DATASETS_ENV in str(raised.value)


def test_datasets_default_location():
    assert datasets.DEFAULT_DATASETS_DIR == datasets.REPOSITORY_ROOT.parent / "shared" / "datasets"
    assert (datasets.REPOSITORY_ROOT / "exporter" / "datasets.py").is_file()


def write_tiny_nab(root):
    """Write a one-file NAB tree whose CSV has the quirks of the real one."""
    data = root / "NAB" / "data" / "realTest"
    data.mkdir(parents=True)
    lines = ["timestamp,value"]
    lines += [f"2014-03-09 01:{minute:02d}:00,{minute}" for minute in range(0, 60, 5)]
    lines += ["2014-03-09 01:55:00,99"]  # duplicate timestamp
    lines += ["2014-03-09 01:50:00,98"]  # step backwards
    lines += ["2014-03-09 03:00:00,1", "2014-03-09 03:00:00,2"]  # repeated hour after a gap
    (data / "tiny.csv").write_text("\n".join(lines))  # no final newline
    labels = root / "NAB" / "labels"
    labels.mkdir()
    windows = {"realTest/tiny.csv": [["2014-03-09 01:40:00.000000", "2014-03-09 01:55:00.000000"]]}
    (labels / "combined_windows.json").write_text(json.dumps(windows))


def test_nab_rows_keep_quirks(tmp_path, monkeypatch):
    write_tiny_nab(tmp_path)
    monkeypatch.setenv(datasets.DATASETS_ENV, str(tmp_path))

    rows = datasets.read_nab_rows("realTest/tiny.csv")
    series, report = datasets.read_nab_series("realTest/tiny.csv")

    assert datasets.list_nab_files() == ["realTest/tiny.csv"]
    assert len(rows) == 16
    assert rows["value"].iloc[-1] == 2.0
    assert len(series) == 13
    assert report.duplicate_timestamps_dropped == 3
    assert report.missing_final_newline


def test_nab_corpus_length_checked(tmp_path, monkeypatch):
    write_tiny_nab(tmp_path)
    monkeypatch.setenv(datasets.DATASETS_ENV, str(tmp_path))

    corpus = datasets.nab_corpus({"realTest/tiny.csv": np.zeros(16)})

    # The window spans file rows 8-13: 01:40 to the last 01:55 before the step backwards.
    assert corpus[0].windows == ((8, 13),)
    with pytest.raises(ValueError, match="length mismatch"):
        datasets.nab_corpus({"realTest/tiny.csv": np.zeros(13)})


def test_nab_corpus_shape():
    require_datasets()
    windows = datasets.read_nab_windows()

    assert len(datasets.list_nab_files()) == 58
    assert sum(len(pairs) for pairs in windows.values()) == 116
    assert sum(1 for pairs in windows.values() if not pairs) == 6


def test_nab_profiles_file():
    require_datasets()

    assert datasets.read_nab_profiles() == ev.NAB_PROFILES


def test_nab_rows_match_results():
    # NAB scores every row, duplicates included, so the data and result files align row by row.
    corpus = numenta_corpus()
    machine = datasets.read_nab_rows("realKnownCause/machine_temperature_system_failure.csv")
    series, _ = datasets.read_nab_series("realKnownCause/machine_temperature_system_failure.csv")

    assert len(corpus) == 58
    assert sum(len(file.scores) for file in corpus) == 365_558
    assert len(machine) == 22_695
    assert len(series) == 22_695 - 12


def test_nab_windows_match_labels():
    # The result files carry NAB's own per-row label, which must match the windows' rows.
    for file in numenta_corpus():
        results = datasets.read_nab_detector_rows("numenta", file.name)
        labels = np.zeros(len(file.scores), dtype=int)
        for first, last in file.windows:
            labels[first : last + 1] = 1
        assert labels.tolist() == results["label"].tolist(), file.name


def test_nab_repeated_hour_kept():
    require_datasets()
    key = "realKnownCause/ec2_request_latency_system_failure.csv"

    rows = datasets.read_nab_rows(key)
    series, _ = datasets.read_nab_series(key)

    assert (rows["timestamp"] == pd.Timestamp("2014-03-09 03:00:00")).sum() == 12
    assert series.index.is_unique
    assert series[pd.Timestamp("2014-03-09 03:00:00")] == pytest.approx(47.09)


def test_skab_runs():
    require_datasets()
    runs = datasets.list_skab_runs()

    assert len(runs) == 21
    assert runs[:3] == ["valve1/0.csv", "valve1/1.csv", "valve1/2.csv"]
    assert runs[-1] == "anomaly-free/anomaly-free.csv"


def test_skab_run_columns():
    require_datasets()

    run = datasets.read_skab_run("valve1/0.csv")
    train, test = datasets.split_skab_run(run)

    assert isinstance(run.index, pd.DatetimeIndex)
    assert len(run.columns) == 10
    assert run["anomaly"].dtype.kind == "i"
    assert len(ev.find_segments(run["anomaly"].to_numpy())) == 1
    assert len(train) == 400
    assert len(test) == len(run) - 400


def test_smd_machine():
    require_datasets()

    machines = datasets.list_smd_machines()
    machine = datasets.read_smd_machine("machine-1-2")

    assert machines == [f"machine-1-{number}" for number in range(2, 9)]
    assert machine.train.shape[1] == 38
    assert machine.test.shape[1] == 38
    assert len(machine.test_labels) == len(machine.test)
    assert machine.test_labels.sum() > 0
