"""The machinery of ``lorapipe ingest`` (``lorapipe.stages.ingest``): reading the input
(``inputs``), its captions (``captions``), decoding and judging each file (``decoding``), over
threads (``parallel``), choosing the keepers (``choosing``), the quality audit (``audit``) and
writing the dataset rows (``writing``). The drop reasons every part reports are in ``drops``."""
