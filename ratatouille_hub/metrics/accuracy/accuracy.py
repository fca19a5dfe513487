"""Top-1 accuracy as an `evaluate` metric module, shipped with ratatouille-hub to work offline."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
Returns:
    accuracy (float): in [0, 1]; 0.0 for an empty input.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        matches = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": matches / len(references) if references else 0.0}
