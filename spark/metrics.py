"""MLlib's ClassificationSummary figures of a predictions frame: ``model.evaluate(df)`` and ``model.summary``.

    s = model.evaluate(test)            # FeedForwardNetworkPSSummary
    s.accuracy, s.weightedPrecision, s.weightedRecall, s.weightedFMeasure(), s.weightedFalsePositiveRate
    s.labels, s.precisionByLabel, s.recallByLabel, s.fMeasureByLabel(beta), s.falsePositiveRateByLabel
    s.predictions, s.labelCol, s.predictionCol

One Spark job counts (label, prediction) pairs; every figure comes from that small table, with the definitions
of ``org.apache.spark.mllib.evaluation.MulticlassMetrics`` (what MLlib's summaries and
MulticlassClassificationEvaluator use): ``labels`` are the true labels present, ascending; a prediction of
another class counts against recall only; precision of a label never predicted is 0; a rate per label is
weighted by the label's share of the rows.
"""
from __future__ import annotations


class FeedForwardNetworkPSSummary:
    """Classification figures of ``predictions`` (a transformed frame), computed on first use."""

    def __init__(self, predictions, label_col: str, prediction_col: str):
        """predictions: the transformed frame, or a function making it (a training summary makes it when a
        figure is first asked for)."""
        self._predictions, self._label_col, self._prediction_col = predictions, label_col, prediction_col
        self._counts = None

    def __deepcopy__(self, memo):
        return self          # a read-only view of a frame (a DataFrame cannot be deep-copied): shared

    # ------------------------------------------------------------------ the frame
    @property
    def predictions(self):
        """The frame the figures describe: the input with the model's output columns."""
        if callable(self._predictions):
            self._predictions = self._predictions()
        return self._predictions

    @property
    def labelCol(self) -> str:
        return self._label_col

    @property
    def predictionCol(self) -> str:
        return self._prediction_col

    @property
    def weightCol(self):
        """None: rows are not weighted (the estimator takes no weightCol)."""
        return None

    def _table(self) -> dict:
        """{(label, prediction): rows}, from one aggregation job, kept."""
        if self._counts is None:
            from pyspark.sql import functions as F

            if not self._prediction_col:
                raise ValueError("this summary needs the prediction column, but predictionCol is '' (no column)")
            frame = self.predictions
            if self._label_col not in frame.columns:
                raise ValueError(f"labelCol {self._label_col!r} is not a column of the frame; columns: "
                                 f"{frame.columns}")
            rows = (frame.groupBy(F.col(self._label_col).cast("double").alias("l"),
                                  F.col(self._prediction_col).cast("double").alias("p")).count().collect())
            if not rows or any(r.l is None for r in rows):
                raise ValueError(f"no figures to compute: the frame has no rows, or labelCol {self._label_col!r} "
                                 f"has null values")
            self._counts = {(float(r.l), float(r.p)): int(r["count"]) for r in rows}
        return self._counts

    def _per_label(self):
        """-> (labels, rows per label, true positives per label, false positives per label, total rows)."""
        counts = self._table()
        labels = sorted({label for label, _ in counts})
        rows = {label: 0 for label in labels}
        tp, fp = dict.fromkeys(labels, 0), dict.fromkeys(labels, 0)
        for (label, prediction), n in counts.items():
            rows[label] += n
            if label == prediction:
                tp[label] += n
            elif prediction in fp:
                fp[prediction] += n
        return labels, rows, tp, fp, sum(rows.values())

    # ------------------------------------------------------------------ per label, in the order of labels
    @property
    def labels(self) -> list[float]:
        return self._per_label()[0]

    @property
    def truePositiveRateByLabel(self) -> list[float]:
        labels, rows, tp, _, _ = self._per_label()
        return [tp[lab] / rows[lab] for lab in labels]

    recallByLabel = truePositiveRateByLabel

    @property
    def falsePositiveRateByLabel(self) -> list[float]:
        labels, rows, _, fp, total = self._per_label()
        return [fp[lab] / (total - rows[lab]) if total > rows[lab] else 0.0 for lab in labels]

    @property
    def precisionByLabel(self) -> list[float]:
        labels, _, tp, fp, _ = self._per_label()
        return [tp[lab] / (tp[lab] + fp[lab]) if tp[lab] + fp[lab] else 0.0 for lab in labels]

    def fMeasureByLabel(self, beta: float = 1.0) -> list[float]:
        b2 = beta * beta
        return [(1 + b2) * p * r / (b2 * p + r) if b2 * p + r else 0.0
                for p, r in zip(self.precisionByLabel, self.recallByLabel)]

    # ------------------------------------------------------------------ over all rows
    def _weighted(self, values) -> float:
        labels, rows, _, _, total = self._per_label()
        return sum(v * rows[lab] for v, lab in zip(values, labels)) / total

    @property
    def accuracy(self) -> float:
        _, _, tp, _, total = self._per_label()
        return sum(tp.values()) / total

    @property
    def weightedTruePositiveRate(self) -> float:
        return self._weighted(self.truePositiveRateByLabel)

    weightedRecall = weightedTruePositiveRate

    @property
    def weightedFalsePositiveRate(self) -> float:
        return self._weighted(self.falsePositiveRateByLabel)

    @property
    def weightedPrecision(self) -> float:
        return self._weighted(self.precisionByLabel)

    def weightedFMeasure(self, beta: float = 1.0) -> float:
        return self._weighted(self.fMeasureByLabel(beta))
