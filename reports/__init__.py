"""Reading studies back from storage: tables, statistics and figures, exported to files and optuna-dashboard."""
from reports.export import (
           DEFAULT_FORMATS,
           FIGURE_FORMATS,
           FORMATS,
           comparison_name,
           study_report,
           write_comparison,
           write_report,
)
from reports.tables import summary_counts, top_trials, trials_frame

__all__ = ["DEFAULT_FORMATS", "FIGURE_FORMATS", "FORMATS", "comparison_name", "study_report", "summary_counts",
           "top_trials", "trials_frame", "write_comparison", "write_report"]
