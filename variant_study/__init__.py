"""The variant study (python -m variant_study): plan.py what runs, runs.py trains through train.py, measure.py
measures the trained and untrained models, report.py and report_text.py write the README and plots."""
