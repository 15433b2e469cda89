"""Where a ``lorapipe generate`` output puts its files (beside ``index.parquet``, the reports
and ``job.yaml``)."""

IMAGES_DIR = "images"
SHEETS_DIR = "sheets"
