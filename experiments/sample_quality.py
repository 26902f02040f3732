"""Sample quality of digits as a number: a classifier trained on the digits training split
scores generated images by how confidently they read as a digit, and how evenly the
classes are covered.

    from sample_quality import DigitsScorer
    scorer = DigitsScorer(dataset)          # fits on dataset.train (levels)
    scorer.score(samples)                   # model-space samples (N, 1, 8, 8)
"""

import math
import warnings

import numpy as np


class DigitsScorer:
    """An RBF support-vector classifier fitted on the training digits; it scores
    model-space samples by the fraction classified with probability above `threshold`,
    and by the class balance of the predictions (the normalised entropy of the predicted
    class frequencies: 1 when every digit is drawn equally often, 0 when all samples read
    as one digit).

    The probabilities are scikit-learn's `SVC(probability=True)` (Platt-scaled pairwise
    couplings): they keep images off the data manifold unconfident. Measured: 64 images of
    uniform noise, 0 confident; 64 real test digits, 58. One-vs-rest calibration
    (`CalibratedClassifierCV`, which scikit-learn 1.9 suggests instead) rated 62 of the 64
    noise images confident, so it cannot tell noise from digits."""

    def __init__(self, dataset, *, threshold: float = 0.8, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        self.dataset = dataset
        self.threshold = threshold
        labels = np.asarray(load_digits().target)  # pyright: ignore[reportAttributeAccessIssue]
        n_train = len(dataset.train)
        if len(labels) != n_train + len(dataset.test):
            raise ValueError("DigitsScorer needs the digits dataset (sf.data.digits()).")
        self.test_labels = labels[n_train:]
        # (sklearn's inferred signature types `gamma` and `probability` as strings)
        self.classifier = SVC(
            gamma=10 / 64,  # pyright: ignore[reportArgumentType]
            C=10.0,
            probability=True,  # pyright: ignore[reportArgumentType]
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `probability` (see above)
            self.classifier.fit(self._features_of_levels(dataset.train), labels[:n_train])

    def _features_of_levels(self, levels) -> np.ndarray:
        k = self.dataset.discretization.num_levels
        return np.asarray(levels, np.float64).reshape(len(levels), -1) / (k - 1)

    def levels_of(self, samples) -> np.ndarray:
        """The integer levels of model-space samples (clipped into range)."""
        disc = self.dataset.discretization
        low, high = disc.data_range
        y = (np.asarray(samples, np.float64) - low) / (high - low)
        return np.clip(np.floor(y * disc.num_levels), 0, disc.num_levels - 1)

    def _summary(self, proba: np.ndarray, valid: np.ndarray) -> dict:
        confident = valid & (proba.max(axis=1) > self.threshold)
        counts = np.bincount(proba[valid].argmax(axis=1), minlength=10)
        freq = counts / max(counts.sum(), 1)
        nonzero = freq[freq > 0]
        balance = float(max(0.0, -(nonzero * np.log(nonzero)).sum() / math.log(10)))
        return {
            "confident": float(confident.mean()),
            "num_confident": int(confident.sum()),
            "num": int(len(proba)),
            "num_nonfinite": int((~valid).sum()),
            "class_balance": balance,
            "class_counts": counts.tolist(),
        }

    def score_levels(self, levels) -> dict:
        """Scores of images given as integer levels `(N, 1, 8, 8)`."""
        proba = self.classifier.predict_proba(self._features_of_levels(levels))
        return self._summary(proba, np.ones(len(proba), bool))

    def score(self, samples) -> dict:
        """Scores of model-space samples shaped `(N, 1, 8, 8)`; non-finite samples count
        as unconfident and are left out of the class counts."""
        samples = np.asarray(samples)
        valid = np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)
        levels = self.levels_of(np.where(np.isfinite(samples), samples, 0.0))
        proba = self.classifier.predict_proba(self._features_of_levels(levels))
        return self._summary(proba, valid)

    def score_real(self, num: int) -> dict:
        """The same scores for the first `num` real test digits (the reference)."""
        return self.score_levels(self.dataset.test[:num])
