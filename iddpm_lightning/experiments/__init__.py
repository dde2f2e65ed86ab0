"""The paper's findings reproduced at laptop scale: ``python -m iddpm_lightning.experiments run
--out docs/reproduction`` trains the runs of ``plan.py`` that are not yet cached, measures them
(``measure.py``), judges the four claims (``claims.py``) and writes the report (``report.py``)."""
