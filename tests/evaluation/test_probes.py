"""Probes and baselines: scores checked against formulas written here, folds shared, no leakage."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, TransformerMixin

from nidl_dino.errors import UserError
from nidl_dino.evaluation.baselines import (
    block_average,
    brain_volume_feature,
    downsampled_intensities,
    intensity_pca_features,
)
from nidl_dino.evaluation.probes import (
    CHANCE,
    FeatureSet,
    covariate_matrix,
    format_probe_table,
    infer_task,
    run_probes,
    write_probe_table,
)

# Small grids keep every test to a few seconds on two shared cores.
FAST = {"alphas": (0.01, 1.0, 100.0), "Cs": (0.01, 1.0), "inner_splits": 3}


def make_cohort(n: int = 80, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A cohort whose age is exactly linear in ``signal`` and whose sex is pure noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 4))
    noise = rng.normal(size=(n, 6))
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{i:03d}" for i in range(n)],
            "age": 50.0 + signal @ np.array([3.0, -2.0, 1.0, 0.5]),
            "sex": rng.choice(["F", "M"], size=n),
            "site": rng.choice(["A", "B", "C"], size=n),
        },
        index=[f"scan{i}" for i in range(n)],
    )
    return table, signal, noise


def outer_folds(predictions: pd.DataFrame) -> dict[tuple[int, int], set]:
    """(repeat, fold) -> set of test-row labels, read back from the predictions."""
    return {
        key: set(group["row"]) for key, group in predictions.groupby(["repeat", "fold"], sort=True)
    }


def predictions_of(features, table, targets, n_splits, n_repeats) -> pd.DataFrame:
    """The out-of-fold predictions of ``features`` alone (no chance row), fast settings."""
    _, predictions = run_probes(
        features,
        table,
        targets,
        n_splits=n_splits,
        n_repeats=n_repeats,
        include_chance=False,
        return_predictions=True,
        **FAST,
    )
    return predictions


@pytest.fixture(scope="module")
def probed():
    table, signal, noise = make_cohort()
    scores, predictions = run_probes(
        {"signal": signal, "noise": pd.DataFrame(noise, index=table.index)},
        table,
        ["age", "sex"],
        n_splits=4,
        n_repeats=2,
        seed=0,
        return_predictions=True,
        **FAST,
    )
    return table, scores, predictions


def score(scores: pd.DataFrame, feature_set: str, target: str, metric: str) -> pd.Series:
    row = scores.query("feature_set == @feature_set and target == @target and metric == @metric")
    assert len(row) == 1
    return row.iloc[0]


def test_score_table_layout(probed):
    _, scores, _ = probed
    identity = ["feature_set", "target", "task", "metric"]
    assert list(scores.columns[:9]) == identity + "mean std n_folds n_samples n_features".split()
    assert list(dict.fromkeys(scores["feature_set"])) == [CHANCE, "signal", "noise"]
    assert set(zip(scores["target"], scores["task"], scores["metric"], strict=True)) == {
        ("age", "regression", "mae"),
        ("age", "regression", "r2"),
        ("sex", "classification", "roc_auc"),
        ("sex", "classification", "balanced_accuracy"),
    }
    assert (scores["n_folds"] == 8).all() and (scores["n_samples"] == 80).all()
    assert scores.set_index("feature_set")["n_features"].to_dict() == {
        CHANCE: 0,
        "signal": 4,
        "noise": 6,
    }


def test_regression_scores_match_hand_formulas(probed):
    _, scores, predictions = probed
    for name in (CHANCE, "signal", "noise"):
        maes, r2s = [], []
        rows = predictions.query("feature_set == @name and target == 'age'")
        for _, fold in rows.groupby(["repeat", "fold"]):
            error = fold["y_true"] - fold["y_pred"]
            maes.append(np.abs(error).sum() / len(fold))
            total = ((fold["y_true"] - fold["y_true"].mean()) ** 2).sum()
            r2s.append(1.0 - (error**2).sum() / total)
        for metric, values in (("mae", maes), ("r2", r2s)):
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            row = score(scores, name, "age", metric)
            assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std)


def test_exact_linear_target_is_recovered(probed):
    _, scores, _ = probed
    assert score(scores, "signal", "age", "r2")["mean"] > 0.99
    chance_mae = score(scores, CHANCE, "age", "mae")["mean"]
    assert score(scores, "signal", "age", "mae")["mean"] < 0.05 * chance_mae


def test_chance_predicts_the_training_mean_of_each_fold(probed):
    table, _, predictions = probed
    rows = predictions.query("feature_set == @CHANCE and target == 'age'")
    for (repeat, fold), fold_rows in rows.groupby(["repeat", "fold"]):
        train_rows = table.index.difference(fold_rows["row"])
        assert len(train_rows) == 80 - len(fold_rows), (repeat, fold)
        assert np.allclose(fold_rows["y_pred"], table.loc[train_rows, "age"].mean())


def test_regression_predictions_stay_within_the_training_folds_ages():
    # age is linear in the one feature; one scan's feature is 100x beyond the others, so an
    # unclipped linear probe would predict it about 100x too far from the mean age
    table, signal, _ = make_cohort(n=40, seed=3)
    x = signal[:, :1].copy()
    table["age"] = 50.0 + 10.0 * x[:, 0]
    x[7, 0] = 100.0 * np.abs(x).max()
    predictions = predictions_of({"x": x}, table, ["age"], n_splits=4, n_repeats=1)
    for _, fold in predictions.groupby("fold"):
        train_ages = table.loc[table.index.difference(fold["row"]), "age"]
        assert fold["y_pred"].between(train_ages.min(), train_ages.max()).all()
        if table.index[7] in set(fold["row"]):
            outlier = fold.loc[fold["row"] == table.index[7], "y_pred"].iloc[0]
            assert outlier == pytest.approx(train_ages.max())


def test_classification_scores_match_hand_formulas(probed):
    _, scores, predictions = probed
    rows = predictions.query("feature_set == 'noise' and target == 'sex'")
    aucs, accuracies = [], []
    for _, fold in rows.groupby(["repeat", "fold"]):
        pos = fold.loc[fold["y_true"] == 1, "y_pred"].to_numpy()
        neg = fold.loc[fold["y_true"] == 0, "y_pred"].to_numpy()
        # Mann-Whitney: fraction of (positive, negative) pairs ranked right, ties count half.
        wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
        aucs.append(wins / (len(pos) * len(neg)))
        # Logistic regression predicts the positive class when its probability exceeds 0.5.
        accuracies.append(((pos > 0.5).mean() + (neg <= 0.5).mean()) / 2)
    assert score(scores, "noise", "sex", "roc_auc")["mean"] == pytest.approx(np.mean(aucs))
    assert score(scores, "noise", "sex", "balanced_accuracy")["mean"] == pytest.approx(
        np.mean(accuracies)
    )
    # Sex is the larger sorted label, "M", coded 1.
    truth = predictions.query("target == 'sex'").drop_duplicates("row").set_index("row")["y_true"]
    table = probed[0]
    assert (truth == (table.loc[truth.index, "sex"] == "M")).all()


def test_chance_model_scores_exactly_chance(probed):
    _, scores, _ = probed
    chance = score(scores, CHANCE, "sex", "roc_auc")
    assert chance["mean"] == 0.5 and chance["std"] == 0.0
    assert score(scores, CHANCE, "sex", "balanced_accuracy")["mean"] == 0.5


def test_noise_features_give_chance_auc_with_spread():
    # One draw's mean AUC under the null varies by about 0.05 (folds share rows), so average three
    # independent cohorts: their mean should be within 0.08 of 0.5, while each draw spreads.
    means = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        table = pd.DataFrame(
            {"sex": rng.choice(["F", "M"], size=300), "site": rng.choice(["A", "B"], size=300)}
        )
        features = {"noise": rng.normal(size=(300, 6))}
        scores = run_probes(features, table, ["sex"], n_splits=4, n_repeats=2, **FAST)
        auc = score(scores, "noise", "sex", "roc_auc")
        assert auc["std"] > 0.02
        means.append(auc["mean"])
    assert abs(np.mean(means) - 0.5) < 0.08


def test_every_feature_set_uses_the_same_folds(probed):
    _, _, predictions = probed
    for target in ("age", "sex"):
        rows = predictions[predictions["target"] == target]
        assignments = [
            group.sort_values(["repeat", "row"])[["row", "repeat", "fold"]].to_numpy().tolist()
            for _, group in rows.groupby("feature_set")
        ]
        assert all(a == assignments[0] for a in assignments)
        # Every row is predicted exactly once per repeat.
        assert rows.groupby(["feature_set", "repeat"])["row"].agg(lambda r: r.is_unique).all()
        assert rows.groupby(["feature_set", "repeat"]).size().eq(80).all()


class RowSpy(TransformerMixin, BaseEstimator):
    """Records which rows every fit sees (row ids in column 0), then drops that column."""

    fitted: list[frozenset] = []  # class-level: GridSearchCV fits clones

    def fit(self, X, y=None):
        RowSpy.fitted.append(frozenset(X[:, 0].astype(int)))
        return self

    def transform(self, X):
        return X[:, 1:]


def test_scaler_and_search_are_fitted_inside_the_folds():
    table, signal, _ = make_cohort(n=60)
    table.index = range(60)
    RowSpy.fitted = []
    spied = FeatureSet(np.column_stack([np.arange(60), signal]), steps=(("spy", RowSpy()),))
    predictions = predictions_of({"spied": spied}, table, ["age"], 3, 2)
    every_row = set(range(60))
    trains = [every_row - test for test in outer_folds(predictions).values()]
    # Per outer fold: one fit per inner split (cached across the penalty candidates) and the refit.
    assert len(RowSpy.fitted) == len(trains) * (FAST["inner_splits"] + 1)
    for seen in RowSpy.fitted:
        assert any(seen <= train for train in trains), "a fit saw rows of every outer test fold"
    for train in trains:
        assert train in RowSpy.fitted  # the refit on the whole outer training fold
    inner = [seen for seen in RowSpy.fitted if seen not in trains]
    assert inner and all(len(seen) < min(map(len, trains)) for seen in inner)


@pytest.mark.filterwarnings("error")
def test_classification_folds_are_stratified_by_class_and_site():
    table, signal, _ = make_cohort(n=90, seed=1)
    table.loc[table.index[:2], "site"] = "tiny"  # a site too small for 5 folds must not break
    predictions = predictions_of({"signal": signal}, table, ["sex"], 5, 1)
    merged = predictions.merge(table[["sex", "site"]], left_on="row", right_index=True)
    for (_, sex, site), cell in merged.groupby(["repeat", "sex", "site"]):
        if site != "tiny" and len(cell) >= 5:
            counts = cell["fold"].value_counts().reindex(range(5), fill_value=0)
            assert counts.max() - counts.min() <= 1, (sex, site)


def test_regression_folds_cover_every_site():
    table, signal, _ = make_cohort(n=60, seed=2)
    predictions = predictions_of({"signal": signal}, table, ["age"], 4, 1)
    merged = predictions.merge(table[["site"]], left_on="row", right_index=True)
    assert merged.groupby("fold")["site"].nunique().eq(3).all()


def test_sessions_of_one_participant_stay_in_one_fold_inner_and_outer():
    table, signal, _ = make_cohort(n=60, seed=3)
    table["participant_id"] = [f"sub-{i // 2:03d}" for i in range(60)]  # two sessions each
    table["session_id"] = ["ses-1", "ses-2"] * 30
    table.index = range(60)
    RowSpy.fitted = []
    spied = FeatureSet(np.column_stack([np.arange(60), signal]), steps=(("spy", RowSpy()),))
    predictions = predictions_of({"spied": spied}, table, ["age", "sex"], 3, 1)
    assert {"participant_id", "session_id"} <= set(predictions.columns)
    assert predictions.groupby(["target", "repeat", "participant_id"])["fold"].nunique().eq(1).all()
    for seen in RowSpy.fitted:  # row 2k and 2k+1 are one participant
        assert all((2 * (r // 2) in seen) == (2 * (r // 2) + 1 in seen) for r in seen)


def test_missing_targets_are_dropped_for_every_feature_set():
    table, signal, noise = make_cohort(n=60)
    table.loc[table.index[:7], "age"] = np.nan
    table.loc[table.index[5:9], "sex"] = None
    scores, predictions = run_probes(
        {"signal": signal, "noise": noise},
        table,
        ["age", "sex"],
        n_splits=3,
        n_repeats=1,
        return_predictions=True,
        **FAST,
    )
    assert scores.groupby("target")["n_samples"].unique().map(list).to_dict() == {
        "age": [53],
        "sex": [56],
    }
    assert not set(table.index[:7]) & set(predictions.query("target == 'age'")["row"])


def test_dataframes_align_by_index_and_arrays_by_position():
    table, signal, _ = make_cohort(n=48)
    frame = pd.DataFrame(signal, index=table.index).iloc[::-1]  # reversed order, same labels
    common = dict(n_splits=3, n_repeats=1, include_chance=False, **FAST)
    by_position = run_probes({"x": signal}, table, ["age"], **common)
    by_label = run_probes({"x": frame}, table, ["age"], **common)
    pd.testing.assert_frame_equal(by_position, by_label)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (np.zeros((47, 3)), "one row per table row"),
        (
            pd.DataFrame(np.zeros((47, 3)), index=[f"scan{i}" for i in range(47)]),
            "have no features",
        ),
        (np.full((48, 3), np.nan), "status != 'ok'"),
        (pd.DataFrame({"id": ["a"] * 48}, index=[f"scan{i}" for i in range(48)]), "column 'id'"),
    ],
)
def test_misaligned_or_bad_features_are_user_errors(features, message):
    table, _, _ = make_cohort(n=48)
    with pytest.raises(UserError, match="feature set 'bad'") as error:
        run_probes({"bad": features}, table, ["age"], n_splits=3, n_repeats=1, **FAST)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("values", "task"),
    [
        (["M", "F", "F", None], "classification"),
        ([0, 1, 1, 0], "classification"),
        ([True, False, True, True], "classification"),
        ([20.5, 31.0, 44.2, np.nan], "regression"),
    ],
)
def test_task_inference(values, task):
    assert infer_task(pd.Series(values), "col") == task


@pytest.mark.parametrize("values", [["a", "b", "c"], [3.0, 3.0, np.nan], ["M", "M", "M"]])
def test_unusable_targets_are_user_errors_naming_the_column(values):
    with pytest.raises(UserError, match="column 'diagnosis'"):
        infer_task(pd.Series(values), "diagnosis")


def test_target_errors_name_the_column_and_the_fix():
    table, signal, _ = make_cohort(n=40)
    common = dict(n_splits=5, n_repeats=1, **FAST)
    with pytest.raises(UserError, match="column 'bmi' is not in the cohort table"):
        run_probes({"x": signal}, table, ["bmi"], **common)
    table["rare"] = ["yes"] * 37 + ["no"] * 3
    with pytest.raises(UserError, match="column 'rare' has only 3 row.*lower n_splits"):
        run_probes({"x": signal}, table, ["rare"], **common)
    with pytest.raises(UserError, match="column 'sex' is not numeric"):
        run_probes({"x": signal}, table, ["sex"], task_types={"sex": "regression"}, **common)


def test_same_seed_same_scores_other_seed_other_folds():
    table, signal, _ = make_cohort(n=40)
    common = dict(n_splits=4, n_repeats=1, return_predictions=True, include_chance=False, **FAST)
    first = run_probes({"x": signal}, table, ["age"], seed=3, **common)
    again = run_probes({"x": signal}, table, ["age"], seed=3, **common)
    other = run_probes({"x": signal}, table, ["age"], seed=4, **common)
    pd.testing.assert_frame_equal(first[0], again[0])
    assert outer_folds(first[1]) != outer_folds(other[1])


def write_volumes(tmp_path, volumes):
    paths = []
    for i, volume in enumerate(volumes):
        paths.append(tmp_path / f"sub-{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), paths[-1])
    return paths


def test_block_average_is_the_mean_of_each_block():
    volume = np.random.default_rng(0).normal(size=(9, 8, 7))
    out = block_average(volume, 2)
    assert out.shape == (4, 4, 3)
    for i, j, k in itertools.product(range(4), range(4), range(3)):
        block = [
            volume[2 * i + a, 2 * j + b, 2 * k + c] for a in (0, 1) for b in (0, 1) for c in (0, 1)
        ]
        assert out[i, j, k] == pytest.approx(sum(block) / 8)


def test_intensity_pca_baseline_is_fitted_in_folds_and_predicts(tmp_path):
    rng = np.random.default_rng(0)
    brightness = rng.uniform(1, 2, size=30)
    volumes = [b * np.ones((8, 8, 8)) + 0.01 * rng.normal(size=(8, 8, 8)) for b in brightness]
    paths = write_volumes(tmp_path, volumes)
    flat = downsampled_intensities(paths, downsample=4)
    assert flat.shape == (30, 8)
    assert flat[3, 0] == pytest.approx(volumes[3][:4, :4, :4].mean(), abs=1e-5)

    table = pd.DataFrame({"age": 20 + 30 * brightness})
    baseline = intensity_pca_features(paths, n_components=2, downsample=4)
    assert baseline.X.shape == (30, 8) and baseline.steps[0][0] == "pca"
    scores = run_probes({"pca": baseline}, table, ["age"], n_splits=3, n_repeats=1, **FAST)
    assert score(scores, "pca", "age", "r2")["mean"] > 0.95

    too_many = intensity_pca_features(paths, n_components=16, downsample=2)  # 13-row inner folds
    with pytest.raises(UserError, match="probes.pca.n_components"):
        run_probes({"pca": too_many}, table, ["age"], n_splits=3, n_repeats=1, **FAST)


def test_volume_reading_errors_name_the_file(tmp_path):
    paths = write_volumes(tmp_path, [np.zeros((8, 8, 8)), np.zeros((8, 8, 6))])
    with pytest.raises(UserError, match="sub-01.nii.gz: shape"):
        downsampled_intensities(paths, downsample=2)
    (tmp_path / "broken.nii.gz").write_text("not a volume")
    with pytest.raises(UserError, match="broken.nii.gz: cannot read"):
        downsampled_intensities([tmp_path / "broken.nii.gz"])


def test_brain_volume_feature():
    qc = pd.DataFrame({"etiv_ml": [1100.0, 1250.5], "tiv": [1500, 1600]})
    assert brain_volume_feature(qc).tolist() == [[1100.0], [1250.5]]
    assert brain_volume_feature(qc, column="tiv").shape == (2, 1)
    with pytest.raises(UserError, match="no column 'volume'.*probes.brain_volume_column"):
        brain_volume_feature(qc, column="volume")
    qc.loc[1, "etiv_ml"] = np.nan
    with pytest.raises(UserError, match="'etiv_ml' is missing"):
        brain_volume_feature(qc)


def test_probe_table_formats_and_round_trips(tmp_path):
    scores = pd.DataFrame(
        {
            "feature_set": ["chance", "chance", "dino", "dino"],
            "target": ["age", "sex", "age", "sex"],
            "task": ["regression", "classification"] * 2,
            "metric": ["mae", "roc_auc", "mae", "roc_auc"],
            "mean": [8.123, 0.5, 4.5678, 0.91234],
            "std": [0.5, 0.0, 0.25, 0.0321],
            "n_folds": 15,
            "n_samples": 100,
            "n_features": [0, 0, 384, 384],
        }
    )
    assert format_probe_table(scores).splitlines() == [
        "| feature set | age MAE | sex ROC-AUC |",
        "|---|---|---|",
        "| chance | 8.12 ± 0.50 | 0.500 ± 0.000 |",
        "| dino | 4.57 ± 0.25 | 0.912 ± 0.032 |",
    ]
    path = tmp_path / "probes" / "scores.tsv"
    write_probe_table(scores, path)
    back = pd.read_csv(path, sep="\t")
    pd.testing.assert_frame_equal(back, scores, check_dtype=False)


def test_compare_to_baselines_pairs_the_folds_by_hand():
    from nidl_dino.evaluation.probes import compare_to_baselines

    rows = []
    # regression: 3 folds of 2 rows; absolute errors per fold (dino, pca) chosen by hand
    errors = {"dino": [1.0, 2.0, 3.0], "pca": [2.0, 2.0, 6.0]}
    for name, errs in errors.items():
        for fold, e in enumerate(errs):
            for sign in (1, -1):  # errors of +e and -e: MAE e
                rows.append(("age", "regression", name, fold, 50.0, 50.0 + sign * e))
    # classification: fold 0 dino ranks perfectly (AUC 1), pca inverted (AUC 0);
    # fold 1 both perfect
    for name, good0 in (("dino", True), ("pca", False)):
        for fold in (0, 1):
            good = good0 or fold == 1
            for y in (0.0, 1.0):
                rows.append(("sex", "classification", name, fold, y, y if good else 1 - y))
    predictions = pd.DataFrame(
        rows, columns=["target", "task", "feature_set", "fold", "y_true", "y_pred"]
    ).assign(repeat=0)
    table = compare_to_baselines(predictions).set_index("target")

    age = table.loc["age"]
    gains = np.array([2 - 1, 2 - 2, 6 - 3], dtype=float)  # pca MAE - dino MAE per fold
    assert age["metric"] == "mae" and age["baseline"] == "pca"
    assert age["gain_mean"] == pytest.approx(gains.mean())
    assert age["gain_std"] == pytest.approx(gains.std(ddof=1))
    assert age["wins"] == 2 and age["n_folds"] == 3  # the tie is not a win
    assert age["reference_mean"] == pytest.approx(2.0)
    assert age["baseline_mean"] == pytest.approx(10 / 3)
    # better by 1.33, but the spreads are 1.0 (dino) and 2.31 (pca): not by more than the spread
    assert not age["beats_by_spread"]

    sex = table.loc["sex"]
    assert sex["metric"] == "roc_auc"
    assert sex["gain_mean"] == pytest.approx(0.5)  # folds: 1 - 0, 1 - 1
    assert sex["wins"] == 1 and sex["n_folds"] == 2
    assert not sex["beats_by_spread"]  # 0.5 better, pca's spread std([0, 1]) = 0.707


def test_compare_to_baselines_flags_a_clear_win():
    from nidl_dino.evaluation.probes import compare_to_baselines

    rows = []
    for fold, (d, b) in enumerate([(1.0, 5.0), (1.5, 5.5), (2.0, 6.0)]):
        for name, e in (("dino", d), ("pca", b)):
            rows += [("age", "regression", name, fold, 0.0, s * e) for s in (1, -1)]
    predictions = pd.DataFrame(
        rows, columns=["target", "task", "feature_set", "fold", "y_true", "y_pred"]
    ).assign(repeat=0)
    row = compare_to_baselines(predictions).iloc[0]
    assert row["gain_mean"] == pytest.approx(4.0) and row["gain_std"] == pytest.approx(0.0)
    assert row["beats_by_spread"] and row["wins"] == 3
    assert compare_to_baselines(predictions, reference="absent").empty


def _comparison(gains, spreads, beats):
    from nidl_dino.evaluation.probes import COMPARISON_COLUMNS

    rows = []
    for gain, spread, beat in zip(gains, spreads, beats, strict=True):
        row = dict.fromkeys(COMPARISON_COLUMNS, 0)
        row.update(gain_mean=gain, baseline_std=spread, beats_by_spread=beat)
        rows.append(row)
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def test_judgement_caveat_small_cohort_and_differences_within_the_spread():
    from nidl_dino.evaluation.probes import judgement_caveat

    big = _comparison([2.0, 0.1], [0.8, 0.8], [True, False])
    # 22 scans: too small whatever the numbers say
    small = judgement_caveat(big, 22)
    assert small and "too small to judge" in small and "22 usable scans" in small
    assert judgement_caveat(big, 49, min_scans=50) is not None
    assert judgement_caveat(big, 50, min_scans=50) is None  # one difference beyond the spread
    within = judgement_caveat(_comparison([0.5, -0.3], [0.8, 0.9], [False, False]), 200)
    assert within and "cannot tell" in within
    assert judgement_caveat(_comparison([], [], []), 200) is None


def test_a_binary_target_with_one_class_in_a_grouped_fold_is_refused_in_one_line():
    """Two of six participants are F, two scans each: grouped folds of 2 x 2 must leave an
    inner training fold without an F (liblinear then fails with a misleading 'multiclass')."""
    from nidl_dino.errors import UserError

    participants = [f"sub-{i}" for i in range(1, 7) for _ in range(2)]
    table = pd.DataFrame(
        {
            "participant_id": participants,
            "sex": ["F" if p in ("sub-1", "sub-2") else "M" for p in participants],
        }
    )
    features = np.random.default_rng(0).standard_normal((len(table), 4))
    with pytest.raises(UserError, match=r"one class only .*probes\.n_splits"):
        run_probes(
            {"x": features},
            table,
            ["sex"],
            n_splits=2,
            n_repeats=1,
            group_by="participant_id",
            stratify_by=None,
            inner_splits=2,
        )


# --- covariates (probes.covariates) -------------------------------------------------------------


def test_covariate_matrix_is_one_indicator_per_site_and_numbers_as_they_are():
    table = pd.DataFrame(
        {
            "site": ["B", "A", None, "B"],
            "scanner": ["x", "x", "x", "x"],  # one value: nothing to adjust for
            "field": [1.5, 3.0, 3.0, 1.5],
        }
    )
    design = covariate_matrix(table, ["site", "scanner", "field"])
    # levels sorted: A, B, n/a; then the numeric column
    expected = np.array(
        [[0, 1, 0, 1.5], [1, 0, 0, 3.0], [0, 0, 1, 3.0], [0, 1, 0, 1.5]], dtype=float
    )
    np.testing.assert_array_equal(design, expected)
    assert covariate_matrix(table, []).shape == (4, 0)
    # sites coded as whole numbers are categories, not a number: 3 indicators, not 1 column
    codes = pd.DataFrame(
        {"site": [11025, 11026, 11027, 11025], "etiv": [1512.3, 1604.8, 1450.1, 1702.6]}
    )
    np.testing.assert_array_equal(
        covariate_matrix(codes, ["site"]),
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]],
    )
    np.testing.assert_array_equal(
        covariate_matrix(codes, ["etiv"]), [[1512.3], [1604.8], [1450.1], [1702.6]]
    )


def test_covariate_errors_name_the_key_and_the_column():
    table = pd.DataFrame({"site": ["A", "B"], "field": [1.5, np.nan]})
    with pytest.raises(UserError, match=r"probes.covariates: column 'scanner' is not in"):
        covariate_matrix(table, ["scanner"])
    with pytest.raises(UserError, match=r"column 'field' has 1 missing value"):
        covariate_matrix(table, ["field"])
    cohort, feature = site_shifted_cohort()
    with pytest.raises(UserError, match=r"probes.covariates: 'age' is also a probe target"):
        run_probes({"x": feature}, cohort, ["age"], covariates=["age"], **FAST)


def site_shifted_cohort(n: int = 90, seed: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """Age uniform in 20-80, independent of site; one feature = age + a large site offset."""
    rng = np.random.default_rng(seed)
    site = np.repeat(["A", "B", "C"], n // 3)
    age = rng.uniform(20, 80, n)
    offset = {"A": -40.0, "B": 0.0, "C": 40.0}
    feature = age + np.array([offset[s] for s in site])
    table = pd.DataFrame({"age": age, "site": site}, index=[f"scan{i}" for i in range(n)])
    return table, feature.reshape(-1, 1)


def test_site_covariates_remove_a_site_offset_and_are_probed_alone():
    table, feature = site_shifted_cohort()
    settings = dict(n_splits=5, n_repeats=1, stratify_by="site", group_by=None, **FAST)
    plain = run_probes({"x": feature}, table, ["age"], **settings)
    adjusted = run_probes({"x": feature}, table, ["age"], covariates=["site"], **settings)

    def mae(scores, name):
        return scores.query("feature_set == @name and metric == 'mae'")["mean"].item()

    # feature - offset[site] is age exactly: with one indicator per site the probe is
    # x - 40 * (C - A) up to the penalty, so its error is far below a year; without them the
    # offsets (sd 33 years) swamp the age signal (sd 17): the best linear fit of age on x alone
    # has residual sd 17 * sqrt(1 - 17^2 / (17^2 + 33^2)) = 15 years, MAE about 12.
    # (Measured: 0.03 and 12.3, chance 15.1.)
    assert mae(adjusted, "x") < 1.0
    assert mae(plain, "x") > 8.0
    # the site alone says nothing about age here: no better than chance, within a year
    assert abs(mae(adjusted, "covariates") - mae(adjusted, CHANCE)) < 1.0
    assert "covariates" not in set(plain["feature_set"])
    # the feature set's size is its own columns, without the covariates
    assert set(adjusted.query("feature_set == 'x'")["n_features"]) == {1}
    assert set(adjusted.query("feature_set == 'covariates'")["n_features"]) == {3}


class WidthCheck(TransformerMixin, BaseEstimator):
    """Fails when fitted on another number of columns than the feature set's own."""

    def __init__(self, width: int = 1):
        self.width = width

    def fit(self, X, y=None):
        assert X.shape[1] == self.width, f"step saw {X.shape[1]} columns"
        self.n_seen_ = X.shape[1]  # fitted state, as sklearn expects of a fitted step
        return self

    def transform(self, X):
        assert X.shape[1] == self.width
        return X


def test_a_feature_sets_own_steps_see_its_columns_only():
    table, feature = site_shifted_cohort()
    two = np.column_stack([feature, np.random.default_rng(0).normal(size=len(table))])
    scores = run_probes(
        {"x": FeatureSet(two, steps=(("check", WidthCheck(width=2)),))},
        table,
        ["age"],
        n_splits=5,
        n_repeats=1,
        group_by=None,
        covariates=["site"],
        **FAST,
    )
    assert scores.query("feature_set == 'x' and metric == 'mae'")["mean"].item() < 1.0


def test_a_covariate_missing_from_the_cohort_is_skipped_with_a_warning(caplog):
    from nidl_dino.evaluation.probing import probe_targets

    table, feature = site_shifted_cohort()
    config = {"targets": ["age"], "n_repeats": 1, "covariates": ["site", "scanner"]}
    with caplog.at_level("WARNING"):
        scores, _, note = probe_targets({"x": feature}, table, config)
    assert "probe covariate 'scanner' is not a column" in caplog.text
    assert "covariates" in set(scores["feature_set"])  # site still adjusted for
    assert note == ""
