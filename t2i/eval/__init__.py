"""Offline evaluation: the shapes attribute readout, prompt-attribute accuracy, contact sheets.

`t2i eval` (cli.py, metrics.py, features.py: FD, KID, precision/recall, alignment) is not imported here:
t2i.generate imports this package for contact sheets and should not pay for torchmetrics."""

from t2i.eval.attributes import (
    attribute_accuracy,
    normalize_attrs,
    score_generated,
    shapes_report,
    write_shapes_prompts,
)
from t2i.eval.grid import contact_sheet, write_contact_sheet
from t2i.eval.readout import read_attributes

__all__ = ["attribute_accuracy", "normalize_attrs", "score_generated", "contact_sheet", "write_contact_sheet",
           "read_attributes", "shapes_report", "write_shapes_prompts"]
